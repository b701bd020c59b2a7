"""Errors of the serving layer, each with the HTTP status and gRPC code it is answered with."""
from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request failed. Subclasses say why; the frontends answer with their status and code."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServingError, ValueError):
    """A request field is invalid (the client's fault: never retried, never a failover)."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"


class Unauthenticated(ServingError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    type = "authentication_error"


class TooLarge(ServingError):
    """A request over a size limit, refused before any work."""

    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "invalid_request_error"


class Overloaded(ServingError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "rate_limit_error"


class DeadlineExceeded(ServingError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    type = "timeout"


class Expired(DeadlineExceeded):
    """The caller gave up (deadline or cancellation) while a worker call waited for the model."""


class Unavailable(ServingError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    type = "service_unavailable"
