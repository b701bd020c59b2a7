"""One rank of a tensor-parallel target: its model shard, a runner over it, and its sequences' caches.

The same class runs in every transport: inside a spawned process (pipes), as a Ray actor, or in the
caller's own process (rank 0 of the pipe transport). Commands arrive as (op, *args) with numpy arrays,
so they cross a pipe or Ray's object store unchanged; rank 0 answers a forward with the logits.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..runner import ModelRunner
from .sharding import TPGroup, load_shard, shard_model

AUDIT_ENV = "GSD_SERVE_TP_AUDIT_LOAD"


class LoadAudit(TorchDispatchMode):
    """Records, per dtype, the largest tensor any op creates while a rank loads (set GSD_SERVE_TP_AUDIT_LOAD=1).

    Every tensor the load makes (the checkpoint's bytes, slices, dtype conversions, packed weights) comes out
    of an op, so this is the evidence that a bf16 load never holds an fp32 copy of a weight (tests).
    Tensors on the meta device hold no memory and are not counted."""

    def __init__(self):
        super().__init__()
        self.largest: dict[str, tuple[int, str]] = {}     # dtype name -> (numel, op)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                name = str(t.dtype).removeprefix("torch.")
                if t.numel() > self.largest.get(name, (-1, ""))[0]:
                    self.largest[name] = (t.numel(), str(func))
        return out


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
        audit = LoadAudit() if os.environ.get(AUDIT_ENV, "0").lower() not in ("0", "", "false", "no", "off") \
            else None
        with audit if audit is not None else nullcontext():
            if model is not None:   # rank 0 of an already loaded model: shard it in place
                model = shard_model(model.to(dtype), rank, world, self.group)
                model.tp_loaded_from = "model"
            else:
                model = load_shard(source, rank, world, self.group, dtype)
            # the lean forward and the packed CPU linears work on a shard as on a whole model
            self.runner = ModelRunner(model.to(self.device))
        # what this rank holds, for the transport to report (PipeTransport.rank_info)
        self.load_info = {
            "rank": rank, "loaded_from": getattr(model, "tp_loaded_from", None),
            "tensors": {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape))
                        for n, t in [*model.named_parameters(), *model.named_buffers()]},
            "largest_created": None if audit is None else dict(audit.largest),
        }
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
