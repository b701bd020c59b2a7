"""The Router deployment: OpenAI-compatible HTTP (FastAPI ingress) and gsd.v1.Router over Serve's gRPC proxy.

With the app arg `direct_http_port` each replica also serves the same HTTP app on that port itself
(serving/direct_http.py: no hop through Serve's proxy; one replica per machine holds the port).

Thin adapter: gsd_serve.serving.router.RouterCore runs the requests, gsd_serve.serving.openai_api.OpenAIFrontend
parses and formats them, gsd_serve.serving.http_app builds the HTTP app (in each replica, after __init__).
Replicas of Draft and Target, and the application's worker secret, are found through the registry actor.
With an API key (app arg `api_key`, else $GSD_SERVE_API_KEY) /v1/* and the Router RPCs require it.
"""
from __future__ import annotations

import logging
import os

from ray import serve

from .common import RegistryView, app_name, env_setup


def draft_feature_layers(draft) -> list[int]:
    """The target layers a feature-conditioned draft reads (its config.json), [] for any other draft. The
    draft spec is resolved as the Draft deployment resolves it (common.load_models): no `draft`
    arg means the default draft, the shipped kind `--draft-kind auto` picks (models/checkpoints.default_draft_spec)."""
    import json

    from ..models.feature_draft import is_feature_draft
    from ..models.checkpoints import DEFAULT_DRAFT, ModelLoadError, default_draft_spec, resolve

    spec = str(draft or DEFAULT_DRAFT)
    if spec in (DEFAULT_DRAFT, "default-draft"):
        spec = default_draft_spec("auto")
    if spec == "default-independent":
        return []
    try:
        path = resolve(spec)
    except ModelLoadError:
        return []
    if not is_feature_draft(path):
        return []
    return [int(i) for i in json.loads((path / "config.json").read_text()).get("feature_layers", [])]


class RouterReplica:
    def __init__(self, args: dict | None = None, draft=None, target=None):
        env_setup()
        from ..serving.auth import api_key_from_env
        from ..serving.http_app import HttpApi
        from ..serving.openai_api import OpenAIFrontend
        from ..serving.router import RouterConfig, RouterCore

        args = dict(args or {})
        conf = dict(args.get("router") or {})
        conf.setdefault("target", args.get("target", "smollm2-135m-instruct"))
        if "spec" in args and "spec" not in conf:
            conf["spec"] = args["spec"]
        if "model_name" in args:
            conf.setdefault("model_name", args["model_name"])
        layers = draft_feature_layers(args.get("draft"))
        if layers:   # a feature-conditioned draft: the router asks the target for these layers' features
            conf.setdefault("feature_layers", layers)
        self.config = RouterConfig.from_dict(conf)
        registry = RegistryView(app_name())

        async def discover():
            view = await registry.view()
            self.core.worker_secret.value = view["token"]
            return [(e["kind"], e["replica_id"], e["address"]) for e in view["entries"]]

        self.core = RouterCore(self.config, discover)
        self.front = OpenAIFrontend(self.core)
        self.api_key = api_key_from_env(args.get("api_key"))
        self.http = HttpApi(self.front, self.api_key)
        self._handles = (draft, target)   # keeps the composed deployments in the application
        self.direct = None
        port = int(args.get("direct_http_port") or 0)
        if port > 0:   # the same app on a port of its own, from this replica's event loop (no proxy hop)
            from ..serving.direct_http import DirectHttpServer
            from ..serving.http_app import create_app

            host = str(args.get("direct_http_host", "127.0.0.1"))
            try:
                self.direct = DirectHttpServer(create_app(self.http), host, port).start()
            except OSError as exc:   # another router replica on this machine holds it (or another server)
                logging.getLogger(__name__).warning(
                    "router: direct HTTP port %s:%s is taken (%s); this replica serves through Serve's proxy only",
                    host, port, exc.strerror)

    def __serve_build_asgi_app__(self):
        from ..serving.http_app import create_app

        return create_app(self.http)

    def stats(self) -> dict:
        """What the soak and chaos checks read (through a deployment handle, never over HTTP): this process's
        resident memory and the sizes of the router's per-request structures."""
        from ..serving.procinfo import rss_bytes

        core = self.core
        return {"pid": os.getpid(), "rss_bytes": rss_bytes(), "inflight": core.inflight,
                "endpoints": len(core.endpoints), "runs": len(core.runs)}

    # gsd.v1.Router over Serve's gRPC proxy: methods named exactly like the RPCs
    def _refuse(self, request, grpc_context):
        """A ServingError for a request that must not run (bad bytes, too large, no API key), else None."""
        from ..serving.auth import matches, metadata_value
        from ..serving.errors import BadRequest, TooLarge, Unauthenticated
        from ..serving.rpc import RejectedRequest

        md = grpc_context.invocation_metadata() if grpc_context is not None else ()
        if not matches(metadata_value(md), self.api_key):
            self.core.metrics.inc("rejected", reason="unauthenticated")
            return Unauthenticated("a valid API key is required: metadata authorization: Bearer KEY")
        if isinstance(request, RejectedRequest):
            return (TooLarge if request.code == "RESOURCE_EXHAUSTED" else BadRequest)(request.message)
        return None

    @staticmethod
    def _fail(grpc_context, exc) -> None:
        if grpc_context is not None:
            grpc_context.set_code(exc.grpc_code)
            grpc_context.set_details(exc.message)

    async def Generate(self, request, grpc_context=None):  # noqa: N802
        from ..serving.errors import ServingError
        from ..serving.rpc import pb

        refused = self._refuse(request, grpc_context)
        if refused is not None:
            self._fail(grpc_context, refused)
            return pb.GenerateResponse()
        try:
            return await self.front.grpc_generate(request)
        except ServingError as exc:
            self._fail(grpc_context, exc)
            return pb.GenerateResponse()

    async def GenerateStream(self, request, grpc_context=None):  # noqa: N802
        from ..serving.errors import ServingError

        # a stream's status is the one set on the context before an exception ends it (Serve keeps it)
        refused = self._refuse(request, grpc_context)
        if refused is not None:
            self._fail(grpc_context, refused)
            raise refused
        try:
            async for chunk in self.front.grpc_generate_stream(request):
                yield chunk
        except ServingError as exc:
            self._fail(grpc_context, exc)
            raise

    # grpc.health.v1.Health over the same proxy (open, like /health)
    async def Check(self, request, grpc_context=None):  # noqa: N802
        from grpc_health.v1 import health_pb2

        await self.core.refresh()
        ok = bool(self.core.live("target"))
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)


Router = serve.deployment(serve.ingress()(RouterReplica), name="Router", ray_actor_options={"num_cpus": 0},
                          max_ongoing_requests=256)
