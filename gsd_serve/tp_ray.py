"""Tensor-parallel target ranks as Ray actors in one STRICT_PACK placement group.

`RayTensorParallelRunner` has the runner interface (`new_cache`, `forward`, `vocab_size`, `output_ids`,
`to_full_ids`, `close`) of `gsd_serve.tensor_parallel.TensorParallelRunner`, but every rank, rank 0
included, is a Ray actor placed in one placement group of N bundles (STRICT_PACK: all on one node; CPU
bundles by default, GPU bundles with `gpus_per_rank=1`). The caller (a Serve replica, say) is a thin proxy:
each forward and cache operation is sent to all ranks at once, the ranks run it in lockstep (all-reduces
over gloo or NCCL), and rank 0 returns the logits. A dead rank (RayActorError) or a call that takes longer
than `timeout_s` raises `TensorParallelError`; the runner is then unusable: close it (which kills the
actors and removes the placement group) and build a new one.

Needs a running Ray (`ray.init()` or inside a Ray job); `gsd_serve` must be importable by the workers.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import uuid

import torch

from .tensor_parallel import TensorParallelError, TPGroup, _model_config, check_tp_size, load_shard


RANK_ACTOR_PREFIX = "gsd-tp-"


class _Rank:
    """One rank: the model shard, this rank's caches, a member of the gloo/NCCL group."""

    def __init__(self, rank: int, world: int, source, threads: int):
        import warnings
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.group = TPGroup()
        self.model = load_shard(source, rank, world, self.group).to(self.device)
        self.caches = {}
        self._store = None

    def address(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0 hosts the group's store; returns its (ip, port)."""
        import ray
        ip = ray.util.get_node_ip_address()
        self._store = TPGroup.host_store(self.world, timeout_s, host=ip)
        return ip, self._store.port

    def join(self, host: str, port: int, backend: str, timeout_s: float) -> int:
        if self.world > 1:
            self.group.connect(backend, host, port, self.rank, self.world, timeout_s, self.device,
                               store=self._store)
        return self.rank

    def ping(self) -> int:
        return self.rank

    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @torch.inference_mode()
    def forward(self, cid: int, tokens, positions, mask, last_only: bool):
        from .kv_cache import KVCache
        cache = self.caches.setdefault(cid, KVCache())
        tokens = torch.as_tensor(tokens).to(self.device)
        positions = torch.as_tensor(positions).to(self.device)
        mask = None if mask is None else torch.as_tensor(mask).to(self.device)
        hidden = self.model.base_model(input_ids=tokens.view(1, -1), position_ids=positions.view(1, -1),
                                       attention_mask=mask, past_key_values=cache,
                                       use_cache=True).last_hidden_state[0]
        if self.rank != 0:
            return None
        if last_only:
            hidden = hidden[-1:]
        return self.model.get_output_embeddings()(hidden).float().cpu().numpy()

    @torch.inference_mode()
    def cache_op(self, cid: int, op: str, *args) -> None:
        if op == "free":
            self.caches.pop(cid, None)
            return
        cache = self.caches.get(cid)
        if cache is not None:
            getattr(cache, op)(*[torch.as_tensor(a) if not isinstance(a, int) else a for a in args])

    def shutdown(self) -> None:
        if self.group.pg is not None:
            self.group.barrier()
            self.group.shutdown()


class RayShardedCache:
    """A handle to one sequence's cache on every rank (the proxy mirrors its length)."""

    def __init__(self, runner: "RayTensorParallelRunner", cid: int):
        self._runner, self.id, self.length = runner, cid, 0

    def truncate(self, length: int) -> None:
        self._runner._cache_op(self, "truncate", int(length))
        self.length = min(self.length, int(length))

    def keep(self, start: int, positions) -> None:
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.numel() and (int(positions.min()) < start or int(positions.max()) >= self.length):
            raise IndexError(f"keep({start}, ...): positions outside [{start}, {self.length})")
        self._runner._cache_op(self, "keep", int(start), positions.numpy())
        self.length = start + positions.numel()


class RayTensorParallelRunner:
    """A target sharded over `tp_size` Ray actors in a STRICT_PACK placement group (see the module doc).

    `source`: a model spec for `gsd_serve.models.load_model` or a picklable callable returning the model.
    `placement_group`: an existing one with `tp_size` bundles (e.g. the Serve replica's own: the replica
    itself then runs in bundle 0 and must reserve nothing there, or pass `bundle_offset=1` with tp_size + 1
    bundles); otherwise one is created (and removed by `close()`). Rank r goes to bundle `bundle_offset + r`.
    """

    def __init__(self, source, tp_size: int, *, gpus_per_rank: float = 0, cpus_per_rank: float = 1,
                 placement_group=None, bundle_offset: int = 0, backend: str | None = None,
                 timeout_s: float = 120.0, startup_timeout_s: float = 600.0):
        import ray
        from ray.util.placement_group import placement_group as make_pg
        from ray.util.placement_group import remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        config = _model_config(source)
        if config is not None:
            check_tp_size(config, tp_size)
        self.tp_size, self.timeout_s = tp_size, timeout_s
        self.backend = backend or ("nccl" if gpus_per_rank else "gloo")
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._freed: list[int] = []
        self._broken: str | None = None
        self._closed = False
        self.forwards = self.tokens_fed = 0
        self.output_ids = None
        self.uid = uuid.uuid4().hex[:12]
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        self._own_pg = placement_group is None
        self.placement_group = placement_group or make_pg([dict(bundle) for _ in range(tp_size)],
                                                          strategy="STRICT_PACK")
        self._remove_pg = remove_placement_group
        self.actors = []
        try:
            if not self.placement_group.wait(startup_timeout_s):
                raise TensorParallelError(f"the placement group of {tp_size} bundles {bundle} was not "
                                          f"scheduled within {startup_timeout_s:.0f}s (STRICT_PACK: one node)")
            actor_cls = ray.remote(_Rank)
            threads = max(1, int(cpus_per_rank))
            for rank in range(tp_size):
                strategy = PlacementGroupSchedulingStrategy(self.placement_group,
                                                            placement_group_bundle_index=bundle_offset + rank)
                self.actors.append(actor_cls.options(
                    name=f"{RANK_ACTOR_PREFIX}{self.uid}-rank{rank}",   # findable by operators (and tests)
                    num_cpus=cpus_per_rank, num_gpus=gpus_per_rank, scheduling_strategy=strategy,
                    max_restarts=0).remote(rank, tp_size, source, threads))
            host, port = ray.get(self.actors[0].address.remote(timeout_s), timeout=startup_timeout_s)
            ray.get([a.join.remote(host, port, self.backend, timeout_s) for a in self.actors],
                    timeout=startup_timeout_s)
            self.vocab_size = ray.get(self.actors[0].vocab_size.remote(), timeout=timeout_s)
        except BaseException as exc:
            self._teardown()
            if isinstance(exc, ray.exceptions.RayError):
                raise TensorParallelError(f"tensor-parallel ranks failed to start: {exc}") from exc
            raise

    # ---------------------------------------------------------------- runner interface

    def new_cache(self) -> RayShardedCache:
        with self._lock:
            self._check()
            cache = RayShardedCache(self, next(self._ids))
            weakref.finalize(cache, self._freed.append, cache.id)
            return cache

    def forward(self, cache: RayShardedCache, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        if not isinstance(cache, RayShardedCache) or cache._runner is not self:
            raise TypeError("pass a cache made by this runner's new_cache()")
        with self._lock:
            self._check()
            n = tokens.numel()
            if positions is None:
                positions = torch.arange(cache.length, cache.length + n)
            if mask is not None and tuple(mask.shape) != (1, 1, n, cache.length + n):
                raise ValueError(f"mask shape {tuple(mask.shape)}, expected {(1, 1, n, cache.length + n)}")
            args = (cache.id, tokens.reshape(-1).long().numpy(), positions.reshape(-1).long().numpy(),
                    None if mask is None else mask.numpy(), last_only)
            out = self._call_all("forward", *args)
            cache.length += n
            self.forwards += 1
            self.tokens_fed += n
            return torch.from_numpy(out[0])

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    @property
    def alive(self) -> bool:
        return not self._closed and self._broken is None

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raise TensorParallelError unless every rank answers (for a Serve replica's check_health)."""
        import ray
        with self._lock:
            self._check()
            try:
                ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)
            except ray.exceptions.RayError as exc:
                self._broken = f"tensor-parallel rank unhealthy: {str(exc).splitlines()[0]}"
                raise TensorParallelError(self._broken) from None

    def close(self) -> None:
        """Barrier and destroy the group on the ranks, then kill the actors and remove the placement group."""
        import ray
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._broken is None:
                try:
                    ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
                except Exception:
                    pass
            self._teardown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _cache_op(self, cache: RayShardedCache, op: str, *args) -> None:
        with self._lock:
            self._check()
            self._call_all("cache_op", cache.id, op, *args)

    def _check(self) -> None:
        if self._closed:
            raise TensorParallelError("the tensor-parallel runner is closed")
        if self._broken is not None:
            raise TensorParallelError(self._broken)

    def _call_all(self, method: str, *args):
        import ray
        while self._freed:
            cid = self._freed.pop()
            self._call_all("cache_op", cid, "free")
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._broken = (f"tensor-parallel {method} did not finish within {self.timeout_s:.0f}s (a rank hangs); "
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
            self._broken = (f"tensor-parallel rank(s) {dead or '?'} died during {method}: "
                            f"{str(exc).splitlines()[0]}; close this runner and start a new one")
        except ray.exceptions.RayError as exc:
            self._broken = f"tensor-parallel {method} failed on a rank: {str(exc).splitlines()[0]}"
        raise TensorParallelError(self._broken)

    def _teardown(self) -> None:
        import ray
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self._own_pg:
            try:
                self._remove_pg(self.placement_group)
            except Exception:
                pass


def make_ray_target_runner(spec: str, tp_size: int, **kwargs) -> RayTensorParallelRunner:
    """The Ray form of `make_target_runner`: ranks as actors in a STRICT_PACK placement group."""
    return RayTensorParallelRunner(spec, tp_size, **kwargs)
