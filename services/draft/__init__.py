"""The Draft deployment: a gsd_serve.workers.DraftWorker served over gRPC (gsd.v1.Draft) by each replica."""
from __future__ import annotations

from ray import serve

from services.common import Heartbeat, advertise_host, env_setup, load_models


class DraftReplica:
    def __init__(self, args: dict | None = None):
        env_setup()
        from gsd_serve.workers import DraftWorker, serve_grpc

        args = dict(args or {})
        model, ids = load_models(args, "draft")
        self.worker = DraftWorker(model, ids, name=str(args.get("draft", "default")),
                                  max_sessions=int(args.get("max_sessions", 64)),
                                  ttl_s=float(args.get("session_ttl_s", 300)), device=args.get("draft_device"))
        bind, host = advertise_host(str(args.get("grpc_host", "127.0.0.1")))
        self.server, port = serve_grpc(self.worker, bind, int(args.get("draft_grpc_port", 0)))
        self.address = f"{host}:{port}"
        self.heartbeat = Heartbeat("draft", self.worker.replica_id, self.address)

    def endpoint(self) -> str:
        return self.address

    def check_health(self) -> None:
        if self.heartbeat._stop.is_set():
            raise RuntimeError("stopped")

    def __del__(self):
        try:
            self.heartbeat.stop()
            self.server.stop(grace=1)
        except Exception:  # noqa: BLE001
            pass


Draft = serve.deployment(DraftReplica, name="Draft", ray_actor_options={"num_cpus": 0},
                         max_ongoing_requests=100, health_check_period_s=5)
