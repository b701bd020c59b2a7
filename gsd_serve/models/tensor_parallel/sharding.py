"""Splitting a Llama-like model over tensor-parallel ranks (gpt-fast style) and the ranks' communicator.

q/k/v and gate/up are column-parallel (each rank holds whole attention heads and KV heads, and a slice
of the MLP); o_proj and down_proj are row-parallel, followed by an all-reduce (gloo on CPU, NCCL on
GPUs). The embedding is replicated; only rank 0 applies the output layer. Each rank's KV cache holds its
own heads, so tree masks, explicit positions and in-place compaction work unchanged on every rank.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class TensorParallelError(RuntimeError):
    """A rank died or failed; the runner is unusable and must be closed and rebuilt."""


class TensorParallelSizeError(ValueError):
    """The tensor-parallel size does not fit the model (refused at start-up)."""


# --------------------------------------------------------------------------------------------- sizes

def _head_counts(config) -> tuple[int, int]:
    config = getattr(config, "text_config", None) or config
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return heads, kv


def valid_tp_sizes(config) -> list[int]:
    """Tensor-parallel sizes that divide both the attention heads and the KV heads."""
    heads, kv = _head_counts(config)
    return [n for n in range(1, heads + 1) if heads % n == 0 and kv % n == 0]


def check_tp_size(config, tp_size: int) -> None:
    """Refuse a size that does not split the heads evenly, naming the sizes that would."""
    heads, kv = _head_counts(config)
    ok = valid_tp_sizes(config)
    if not isinstance(tp_size, int) or tp_size < 1:
        raise TensorParallelSizeError(f"tensor-parallel size must be an integer >= 1, got {tp_size!r}")
    if tp_size not in ok:
        raise TensorParallelSizeError(
            f"tensor-parallel size {tp_size} does not divide the model's {heads} attention heads and {kv} KV "
            f"heads; sizes that work for this model: {', '.join(map(str, ok))}")


def model_config(source):
    """The config of a model spec (None for a callable source)."""
    if isinstance(source, str):
        from transformers import AutoConfig

        from ..checkpoints import resolve
        return AutoConfig.from_pretrained(resolve(source), local_files_only=True)
    return None


def check_spec_tp_size(spec: str, tp_size: int) -> None:
    """Refuse a tensor-parallel size for a model spec from its config alone (nothing is loaded)."""
    config = model_config(spec)
    if config is not None:
        check_tp_size(config, tp_size)


# -------------------------------------------------------------------------------------- communicator

class TPGroup:
    """The communicator of one tensor-parallel replica: a private process group over a TCPStore.

    It is not torch.distributed's default group, so several replicas (runners) can live in one process and
    nothing global is left behind. Rank 0 hosts the store (`TPGroup.host_store()` picks a free port).
    """

    def __init__(self) -> None:
        self.pg = None
        self.store = None
        self.device = torch.device("cpu")

    @staticmethod
    def host_store(world: int, timeout_s: float, host: str = "127.0.0.1"):
        return dist.TCPStore(host, 0, world, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)

    def connect(self, backend: str, host: str, port: int, rank: int, world: int, timeout_s: float,
                device: torch.device, store=None) -> None:
        timeout = timedelta(seconds=timeout_s)
        self.device = device
        self.store = store if store is not None else dist.TCPStore(host, port, world, False, timeout=timeout)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world, timeout)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            try:
                opts._timeout = timeout
            except Exception:
                pass
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world, opts)
        else:
            raise ValueError(f"unknown backend {backend!r} (gloo or nccl)")

    def all_reduce(self, t: torch.Tensor) -> None:
        self.pg.allreduce([t]).wait()

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device=self.device))

    def shutdown(self) -> None:
        pg, self.pg, self.store = self.pg, None, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:
                pass


# ------------------------------------------------------------------------------------------ sharding

def _bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    return size * rank // world, size * (rank + 1) // world


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone().contiguous(), requires_grad=False)


def _shard_columns_out(lin: nn.Linear, start: int, end: int) -> None:
    """Column-parallel: keep output features [start, end) (on the meta device too: load_shard fills it)."""
    lin.weight = _param(lin.weight.data[start:end])
    if lin.bias is not None:
        lin.bias = _param(lin.bias.data[start:end])
    lin.out_features = end - start
    lin.tp_slice = {"weight": (0, start, end), "bias": (0, start, end)}   # what to read from a checkpoint


class RowParallelLinear(nn.Module):
    """A linear layer holding input features [start, end); the partial outputs are summed by all-reduce."""

    def __init__(self, lin: nn.Linear, start: int, end: int, group: TPGroup):
        super().__init__()
        self.weight = _param(lin.weight.data[:, start:end])
        self.bias = None if lin.bias is None else _param(lin.bias.data)
        self.tp_slice = {"weight": (1, start, end)}
        self.in_features, self.out_features, self.group = end - start, lin.out_features, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        self.group.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


def shard_model(model: nn.Module, rank: int, world: int, group: TPGroup | None = None) -> nn.Module:
    """Shard a Llama-like transformers causal LM in place for `rank` of `world`; returns it.

    The row-parallel layers all-reduce over `group` (connected later, before the first forward).
    """
    check_tp_size(model.config, world)
    if world == 1:
        return model
    if group is None:
        raise ValueError("shard_model needs the TPGroup of the replica for tensor-parallel size > 1")
    heads, kv = _head_counts(model.config)
    for i, layer in enumerate(model.base_model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
                 [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(m is None or not isinstance(getattr(m, n, None), nn.Linear) for m, n in needed):
            raise TensorParallelSizeError(
                f"{type(model).__name__} layer {i}: tensor parallelism supports Llama-like layers "
                "(self_attn.q/k/v/o_proj and mlp.gate/up/down_proj)")
        hd = attn.head_dim
        q0, q1 = _bounds(heads, rank, world)
        k0, k1 = _bounds(kv, rank, world)
        _shard_columns_out(attn.q_proj, q0 * hd, q1 * hd)
        _shard_columns_out(attn.k_proj, k0 * hd, k1 * hd)
        _shard_columns_out(attn.v_proj, k0 * hd, k1 * hd)
        attn.o_proj = RowParallelLinear(attn.o_proj, q0 * hd, q1 * hd, group)
        for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value // world)
        m0, m1 = _bounds(mlp.gate_proj.out_features, rank, world)
        _shard_columns_out(mlp.gate_proj, m0, m1)
        _shard_columns_out(mlp.up_proj, m0, m1)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, m0, m1, group)
    return model


def _load(source, dtype: torch.dtype) -> nn.Module:
    if isinstance(source, str):
        from ..checkpoints import load_model
        return load_model(source, dtype=dtype)
    return source().eval().to(dtype)


def load_shard(source, rank: int, world: int, group: TPGroup | None,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """This rank's shard of the model, in `dtype`.

    From a safetensors checkpoint directory the model is built on the meta device, sharded, and only this
    rank's slices are read, converted to `dtype` slice by slice (a rank never holds the whole model, nor
    any fp32 copy of a bf16 one); otherwise (a callable, another format, names that do not match) the
    whole model is loaded, then sharded. The model's `tp_loaded_from` says which ("slices" or "whole").
    """
    if world == 1 or not isinstance(source, str):
        model = shard_model(_load(source, dtype), rank, world, group)
        model.tp_loaded_from = "whole"
        return model
    try:
        from pathlib import Path

        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..checkpoints import resolve
        path = Path(resolve(source))
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise LookupError("no safetensors files")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
        model = shard_model(model, rank, world, group)
        modules = dict(model.named_modules())
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    owner, _, attr = key.rpartition(".")
                    module = modules.get(owner)
                    if module is None or not isinstance(getattr(module, attr, None), torch.Tensor):
                        continue
                    view = sf.get_slice(key)
                    dim, start, end = getattr(module, "tp_slice", {}).get(attr, (None, 0, 0))
                    t = view[:] if dim is None else view[start:end] if dim == 0 else view[:, start:end]
                    t = t.to(dtype) if t.is_floating_point() else t
                    if attr in module._parameters:
                        module._parameters[attr] = nn.Parameter(t.contiguous(), requires_grad=False)
                    else:
                        module._buffers[attr] = t
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise LookupError(f"not in the checkpoint: {missing[:3]}")
        model.tp_loaded_from = "slices"      # which path loaded it (Rank.load_info reports it)
        return model.eval()
    except (LookupError, OSError, ValueError, ImportError, KeyError):
        model = shard_model(_load(source, dtype), rank, world, group)
        model.tp_loaded_from = "whole"
        return model
