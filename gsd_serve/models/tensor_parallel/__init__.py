"""Tensor parallelism: one runner, two transports (pipes to spawned processes, or Ray actors).

sharding.py splits a Llama-like model over ranks (column/row-parallel linears, all-reduce); rank.py is
what runs on every rank; runner.py is the runner the engine and the target worker call; pipes.py and
ray_actors.py carry its commands to the ranks. Imports Ray only in ray_actors.py.
"""
from __future__ import annotations

import torch

from .pipes import PipeTransport
from .runner import ShardedCache, TensorParallelRunner
from .sharding import (TensorParallelError, TensorParallelSizeError, TPGroup, check_spec_tp_size, check_tp_size,
                       load_shard, shard_model, valid_tp_sizes)


def make_target_runner(spec: str, tp_size: int = 1, model=None, *, transport: str = "pipes", **kwargs):
    """The target runner for a model spec: a ModelRunner at tp_size 1, else a TensorParallelRunner whose
    ranks are processes (transport="pipes") or Ray actors ("ray"). Refuses (TensorParallelSizeError, a
    ValueError) a size that does not divide the heads, before starting anything."""
    from ..dtypes import resolve_dtype

    kwargs["dtype"] = resolve_dtype(kwargs.get("dtype", torch.float32))
    if tp_size == 1 and transport == "pipes":
        from ..checkpoints import load_model
        from ..runner import ModelRunner
        return ModelRunner(model if model is not None else load_model(spec, kwargs["dtype"]))
    if transport == "ray":
        from .ray_actors import RayTransport
        return TensorParallelRunner(RayTransport(spec, tp_size, **kwargs))
    if transport != "pipes":
        raise ValueError(f"unknown tensor-parallel transport {transport!r} (pipes or ray)")
    return TensorParallelRunner(PipeTransport(spec, tp_size, model=model, **kwargs))


__all__ = ["PipeTransport", "ShardedCache", "TensorParallelRunner", "TensorParallelError", "TensorParallelSizeError",
           "TPGroup", "check_spec_tp_size", "check_tp_size", "load_shard", "make_target_runner", "shard_model",
           "valid_tp_sizes"]
