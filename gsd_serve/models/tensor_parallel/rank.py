"""One rank of a tensor-parallel target: its model shard, a runner over it, and its sequences' caches.

The same class runs in every transport: inside a spawned process (pipes), as a Ray actor, or in the
caller's own process (rank 0 of the pipe transport). Commands arrive as (op, *args) with numpy arrays,
so they cross a pipe or Ray's object store unchanged; rank 0 answers a forward with the logits.
"""
from __future__ import annotations

import numpy as np
import torch

from ..runner import ModelRunner
from .sharding import TPGroup, load_shard, shard_model


def device_for(backend: str, rank: int) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


class Rank:
    """Executes the runner's commands on this rank's shard (see TensorParallelRunner)."""

    def __init__(self, rank: int, world: int, source, device: torch.device,
                 dtype: torch.dtype = torch.float32, model: torch.nn.Module | None = None):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.group = TPGroup()
        if model is not None:   # rank 0 of an already loaded model: shard it in place
            model = shard_model(model.to(dtype), rank, world, self.group)
        else:
            model = load_shard(source, rank, world, self.group, dtype)
        # the lean forward and the packed CPU linears work on a shard as on a whole model
        self.runner = ModelRunner(model.to(self.device))
        self.caches: dict[int, object] = {}
        self._store = None

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    # group set-up ------------------------------------------------------------------
    def host_store(self, timeout_s: float, host: str = "127.0.0.1") -> int:
        """Rank 0 hosts the group's rendezvous store; returns its port."""
        self._store = TPGroup.host_store(self.world, timeout_s, host=host)
        return self._store.port

    def join(self, backend: str, host: str, port: int, timeout_s: float) -> None:
        if self.world > 1:
            self.group.connect(backend, host, port, self.rank, self.world, timeout_s, self.device,
                               store=self._store)

    def leave(self) -> None:
        """Barrier, then destroy the group (every rank is done before the store goes away)."""
        if self.group.pg is not None:
            self.group.barrier()
            self.group.shutdown()

    # commands ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, op: str, *args):
        if op == "forward":
            cid, tokens, positions, mask, last_only = args
            dev = self.device
            hidden = self.runner.hidden(self.caches[cid], torch.from_numpy(tokens).to(dev),
                                        torch.from_numpy(positions).to(dev),
                                        None if mask is None else torch.from_numpy(mask).to(dev))
            if self.rank != 0:
                return None
            return self.runner.logits(hidden[-1:] if last_only else hidden).cpu().numpy()
        if op == "new":
            self.caches[args[0]] = self.runner.new_cache()
        elif op == "free":
            self.caches.pop(args[0], None)
        elif op == "truncate":
            self.caches[args[0]].truncate(args[1])
        elif op == "keep":
            self.caches[args[0]].keep(args[1], torch.from_numpy(np.asarray(args[2])))
        elif op == "ping":
            return self.rank
        else:
            raise RuntimeError(f"unknown command {op!r}")
        return None
