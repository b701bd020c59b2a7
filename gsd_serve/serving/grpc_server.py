"""gRPC servers for the workers: the gsd.v1.Draft / gsd.v1.Target servicers and health checking.

Requests are parsed by the servicer, not by gRPC: a message over MAX_WORKER_REQUEST_BYTES is refused with
RESOURCE_EXHAUSTED and undecodable bytes with INVALID_ARGUMENT (gRPC itself would answer UNKNOWN), so a
hostile or broken client gets a client error and the worker keeps serving. With a secret, every call but
health checking must carry it (auth.WorkerAuthInterceptor).
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from . import rpc
from .auth import SharedSecret, WorkerAuthInterceptor
from .draft_worker import DraftWorker
from .errors import Expired, ServingError

log = logging.getLogger(__name__)
pb = rpc.pb


def _call(context, worker, fn, request):
    if isinstance(request, rpc.RejectedRequest):
        context.abort(request.status, request.message)
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        worker.expired_calls += 1
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call started")
    def expired() -> bool:
        # the deadline itself, not only is_active(): the server may not have processed the client's cancellation
        # yet when a call that waited behind the model lock gets it
        left = context.time_remaining()
        return not context.is_active() or (left is not None and left <= 0)

    try:
        return fn(request, expired=expired)
    except Expired as exc:
        worker.expired_calls += 1
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    except ServingError as exc:   # BadRequest, TooLarge, ...: the client's fault, with its own code
        context.abort(exc.grpc_code, str(exc))
    except ValueError as exc:  # e.g. SamplingParams / SpecConfig validation
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Exception as exc:  # noqa: BLE001 (a bug: log it, answer INTERNAL; the router fails over)
        log.exception("%s failed", getattr(fn, "__name__", "call"))
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class _WorkerServicer:
    """Release and Info, the same for both kinds of worker."""

    def __init__(self, worker):
        self.worker = worker

    def Release(self, request, context):  # noqa: N802
        return _call(context, self.worker, lambda r, expired: pb.ReleaseResponse(
            released=self.worker.release(r.session_ids)), request)

    def Info(self, request, context):  # noqa: N802
        return _call(context, self.worker, lambda r, expired: self.worker.info(), request)


class DraftServicer(_WorkerServicer):
    def Propose(self, request, context):  # noqa: N802
        return _call(context, self.worker, self.worker.propose, request)


class TargetServicer(_WorkerServicer):
    def Decode(self, request, context):  # noqa: N802
        """A whole request decoded on this replica, its tokens streamed as they are committed."""
        if isinstance(request, rpc.RejectedRequest):
            context.abort(request.status, request.message)
        try:
            yield from self.worker.decode(request, cancelled=context.add_callback,
                                          deadline_s=context.time_remaining())
        except ServingError as exc:
            context.abort(exc.grpc_code, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 (a bug: log it, answer INTERNAL; the router fails over)
            log.exception("Decode failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def Prefill(self, request, context):  # noqa: N802
        return _call(context, self.worker, self.worker.prefill, request)

    def Verify(self, request, context):  # noqa: N802
        return _call(context, self.worker, self.worker.verify, request)


def serve_grpc(worker, host: str = "127.0.0.1", port: int = 0, max_workers: int | None = None,
               secret: SharedSecret | None = None):
    """Start a gRPC server (with health checking) for a DraftWorker or TargetWorker; returns (server, port).
    With `secret`, calls must carry it (health checks excepted). A target's Decode streams each hold a handler
    thread while they last: its pool has room for all it may decode, and some more."""
    if max_workers is None:
        max_workers = 8 + int(getattr(worker, "max_decoding", 0))
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    interceptors = [WorkerAuthInterceptor(secret)] if secret is not None else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=rpc.WORKER_SERVER_OPTIONS,
                         interceptors=interceptors)
    if isinstance(worker, DraftWorker):
        service, servicer = "gsd.v1.Draft", DraftServicer(worker)
    else:
        service, servicer = "gsd.v1.Target", TargetServicer(worker)
    rpc.add_servicer(service, servicer, server, rpc.MAX_WORKER_REQUEST_BYTES)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind gRPC server on {host}:{port}")
    server.start()
    hs.set(service, health_pb2.HealthCheckResponse.SERVING)
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound
