"""What the deployments share: configuration, model loading and the replica registry.

Draft and target replicas serve gRPC on their own ports; the router finds them through a registry, a
small detached Ray actor per application that the replicas heartbeat to (so routing does not depend on
Redis: a Redis outage only costs prefix-cache hits).
"""
from __future__ import annotations

import logging
import os
import threading
import time

import ray

log = logging.getLogger("gsd_serve.services")

REGISTRY_NAMESPACE = "gsd-serve"
HEARTBEAT_S = 1.0
MAX_AGE_S = 4.0


class Registry:
    """kind -> replicas {replica_id: (address, actor_name, last heartbeat)}, and the application's worker
    secret (made here, handed to replicas with each heartbeat and to routers with each discovery)."""

    def __init__(self):
        from ..serving.auth import new_secret

        self.entries: dict[str, dict] = {}
        self.token = new_secret()

    def register(self, kind: str, replica_id: str, address: str, actor_name: str = "") -> str:
        """Record a heartbeat; returns the worker secret the replica must require."""
        self.entries[replica_id] = {"kind": kind, "replica_id": replica_id, "address": address,
                                    "actor_name": actor_name, "ts": time.time()}
        return self.token

    def view(self) -> dict:
        """What a router needs: the live replicas and the secret their calls must carry."""
        return {"entries": self.list(), "token": self.token}

    def unregister(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)

    def list(self, kind: str | None = None, max_age_s: float = MAX_AGE_S) -> list[dict]:
        now = time.time()
        for rid in [r for r, e in self.entries.items() if now - e["ts"] > 10 * max_age_s]:
            del self.entries[rid]
        return [dict(e) for e in self.entries.values()
                if (kind is None or e["kind"] == kind) and now - e["ts"] <= max_age_s]


def new_secret_placeholder() -> str:
    """A secret nobody knows, held until the registry's arrives."""
    from ..serving.auth import new_secret

    return new_secret()


def registry_name(app: str) -> str:
    return f"gsd-registry:{app}"


def get_registry(app: str):
    """The application's registry actor (made by whichever replica asks first). It is scheduled outside any
    placement group: made from a tensor-parallel target replica it would otherwise be captured by that
    replica's group and die with it when Serve replaces the replica."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(Registry).options(name=registry_name(app), namespace=REGISTRY_NAMESPACE,
                                        lifetime="detached", get_if_exists=True, num_cpus=0,
                                        scheduling_strategy=PlacementGroupSchedulingStrategy(None)).remote()


class RegistryView:
    """Calls on the application's registry that survive its loss: after a failed call the next one looks the
    actor up again (or makes it anew), and the replicas' heartbeats fill it within a second."""

    def __init__(self, app: str):
        self.app = app
        self.actor = get_registry(app)

    def _again(self) -> None:
        try:
            self.actor = get_registry(self.app)
        except Exception as exc:  # noqa: BLE001 (Ray is restarting: the next call tries again)
            log.warning("registry lookup failed: %s", exc)

    async def view(self) -> dict:
        try:
            return await self.actor.view.remote()
        except Exception:
            self._again()
            raise

    def list(self, kind: str, timeout_s: float = 10) -> list[dict]:
        try:
            return ray.get(self.actor.list.remote(kind), timeout=timeout_s)
        except Exception:
            self._again()
            raise


def app_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().app_name or "default"
    except Exception:  # noqa: BLE001
        return "default"


def advertise_host(bind: str) -> tuple[str, str]:
    """(bind host, advertised host). 'auto' binds all interfaces and advertises the node's IP."""
    if bind == "auto":
        return "0.0.0.0", ray.util.get_node_ip_address()
    return bind, bind


class Heartbeat:
    """Registers a replica's gRPC address with the registry every second, until stopped."""

    def __init__(self, kind: str, replica_id: str, address: str, secret=None):
        self.kind, self.replica_id, self.address = kind, replica_id, address
        self.secret = secret      # a SharedSecret: kept equal to the registry's
        try:
            self.actor_name = ray.get_runtime_context().get_actor_name() or ""
        except Exception:  # noqa: BLE001
            self.actor_name = ""
        self.registry = get_registry(app_name())
        self._stop = threading.Event()
        self._beat(ray.get(self.registry.register.remote(kind, replica_id, address, self.actor_name)))
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"gsd-heartbeat-{kind}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat(ray.get(self.registry.register.remote(self.kind, self.replica_id, self.address,
                                                                 self.actor_name), timeout=5))
            except Exception as exc:  # noqa: BLE001 (the registry comes back; keep beating)
                log.warning("heartbeat failed: %s", exc)
                try:
                    self.registry = get_registry(app_name())
                except Exception:  # noqa: BLE001
                    pass

    def _beat(self, token: str) -> None:
        if self.secret is not None and token and token != self.secret.value:
            self.secret.value = token

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registry.unregister.remote(self.replica_id)
        except Exception:  # noqa: BLE001
            pass


def env_setup(args: dict | None = None, kind: str | None = None) -> dict:
    """Environment of a replica process, and its torch threads (serving/threads.py: the app arg
    `<kind>_torch_threads` or `torch_threads`, else $GSD_TORCH_THREADS, else the CPUs Ray gave the replica,
    else all cores). Returns {threads, why, openmp_wait} for the replica's Info."""
    from ..serving.threads import MODEL_THREAD, apply_threads, choose_threads, openmp_wait_setting

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    wait = openmp_wait_setting()
    if kind is None:     # the router: no model work
        return {}
    args = args or {}
    requested = args.get(f"{kind}_torch_threads", args.get("torch_threads"))
    try:
        assigned = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 (not in a Ray worker)
        assigned = 0.0
    n, why = choose_threads(requested, os.environ.get("GSD_TORCH_THREADS"), assigned, kind=kind)
    apply_threads(n)
    got = MODEL_THREAD.run(apply_threads, n)    # the thread that will do the model work
    log.info("%s replica: %d torch threads (%s); OpenMP %s", kind, got, why, wait)
    return {"threads": got, "why": why, "openmp_wait": wait}


def session_bytes(args: dict) -> int | None:
    """The app arg `max_session_bytes` (bytes, or a string with a GB/GiB/MB suffix); None: the worker's default
    (a quarter of the machine's memory)."""
    v = args.get("max_session_bytes")
    if v in (None, "", "auto"):
        return None
    if isinstance(v, str):
        units = {"gib": 2 ** 30, "gb": 10 ** 9, "mib": 2 ** 20, "mb": 10 ** 6}
        low = v.strip().lower()
        for suffix, mult in units.items():
            if low.endswith(suffix):
                return int(float(low[: -len(suffix)]) * mult)
        return int(float(low))
    return int(v)


def load_models(args: dict, want: str):
    """(model, output_ids) of the draft or the target named in the app args."""
    from ..models import DEFAULT_DRAFT, DEFAULT_TARGET, load_pair

    target_spec = args.get("target", DEFAULT_TARGET)
    draft_spec = args.get("draft", DEFAULT_DRAFT)
    dtype = args.get("dtype", "auto")
    if want == "target":
        from ..models.factory import apply_target_weights

        target, _, _, _ = load_pair(target_spec, None, dtype)
        return apply_target_weights(target, target_spec, args.get("target_weights", "auto"),
                                    args.get("target_device")), None
    from ..models.factory import apply_draft_weights, resolve_target_weights

    target, draft, _, ids = load_pair(target_spec, draft_spec, dtype)
    # the draft follows the target onto block weights where the target replicas (same machine, same measurement) run them
    target_weights = resolve_target_weights(target, target_spec, args.get("target_weights", "auto"),
                                            args.get("target_device"))
    del target
    return apply_draft_weights(draft, args.get("draft_weights", "auto"), target_weights), ids


class GrpcReplica:
    """What the Draft and Target replicas share: a worker served over gRPC, advertised by a heartbeat.

    `check_health` is Serve's probe: it fails once the replica stopped advertising itself or once the
    worker's runner reports a broken part (a dead tensor-parallel rank), and Serve then replaces the
    replica whole. A failing replica leaves the registry at once, so routers stop picking it.
    """

    kind = ""

    def _serve(self, worker, args: dict, port_key: str) -> None:
        from ..serving.auth import SharedSecret
        from ..serving.grpc_server import serve_grpc

        self.worker = worker
        worker.load.window_s = float(args.get("load_window_s", 10.0))
        bind, host = advertise_host(str(args.get("grpc_host", "127.0.0.1")))
        # the port refuses every call until the first heartbeat has fetched the application's secret
        self.secret = SharedSecret(new_secret_placeholder())
        self.server, port = serve_grpc(worker, bind, int(args.get(port_key, 0)), secret=self.secret)
        if getattr(worker, "drafts", None) is not None:
            worker.drafts.secret = self.secret      # its calls to draft replicas carry the application's secret
        self.address = f"{host}:{port}"
        self.heartbeat = Heartbeat(self.kind, worker.replica_id, self.address, self.secret)

    def endpoint(self) -> str:
        return self.address

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: the load this replica measures (autoscaling.py); Serve
        itself sees no requests here (the router calls the gRPC port directly)."""
        from .autoscaling import autoscaling_stats

        snap = self.worker.load_snapshot() if hasattr(self.worker, "load_snapshot") else self.worker.load.snapshot()
        return autoscaling_stats(snap)

    def load(self) -> dict:
        """The same numbers, for a driver holding a deployment handle (tests, soak checks)."""
        snap = self.worker.load_snapshot() if hasattr(self.worker, "load_snapshot") else self.worker.load.snapshot()
        return dict(snap, replica_id=self.worker.replica_id, threads=getattr(self, "threads", {}))

    def check_health(self) -> None:
        if self.heartbeat._stop.is_set():
            raise RuntimeError("stopped")
        probe = getattr(self.worker.runner, "check_health", None)
        if probe is not None:
            try:
                probe()
            except Exception:
                self.heartbeat.stop()
                raise

    def __del__(self):
        # Serve stopping the replica (downscaling, a new version): leave the registry first, so routers stop
        # picking it, then let calls in flight finish; calls after that fail over to another replica
        try:
            self.heartbeat.stop()
            self.server.stop(grace=5).wait(6)
            close = getattr(self.worker.runner, "close", None)
            if close is not None:
                close()
        except Exception:  # noqa: BLE001
            pass
