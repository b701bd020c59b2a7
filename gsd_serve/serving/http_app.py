"""The router's HTTP surface as a FastAPI app: OpenAI-compatible /v1 routes, /health and /metrics.

One app serves both the Ray Serve Router deployment (`serve.ingress()` builds it in each replica) and an
in-process router (tests, fuzzing): `create_app(HttpApi(frontend, api_key))`. Before any work a request is
checked in this order: the API key (401 on /v1/* without `Authorization: Bearer KEY`), the body size
(413 above RouterConfig.max_body_bytes: a declared Content-Length is refused unread, a streamed body is cut
off there), then its content (400 with an OpenAI-style error). The OpenAPI document (/openapi.json)
describes the request bodies with the server's own limits, so a schema-driven client or fuzzer sees them.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..core.sampling import MAX_TOP_LOGPROBS
from ..core.stops import MAX_STOPS
from .auth import matches
from .errors import BadRequest, TooLarge, Unauthenticated
from .openai_api import MAX_CHOICES, ROLES, UNSUPPORTED, OpenAIFrontend


class HttpApi:
    def __init__(self, front: OpenAIFrontend, api_key: str | None = None):
        self.front = front
        self.core = front.core
        self.api_key = api_key or None
        self.max_body_bytes = front.cfg.max_body_bytes

    # checks, in order ------------------------------------------------------------
    def unauthorized(self, request: Request) -> JSONResponse | None:
        if matches(request.headers.get("authorization"), self.api_key):
            return None
        self.core.metrics.inc("rejected", reason="unauthenticated")
        return error(Unauthenticated("a valid API key is required: Authorization: Bearer KEY", None,
                                     "invalid_api_key"), {"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        """The body, or TooLarge: refused on its declared length, else cut off once it passes the limit."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("invalid Content-Length")
            if int(declared) > limit:
                raise TooLarge(f"the request body has {declared} bytes; at most {limit} are accepted")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # routes ------------------------------------------------------------------------
    async def generate(self, request: Request, chat: bool):
        denied = self.unauthorized(request)
        if denied is not None:
            return denied
        try:
            raw = await self.read_body(request)
        except (BadRequest, TooLarge) as exc:
            self.core.metrics.inc("rejected", reason="too_large" if isinstance(exc, TooLarge) else "invalid")
            return error(exc)
        kind, status, payload = await self.front.handle(raw, chat)
        if kind == "sse":
            return ClosingStreamingResponse(payload, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(payload, status_code=status)

    def models(self, request: Request):
        return self.unauthorized(request) or JSONResponse(self.front.models())

    async def health(self):
        await self.core.refresh()
        drafts, targets = len(self.core.live("draft")), len(self.core.live("target"))
        body = {"status": "ok" if targets else "unavailable", "draft_replicas": drafts,
                "target_replicas": targets, "requests_running": self.core.inflight}
        return JSONResponse(body, status_code=200 if targets else 503)

    def metrics(self):
        return Response(self.core.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, however the response ends (finished, client
    gone, task cancelled): Starlette may cancel the streaming task before it ever iterated the body, and then
    nothing would close it (an SSEStream gives its request's slot back when closed)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def error(exc, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.http_status, headers=headers)


# ---------------------------------------------------------------- the OpenAPI description of the bodies

def request_schemas(front: OpenAIFrontend) -> dict[str, dict]:
    """JSON schemas of the two request bodies, with this server's model name and limits."""
    cfg = front.cfg
    vocab = front.core.vocab_size
    common: dict[str, Any] = {
        "model": {"type": "string", "enum": [cfg.model_name]},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "maximum": 100000},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 63 - 1},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_CHOICES},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    }
    # as in OpenAI's API, an optional field may be null (its default)
    common = {name: _nullable(sch) if name != "model" else sch for name, sch in common.items()}
    common["stop"] = {"oneOf": [{"type": "null"}, {"type": "string"},
                                {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "minLength": 1}}]}
    common.update({name: {"enum": [None, False, [], {}], "description": "not supported (only its no-op values)"}
                   for name in UNSUPPORTED})
    common["response_format"] = {"oneOf": [
        {"enum": [None, False, [], {}], "description": "text"},
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"enum": ["json_schema"]},
            "json_schema": {"type": "object", "required": ["schema"], "properties": {"schema": {"type": "object"}}}}}],
        "description": "JSON mode: json_object (any JSON object) or json_schema (its schema); the output is the "
                       "target's own choice among the tokens the grammar allows"}
    top = {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}
    completion = {"type": "object", "required": ["model", "prompt"], "properties": dict(
        common, logprobs={"oneOf": [{"type": "null"}, {"type": "boolean", "enum": [False]}, top]},
        top_logprobs={"enum": [None, False, [], {}], "description": "chat only (completions: logprobs)"}, prompt={
        "oneOf": [{"type": "string", "minLength": 1, "pattern": "\\S"},
                  {"type": "array", "minItems": 1, "maxItems": 1,
                   "items": {"type": "string", "minLength": 1, "pattern": "\\S"}},
                  {"type": "array", "minItems": 1, "maxItems": cfg.max_prompt_tokens,
                   "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}]})}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": list(ROLES)}, "content": {"type": "string"}}}
    chat = {"type": "object", "required": ["model", "messages"], "properties": dict(
        common, messages={"type": "array", "minItems": 1, "items": message},
        logprobs=_nullable({"type": "boolean"}), top_logprobs=_nullable(top),
        max_completion_tokens=_nullable({"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_limit}))}
    return {"CompletionRequest": completion, "ChatCompletionRequest": chat}


def _nullable(schema: dict) -> dict:
    schema = dict(schema)
    if "enum" in schema:
        schema["enum"] = list(schema["enum"]) + [None]
    else:
        schema["type"] = [schema["type"], "null"]
    return schema


def _body(schema: dict, secured: bool) -> dict:
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                             "responses": {"400": {"description": "invalid request"},
                                           "413": {"description": "request body too large"},
                                           "429": {"description": "too many requests in flight"}}}
    if secured:
        extra["security"] = [{"bearer": []}]
        extra["responses"]["401"] = {"description": "missing or wrong API key"}
    return extra


def create_app(api: HttpApi) -> FastAPI:
    app = FastAPI(title="gsd-serve", description="Graph-structured speculative decoding, OpenAI-compatible")
    schemas = request_schemas(api.front)
    secured = api.api_key is not None

    @app.post("/v1/completions", openapi_extra=_body(schemas["CompletionRequest"], secured))
    async def completions(request: Request):
        return await api.generate(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body(schemas["ChatCompletionRequest"], secured))
    async def chat_completions(request: Request):
        return await api.generate(request, chat=True)

    @app.get("/v1/models", openapi_extra={"security": [{"bearer": []}]} if secured else None)
    async def models(request: Request):
        return api.models(request)

    @app.get("/health")
    async def health():
        return await api.health()

    @app.get("/metrics")
    async def metrics():
        return api.metrics()

    if secured:
        base = app.openapi

        def openapi():
            doc = base()
            doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer"}
            return doc

        app.openapi = openapi
    return app
