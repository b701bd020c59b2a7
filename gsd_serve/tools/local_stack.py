"""A whole gsd-serve stack on this machine, and a look into it: what `gsd-serve chaos` and `gsd-serve soak`
run against, and what the serving tests use on their own Ray cluster and redis-server.

    RedisProcess     a throwaway redis-server on a loopback port (stop and start keep the port)
    LocalStack       a Ray cluster, Serve (HTTP and gRPC on free loopback ports), a redis-server and the
                     application, all on this machine; close() takes everything down
    deploy_app       deploys the gsd application on a running Serve and waits for all its replicas
    wait_healthy     polls /health until a condition holds
    AppProbe         the application's registry, workers (Info over authenticated gRPC) and router stats

Everything is bounded in time and talks to loopback addresses only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

from ..serving.serve_config import free_port


class RedisProcess:
    """A throwaway redis-server on a loopback port; stop() and start() keep the port."""

    def __init__(self, port: int, workdir: str):
        self.port, self.workdir, self.proc = port, workdir, None
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> None:
        import redis

        if self.proc is not None:
            return
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None


def wait_healthy(base_url: str, ready, timeout_s: float, *, poll_s: float = 0.5, alive=None,
                 what: str = "the application") -> None:
    """Poll `base_url`/health until `ready(health)` holds; `alive()` (if given) raises when what is being
    waited for has died, and a TimeoutError ends the wait after `timeout_s`."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None:
            alive()
        try:
            if ready(httpx.get(base_url + "/health", timeout=10).json()):
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {timeout_s:.0f}s")
        time.sleep(poll_s)


def deploy_app(app_name: str, args: dict, base_url: str, drafts: int, targets: int, timeout_s: float = 600) -> None:
    """Deploy the gsd application and wait until the router sees all its replicas."""
    from ray import serve

    from ..services.app import build_app

    args = dict(args, replicas={"draft": drafts, "target": targets})
    serve.run(build_app(args), name=app_name, route_prefix="/")
    wait_healthy(base_url, lambda h: h.get("draft_replicas") == drafts and h.get("target_replicas") == targets,
                 timeout_s)


class AppProbe:
    """The application's registry, workers and router, as seen from the driver of its Ray cluster."""

    def __init__(self, app_name: str):
        self.app_name = app_name

    def _registry(self):
        import ray

        from ..services.common import REGISTRY_NAMESPACE, registry_name

        return ray.get_actor(registry_name(self.app_name), namespace=REGISTRY_NAMESPACE)

    def view(self) -> dict:
        import ray

        return ray.get(self._registry().view.remote(), timeout=30)

    def metadata(self) -> tuple:
        from ..serving.auth import METADATA_KEY, bearer

        return ((METADATA_KEY, bearer(self.view()["token"])),)

    def workers(self, kind: str | None = None) -> list[dict]:
        """The registered workers that answer Info: {kind, replica_id, address, actor_name, info}."""
        import grpc

        from ..serving.rpc import pb, pb_grpc

        view = self.view()
        md = ((("authorization", f"Bearer {view['token']}"),))
        out = []
        for e in view["entries"]:
            if kind is not None and e["kind"] != kind:
                continue
            with grpc.insecure_channel(e["address"]) as ch:
                stub = (pb_grpc.DraftStub if e["kind"] == "draft" else pb_grpc.TargetStub)(ch)
                try:
                    info = stub.Info(pb.InfoRequest(), timeout=10, metadata=md)
                except grpc.RpcError:     # killed a moment ago: its entry ages out with its heartbeat
                    continue
            out.append(dict(e, info=info))
        return out

    def router_stats(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("Router", self.app_name).stats.remote().result(timeout_s=60)

    def sessions_held(self) -> int:
        return sum(len(w["info"].session_ids) for w in self.workers())

    def kill(self, kind: str) -> dict:
        """Kill one replica of `kind` (the busiest: the one holding most sessions); returns its entry."""
        import ray

        victims = sorted(self.workers(kind), key=lambda w: -len(w["info"].session_ids))
        if not victims:
            raise RuntimeError(f"no live {kind} replica to kill")
        victim = victims[0]
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
        return victim

    def wait_replicas(self, kind: str, n: int, gone: str | None, timeout_s: float) -> float:
        """Seconds until n replicas of `kind` (none of them `gone`) answer; TimeoutError after timeout_s."""
        t0 = time.monotonic()
        while True:
            live = [w for w in self.workers(kind) if w["replica_id"] != gone]
            if len(live) >= n:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{len(live)} of {n} {kind} replicas after {timeout_s:.0f}s")
            time.sleep(0.25)

    def wait_idle(self, timeout_s: float = 120.0) -> dict:
        """Once the load stopped: wait until no session is held and nothing is in flight; the final counts."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.router_stats()
            held = self.sessions_held()
            if (held == 0 and stats["inflight"] == 0 and stats["runs"] == 0) or time.monotonic() > deadline:
                return {"sessions_held": held, "inflight": stats["inflight"], "runs": stats["runs"]}
            time.sleep(0.25)

    def memory(self) -> dict[str, tuple[int, int]]:
        """{process: (pid, resident bytes)} of the router and every worker."""
        out = {}
        stats = self.router_stats()
        out["router"] = (stats["pid"], stats["rss_bytes"])
        for w in self.workers():
            out[f"{w['kind']}:{w['replica_id']}"] = (w["info"].pid, w["info"].rss_bytes)
        return out

    def prefix_hits(self) -> dict[str, int]:
        return {w["replica_id"]: w["info"].prefix_cache_hits for w in self.workers("target")}


class LocalStack:
    """A Ray cluster, Serve (HTTP and gRPC on free loopback ports), a redis-server and the application with
    `drafts` + `targets` replicas, all on this machine; `probe` looks into it, `close()` takes everything down."""

    APP = "gsd"

    def __init__(self, args: dict, drafts: int = 2, targets: int = 2, workdir: str = "/tmp"):
        self.redis = RedisProcess(free_port(), workdir)
        self.redis.start()
        try:
            self._start(args, drafts, targets)
        except BaseException:
            self.close()      # a half-started stack leaves no redis-server or Ray cluster behind
            raise

    def _start(self, args: dict, drafts: int, targets: int) -> None:
        import ray
        from ray import serve

        from ..serving.serve_config import GRPC_SERVICER_FUNCTIONS, SLOW_START_ENV

        http_port, grpc_port = free_port(), free_port()
        for k, v in SLOW_START_ENV.items():
            os.environ.setdefault(k, v)
        env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "GSD_TORCH_THREADS",
                                          *SLOW_START_ENV) if k in os.environ}
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        self.base_url = f"http://127.0.0.1:{http_port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.args = dict(args, redis_url=self.redis.url)
        self.drafts, self.targets = drafts, targets
        deploy_app(self.APP, self.args, self.base_url, drafts, targets)
        self.probe = AppProbe(self.APP)

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            self.redis.stop()
