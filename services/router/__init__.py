"""The Router deployment: OpenAI-compatible HTTP (FastAPI ingress) and gsd.v1.Router over Serve's gRPC proxy.

Thin adapter: gsd_serve.serving.router.RouterCore runs the requests, gsd_serve.serving.openai_api.OpenAIFrontend parses
and formats them. Replicas of Draft and Target are found through the application's registry actor.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from ..common import app_name, env_setup, get_registry

app = FastAPI(title="gsd-serve", description="Graph-structured speculative decoding, OpenAI-compatible")


class RouterReplica:
    def __init__(self, args: dict | None = None, draft=None, target=None):
        env_setup()
        from ...serving.openai_api import OpenAIFrontend
        from ...serving.router import RouterConfig, RouterCore

        args = dict(args or {})
        conf = dict(args.get("router") or {})
        conf.setdefault("target", args.get("target", "smollm2-135m-instruct"))
        if "spec" in args and "spec" not in conf:
            conf["spec"] = args["spec"]
        if "model_name" in args:
            conf.setdefault("model_name", args["model_name"])
        self.config = RouterConfig.from_dict(conf)
        self.registry = get_registry(app_name())
        registry = self.registry

        async def discover():
            return [(e["kind"], e["replica_id"], e["address"]) for e in await registry.list.remote()]

        self.core = RouterCore(self.config, discover)
        self.front = OpenAIFrontend(self.core)
        self._handles = (draft, target)   # keeps the composed deployments in the application

    async def _respond(self, request: Request, chat: bool):
        kind, status, payload = await self.front.handle(await request.body(), chat)
        if kind == "sse":
            return StreamingResponse(payload, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(payload, status_code=status)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._respond(request, chat=True)

    @app.get("/v1/models")
    async def models(self):
        return JSONResponse(self.front.models())

    @app.get("/health")
    async def health(self):
        await self.core.refresh()
        drafts, targets = len(self.core.live("draft")), len(self.core.live("target"))
        body = {"status": "ok" if targets else "unavailable", "draft_replicas": drafts,
                "target_replicas": targets, "requests_running": self.core.inflight}
        return JSONResponse(body, status_code=200 if targets else 503)

    @app.get("/metrics")
    async def metrics(self):
        return Response(self.core.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # gsd.v1.Router over Serve's gRPC proxy: methods named exactly like the RPCs
    async def Generate(self, request, grpc_context=None):  # noqa: N802
        from ...serving.errors import ServingError
        from ...serving.rpc import pb

        try:
            return await self.front.grpc_generate(request)
        except ServingError as exc:
            if grpc_context is not None:
                grpc_context.set_code(exc.grpc_code)
                grpc_context.set_details(exc.message)
            return pb.GenerateResponse()

    async def GenerateStream(self, request, grpc_context=None):  # noqa: N802
        from ...serving.errors import ServingError

        try:
            async for chunk in self.front.grpc_generate_stream(request):
                yield chunk
        except ServingError as exc:
            if grpc_context is not None:
                grpc_context.set_code(exc.grpc_code)
                grpc_context.set_details(exc.message)

    # grpc.health.v1.Health over the same proxy
    async def Check(self, request, grpc_context=None):  # noqa: N802
        from grpc_health.v1 import health_pb2

        await self.core.refresh()
        ok = bool(self.core.live("target"))
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)


Router = serve.deployment(serve.ingress(app)(RouterReplica), name="Router", ray_actor_options={"num_cpus": 0},
                          max_ongoing_requests=256)
