"""gRPC servers for the workers: the gsd.v1.Draft / gsd.v1.Target servicers and health checking."""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from . import rpc
from .draft_worker import DraftWorker
from .errors import BadRequest, Expired

log = logging.getLogger(__name__)
pb = rpc.pb


def _call(context, fn, request):
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call started")
    try:
        return fn(request, expired=lambda: not context.is_active())
    except Expired as exc:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    except BadRequest as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
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
        return pb.ReleaseResponse(released=self.worker.release(request.session_ids))

    def Info(self, request, context):  # noqa: N802
        return self.worker.info()


class DraftServicer(_WorkerServicer, rpc.pb_grpc.DraftServicer):
    def Propose(self, request, context):  # noqa: N802
        return _call(context, self.worker.propose, request)


class TargetServicer(_WorkerServicer, rpc.pb_grpc.TargetServicer):
    def Prefill(self, request, context):  # noqa: N802
        return _call(context, self.worker.prefill, request)

    def Verify(self, request, context):  # noqa: N802
        return _call(context, self.worker.verify, request)


def serve_grpc(worker, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8):
    """Start a gRPC server (with health checking) for a DraftWorker or TargetWorker; returns (server, port)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=rpc.CHANNEL_OPTIONS)
    if isinstance(worker, DraftWorker):
        rpc.pb_grpc.add_DraftServicer_to_server(DraftServicer(worker), server)
        service = "gsd.v1.Draft"
    else:
        rpc.pb_grpc.add_TargetServicer_to_server(TargetServicer(worker), server)
        service = "gsd.v1.Target"
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind gRPC server on {host}:{port}")
    server.start()
    hs.set(service, health_pb2.HealthCheckResponse.SERVING)
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound
