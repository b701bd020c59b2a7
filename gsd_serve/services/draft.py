"""The Draft deployment: a gsd_serve.serving.draft_worker.DraftWorker served over gRPC (gsd.v1.Draft) by each replica."""
from __future__ import annotations

from ray import serve

from .common import GrpcReplica, env_setup, load_models, session_bytes


class DraftReplica(GrpcReplica):
    kind = "draft"

    def __init__(self, args: dict | None = None):
        args = dict(args or {})
        self.threads = env_setup(args, "draft")   # before torch is imported (OpenMP reads its settings once)
        from ..serving.draft_worker import DraftWorker

        from ..serving.threads import MODEL_THREAD

        def build() -> DraftWorker:    # on the thread every forward will run on (one OpenMP team)
            model, ids = load_models(args, "draft")
            return DraftWorker(model, ids, name=str(args.get("draft", "default")),
                               max_sessions=int(args.get("max_sessions", 64)),
                               ttl_s=float(args.get("session_ttl_s", 300)), device=args.get("draft_device"),
                               max_session_bytes=session_bytes(args), max_batch=int(args.get("draft_max_batch", 64)))

        self._serve(MODEL_THREAD.run(build), args, "draft_grpc_port")


Draft = serve.deployment(DraftReplica, name="Draft", ray_actor_options={"num_cpus": 0},
                         max_ongoing_requests=100, health_check_period_s=5)
