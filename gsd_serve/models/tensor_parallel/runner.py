"""The tensor-parallel runner: ModelRunner's interface over a model sharded across N ranks.

`TensorParallelRunner` has `new_cache`, `forward`, `vocab_size`, `output_ids` and `to_full_ids`, so the
engine and the target worker use it unchanged. Every forward and cache operation is one command sent to
all ranks at once by a transport; the ranks run it in lockstep (the all-reduces inside the model are the
only collectives) and rank 0 returns the logits. Two transports exist, and only they differ:

- `PipeTransport` (pipes.py): rank 0 in the calling process, ranks 1..N-1 spawned processes fed over pipes
  (`gsd-serve generate --tensor-parallel-size N`, tests);
- `RayTransport` (ray_actors.py): every rank a Ray actor in one STRICT_PACK placement group (a Serve
  replica that spans a node's GPUs).

A dead or failing rank makes the call raise TensorParallelError; the runner is then unusable: close it
and build a new one.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import torch

from .sharding import TensorParallelError


class ShardedCache:
    """A handle to one sequence's KV cache on every rank; `length`, `truncate` and `keep` behave as
    KVCache's (the length is mirrored here, the operations run on the ranks)."""

    def __init__(self, runner: "TensorParallelRunner", cid: int):
        self._runner, self.id, self.length = runner, cid, 0

    def truncate(self, length: int) -> None:
        self._runner._call("truncate", self.id, int(length))
        self.length = min(self.length, int(length))

    def keep(self, start: int, positions) -> None:
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.numel() and (int(positions.min()) < start or int(positions.max()) >= self.length):
            raise IndexError(f"keep({start}, ...): positions outside [{start}, {self.length})")
        self._runner._call("keep", self.id, int(start), positions.numpy())
        self.length = start + positions.numel()


class TensorParallelRunner:
    """A target sharded over the ranks of `transport` (PipeTransport or RayTransport)."""

    def __init__(self, transport):
        self.transport = transport
        self.tp_size = transport.world
        self.vocab_size = transport.vocab_size
        self.dtype = transport.dtype
        self.output_ids = None
        self.forwards = 0
        self.tokens_fed = 0
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._freed: list[int] = []

    def new_cache(self) -> ShardedCache:
        with self._lock:
            cache = ShardedCache(self, next(self._ids))
            self._call("new", cache.id)
            weakref.finalize(cache, self._freed.append, cache.id)
            return cache

    def forward(self, cache: ShardedCache, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [n, V] (or [1, V] with last_only) for `tokens` after the cache, as ModelRunner.forward."""
        if not isinstance(cache, ShardedCache) or cache._runner is not self:
            raise TypeError("pass a cache made by this runner's new_cache()")
        n = tokens.numel()
        if positions is None:
            positions = torch.arange(cache.length, cache.length + n)
        if mask is not None and tuple(mask.shape) != (1, 1, n, cache.length + n):
            raise ValueError(f"mask shape {tuple(mask.shape)}, expected {(1, 1, n, cache.length + n)}")
        with self._lock:
            out = self._call("forward", cache.id, tokens.reshape(-1).long().cpu().numpy(),
                             positions.reshape(-1).long().cpu().numpy(),
                             None if mask is None else mask.cpu().numpy(), bool(last_only))
            cache.length += n
            self.forwards += 1
            self.tokens_fed += n
            return torch.from_numpy(out)

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    @property
    def alive(self) -> bool:
        return self.transport.alive

    def check_health(self) -> None:
        """Raise TensorParallelError if the runner is closed or broken or a rank has died."""
        with self._lock:
            self.transport.check_health()

    def close(self) -> None:
        with self._lock:
            self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, op: str, *args):
        with self._lock:
            while self._freed:    # caches whose handles were dropped: free them on the ranks first
                self.transport.call("free", self._freed.pop())
            return self.transport.call(op, *args)


__all__ = ["ShardedCache", "TensorParallelRunner", "TensorParallelError"]
