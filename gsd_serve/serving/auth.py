"""Who may call: the API key of the public endpoints and the shared secret of the worker services.

The router's HTTP `/v1/*` routes and its gsd.v1.Router RPCs take `Authorization: Bearer KEY` (HTTP header or
gRPC metadata) when an API key is set (`gsd-serve serve --api-key`, `GSD_SERVE_API_KEY`); `/health`,
`/metrics` and grpc.health.v1 stay open, as in vLLM.

The workers' gsd.v1.Draft / gsd.v1.Target services (Prefill, Propose, Verify, Release, Info) take the
application's shared secret in the same metadata: a session id is a response id, so a reachable worker
port must serve no one but the routers of its application. The secret is made by the application's
registry actor and handed to replicas and routers with their heartbeats and discoveries (reaching the
registry takes Ray access, which is guarded by Ray's own token auth).
"""
from __future__ import annotations

import hmac
import os
import secrets

import grpc

API_KEY_ENV = "GSD_SERVE_API_KEY"
METADATA_KEY = "authorization"


def api_key_from_env(explicit: str | None = None) -> str | None:
    """The API key: the explicit one, else $GSD_SERVE_API_KEY, else none (no authentication)."""
    key = explicit if explicit is not None else os.environ.get(API_KEY_ENV)
    return key or None


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def matches(header: str | bytes | None, token: str | None) -> bool:
    """Whether an Authorization value carries `token` (constant time). No token configured: anyone."""
    if not token:
        return True
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def metadata_value(metadata) -> str | None:
    """The authorization value of gRPC invocation metadata (a sequence of (key, value))."""
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            return value
    return None


class SharedSecret:
    """The worker secret, replaceable while serving (a restarted registry hands out a new one)."""

    def __init__(self, value: str | None = None):
        self.value = value

    def metadata(self) -> tuple | None:
        return ((METADATA_KEY, bearer(self.value)),) if self.value else None

    def allows(self, metadata) -> bool:
        return matches(metadata_value(metadata), self.value)


class WorkerAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every worker call without the application's secret (UNAUTHENTICATED); health checks stay open."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, secret: SharedSecret):
        self.secret = secret

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "this worker serves only its application's routers")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if details.method.startswith(self.OPEN) or self.secret.allows(details.invocation_metadata):
            return continuation(details)
        return self._deny
