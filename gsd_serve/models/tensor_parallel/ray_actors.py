"""The Ray transport: every rank, rank 0 included, a Ray actor in one STRICT_PACK placement group.

The caller (a Serve replica, say) is a thin proxy: each command goes to all rank actors at once and
rank 0's answer comes back. CPU bundles by default, GPU bundles with `gpus_per_rank=1`. A dead rank
(RayActorError) or a call that takes longer than `timeout_s` marks the transport broken; `close()` kills
the actors and removes the placement group it created. Needs a running Ray; `gsd_serve` must be
importable by the workers.
"""
from __future__ import annotations

import uuid

import torch

from .rank import Rank
from .sharding import TensorParallelError, check_tp_size, model_config

RANK_ACTOR_PREFIX = "gsd-tp-"


class RankActor:
    """A Rank behind a Ray actor (one GPU per actor, seen as cuda:0)."""

    def __init__(self, rank: int, world: int, source, threads: int, dtype: torch.dtype):
        import warnings
        warnings.filterwarnings("ignore")
        torch.set_num_threads(threads)
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.rank = Rank(rank, world, source, device, dtype)

    def address(self, timeout_s: float) -> tuple[str, int]:
        import ray
        ip = ray.util.get_node_ip_address()
        return ip, self.rank.host_store(timeout_s, host=ip)

    def join(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        self.rank.join(backend, host, port, timeout_s)

    def vocab_size(self) -> int:
        return self.rank.vocab_size

    def execute(self, op: str, *args):
        return self.rank.execute(op, *args)

    def shutdown(self) -> None:
        self.rank.leave()


class RayTransport:
    """`source`: a model spec or a picklable callable returning the model. `placement_group`: an existing
    one with `tp_size` bundles (e.g. the Serve replica's own: the replica itself then runs in bundle 0 and
    must reserve nothing there, or pass `bundle_offset=1` with tp_size + 1 bundles); otherwise one is
    created (and removed by `close()`). Rank r goes to bundle `bundle_offset + r`."""

    def __init__(self, source, tp_size: int, *, gpus_per_rank: float = 0, cpus_per_rank: float = 1,
                 placement_group=None, bundle_offset: int = 0, backend: str | None = None,
                 timeout_s: float = 120.0, startup_timeout_s: float = 600.0, dtype: torch.dtype = torch.float32):
        import ray
        from ray.util.placement_group import placement_group as make_pg
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        config = model_config(source)
        if config is not None:
            check_tp_size(config, tp_size)
        self.world, self.timeout_s, self.dtype = tp_size, timeout_s, dtype
        self.backend = backend or ("nccl" if gpus_per_rank else "gloo")
        self._broken: str | None = None
        self._closed = False
        self.uid = uuid.uuid4().hex[:12]
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        self._own_pg = placement_group is None
        self.placement_group = placement_group or make_pg([dict(bundle) for _ in range(tp_size)],
                                                          strategy="STRICT_PACK")
        self.actors = []
        try:
            if not self.placement_group.wait(startup_timeout_s):
                raise TensorParallelError(f"the placement group of {tp_size} bundles {bundle} was not "
                                          f"scheduled within {startup_timeout_s:.0f}s (STRICT_PACK: one node)")
            actor_cls = ray.remote(RankActor)
            threads = max(1, int(cpus_per_rank))
            for rank in range(tp_size):
                strategy = PlacementGroupSchedulingStrategy(self.placement_group,
                                                            placement_group_bundle_index=bundle_offset + rank)
                self.actors.append(actor_cls.options(
                    name=f"{RANK_ACTOR_PREFIX}{self.uid}-rank{rank}",   # findable by operators (and tests)
                    num_cpus=cpus_per_rank, num_gpus=gpus_per_rank, scheduling_strategy=strategy,
                    max_restarts=0).remote(rank, tp_size, source, threads, dtype))
            host, port = ray.get(self.actors[0].address.remote(timeout_s), timeout=startup_timeout_s)
            ray.get([a.join.remote(host, port, self.backend, timeout_s) for a in self.actors],
                    timeout=startup_timeout_s)
            self.vocab_size = ray.get(self.actors[0].vocab_size.remote(), timeout=timeout_s)
        except BaseException as exc:
            self._teardown()
            if isinstance(exc, ray.exceptions.RayError):
                raise TensorParallelError(f"tensor-parallel ranks failed to start: {exc}") from exc
            raise

    @property
    def alive(self) -> bool:
        return not self._closed and self._broken is None

    def _check(self) -> None:
        if self._closed:
            raise TensorParallelError("the tensor-parallel runner is closed")
        if self._broken is not None:
            raise TensorParallelError(self._broken)

    def call(self, op: str, *args):
        import ray
        self._check()
        refs = [a.execute.remote(op, *args) for a in self.actors]
        try:
            return ray.get(refs, timeout=self.timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            self._broken = (f"tensor-parallel {op} did not finish within {self.timeout_s:.0f}s (a rank hangs); "
                            "close this runner and start a new one")
        except ray.exceptions.RayActorError as exc:
            dead = []
            for rank, r in enumerate(refs):
                try:
                    ray.get(r, timeout=0.5)
                except ray.exceptions.RayActorError:
                    dead.append(rank)
                except Exception:
                    pass
            self._broken = (f"tensor-parallel rank(s) {dead or '?'} died during {op}: "
                            f"{str(exc).splitlines()[0]}; close this runner and start a new one")
        except ray.exceptions.RayError as exc:
            self._broken = f"tensor-parallel {op} failed on a rank: {str(exc).splitlines()[0]}"
        raise TensorParallelError(self._broken)

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raise TensorParallelError unless every rank answers (for a Serve replica's check_health)."""
        import ray
        self._check()
        try:
            ray.get([a.execute.remote("ping") for a in self.actors], timeout=timeout_s)
        except ray.exceptions.RayError as exc:
            self._broken = f"tensor-parallel rank unhealthy: {str(exc).splitlines()[0]}"
            raise TensorParallelError(self._broken) from None

    def close(self) -> None:
        """Barrier and destroy the group on the ranks, then kill the actors and remove the placement group."""
        import ray
        if self._closed:
            return
        self._closed = True
        if self._broken is None:
            try:
                ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
            except Exception:
                pass
        self._teardown()

    def _teardown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self._own_pg:
            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass
