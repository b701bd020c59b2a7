"""Tensor-parallel target: one model replica sharded over N ranks of a torch.distributed group.

`TensorParallelRunner` has `ModelRunner`'s interface (`new_cache`, `forward`, `vocab_size`, `output_ids`,
`to_full_ids`), so `Engine` and `TargetSession` use it unchanged. Rank 0 lives in the calling process and
takes the calls; ranks 1..N-1 are spawned processes that execute every forward and every cache operation
in lockstep. Commands (op + small tensors as numpy arrays) go to each rank over a pipe; the only
collectives are the all-reduces inside the model, so an idle runner has nothing that can time out, and
a rank whose parent dies sees the pipe close and exits.

The model is sharded gpt-fast style: q/k/v and gate/up are column-parallel (each rank holds whole
attention heads and KV heads, and a slice of the MLP), o_proj and down_proj are row-parallel, followed by
an all-reduce (gloo on CPU, NCCL on GPUs). The embedding is replicated; only rank 0 applies the output
layer. Each rank's KV cache holds its own heads, so tree masks, explicit positions and in-place
compaction (`keep`/`truncate`) work unchanged on every rank.

Works for Llama-like transformers models (Llama, Mistral, Qwen2/3, SmolLM2, ...): decoder layers with
`self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`.
"""
from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import threading
import time
import traceback
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .kv_cache import KVCache
from .runner import ModelRunner


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


# ------------------------------------------------------------------------------------------ sharding

def _bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    return size * rank // world, size * (rank + 1) // world


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone().contiguous(), requires_grad=False)


def _shard_columns_out(lin: nn.Linear, start: int, end: int) -> None:
    """Column-parallel: keep output features [start, end)."""
    lin.weight = _param(lin.weight.data[start:end])
    if lin.bias is not None:
        lin.bias = _param(lin.bias.data[start:end])
    lin.out_features = end - start
    lin.tp_slice = {"weight": (0, start, end), "bias": (0, start, end)}   # what to read from a checkpoint


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


# ------------------------------------------------------------------------------------------ loading

def _model_config(source):
    if isinstance(source, str):
        from transformers import AutoConfig

        from .models import resolve
        return AutoConfig.from_pretrained(resolve(source), local_files_only=True)
    return None


def _load(source) -> nn.Module:
    if isinstance(source, str):
        from .models import load_model
        return load_model(source)
    return source().eval()


def load_shard(source, rank: int, world: int, group: TPGroup | None,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """This rank's shard of the model. From a safetensors checkpoint directory, the model is built on the
    meta device, sharded, and only this rank's slices are read (a rank never holds the whole model);
    otherwise (a callable, another format, names that do not match) the whole model is loaded, then sharded.
    """
    if world == 1 or not isinstance(source, str):
        return shard_model(_load(source), rank, world, group)
    try:
        from pathlib import Path

        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        from .models import resolve
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
        return model.eval()
    except (LookupError, OSError, ValueError, ImportError, KeyError):
        return shard_model(_load(source), rank, world, group)


def _device_for(backend: str, rank: int) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().numpy()


def _t(a, device) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a).to(device)


# ------------------------------------------------------------------------------------------- ranks

def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(1.0)


def _worker_main(rank: int, world: int, source, port: int, backend: str, conn, timeout_s: float,
                 parent_pid: int, threads: int) -> None:
    """Rank 1..N-1: load and shard the model, join the group, then execute rank 0's commands."""
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        device = _device_for(backend, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = TPGroup()
        model = load_shard(source, rank, world, group).to(device)
        conn.send(("loaded", None))
        group.connect(backend, "127.0.0.1", port, rank, world, timeout_s, device)
        decoder = model.base_model
        caches: dict[int, KVCache] = {}
        with torch.inference_mode():
            while True:
                try:
                    msg = conn.recv()
                except EOFError:       # rank 0 is gone
                    os._exit(0)
                op = msg[0]
                if op == "forward":
                    _, cid, tokens, positions, mask = msg
                    cache = caches[cid]
                    tokens = _t(tokens, device)
                    if positions is None:
                        positions = torch.arange(cache.length, cache.length + tokens.numel(), device=device)
                    else:
                        positions = _t(positions, device)
                    decoder(input_ids=tokens.view(1, -1), position_ids=positions.view(1, -1),
                            attention_mask=_t(mask, device), past_key_values=cache, use_cache=True)
                elif op == "new":
                    caches[msg[1]] = KVCache()
                elif op == "free":
                    caches.pop(msg[1], None)
                elif op == "truncate":
                    caches[msg[1]].truncate(msg[2])
                elif op == "keep":
                    caches[msg[1]].keep(msg[2], torch.from_numpy(msg[3]))
                elif op == "close":
                    group.barrier()
                    group.shutdown()
                    conn.send(("closed", None))
                    return
                else:
                    raise RuntimeError(f"unknown command {op!r}")
    except BaseException:  # report, then die: rank 0 sees the error on its next call
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)


# ------------------------------------------------------------------------------------------ caches

class ShardedCache:
    """A handle to one sequence's KV cache on every rank: rank 0's shard is `local`.

    `length`, `truncate` and `keep` behave as KVCache's; the operations are applied on every rank.
    """

    def __init__(self, runner: "TensorParallelRunner", cid: int):
        self._runner = runner
        self.id = cid
        self.local = KVCache()

    @property
    def length(self) -> int:
        return self.local.length

    def truncate(self, length: int) -> None:
        self._runner._cache_op(self, "truncate", int(length))

    def keep(self, start: int, positions) -> None:
        self._runner._cache_op(self, "keep", int(start), torch.as_tensor(positions, dtype=torch.long))


_live_runners: "weakref.WeakSet[TensorParallelRunner]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for runner in list(_live_runners):
        try:
            runner.close()
        except Exception:
            pass


class TensorParallelRunner:
    """ModelRunner's interface over a model sharded across `tp_size` ranks (rank 0 in this process).

    `source` is a model spec for `gsd_serve.models.load_model` (e.g. 'smollm2-135m-instruct' or a checkpoint
    directory) or a picklable zero-argument callable returning the model; every rank loads it and keeps its
    shard. `model`, if given, is rank 0's copy (already loaded from the same source): it is sharded in place.
    `backend` defaults to NCCL when CUDA is available (rank r on GPU r), else gloo. `timeout_s` bounds one
    collective (a rank that hangs mid-forward) and the rendezvous. Each runner has its own process group
    (not the default one), so several can live in one process. Call `close()` when done (also done at interpreter exit).
    """

    def __init__(self, source, tp_size: int, *, model: nn.Module | None = None, backend: str | None = None,
                 timeout_s: float = 120.0, startup_timeout_s: float = 600.0, rank_threads: int = 1):
        config = model.config if model is not None else _model_config(source)
        if config is not None:
            check_tp_size(config, tp_size)        # refuse before starting anything
        self.tp_size = tp_size
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = _device_for(self.backend, 0)
        self.timeout_s = timeout_s
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._freed: list[int] = []
        self._procs: list = []
        self._conns: list = []
        self._closed = False
        self._broken: str | None = None
        self.forwards = 0
        self.tokens_fed = 0
        self.group = TPGroup()
        store = TPGroup.host_store(tp_size, timeout_s) if tp_size > 1 else None
        ctx = multiprocessing.get_context("spawn")
        try:
            for rank in range(1, tp_size):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, name=f"gsd-tp-rank{rank}", daemon=True,
                                args=(rank, tp_size, source, store.port, self.backend, child, timeout_s,
                                      os.getpid(), rank_threads))
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
            _live_runners.add(self)
            if model is None:
                model = load_shard(source, 0, tp_size, self.group)
            else:
                model = shard_model(model, 0, tp_size, self.group)
            model = model.to(self.device)
            self._wait_loaded(startup_timeout_s)
            if tp_size > 1:
                self.group.connect(self.backend, "127.0.0.1", store.port, 0, tp_size, timeout_s, self.device,
                                   store=store)
        except BaseException:
            self._kill_ranks()
            _live_runners.discard(self)
            self._closed = True
            raise
        self._inner = ModelRunner(model)
        self.model = model
        self.vocab_size = self._inner.vocab_size
        self.output_ids = None

    # ---------------------------------------------------------------- ModelRunner's interface

    def new_cache(self) -> ShardedCache:
        with self._lock:
            self._check()
            cache = ShardedCache(self, next(self._ids))
            self._send_all(("new", cache.id))
            weakref.finalize(cache, self._freed.append, cache.id)
            return cache

    def forward(self, cache: ShardedCache, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [n, V] (or [1, V] with last_only) for `tokens` after the cache, as ModelRunner.forward."""
        if not isinstance(cache, ShardedCache) or cache._runner is not self:
            raise TypeError("pass a cache made by this runner's new_cache()")
        with self._lock:
            self._check()
            n = tokens.numel()
            if positions is None:
                positions = torch.arange(cache.length, cache.length + n)
            if mask is not None and tuple(mask.shape) != (1, 1, n, cache.length + n):
                raise ValueError(f"mask shape {tuple(mask.shape)}, expected {(1, 1, n, cache.length + n)}")
            self._send_all(("forward", cache.id, _np(tokens.reshape(-1).long()),
                            _np(positions.reshape(-1).long()), _np(mask)))
            try:
                logits = self._inner.forward(cache.local, tokens.to(self.device), positions.to(self.device),
                                             None if mask is None else mask.to(self.device), last_only)
            except Exception as exc:
                raise self._fail(f"tensor-parallel forward failed (a rank died or failed): {exc}") from exc
            self.forwards += 1
            self.tokens_fed += n
            return logits.cpu()

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    # ---------------------------------------------------------------- lifecycle

    @property
    def alive(self) -> bool:
        return not self._closed and self._broken is None

    def check_health(self) -> None:
        """Raise TensorParallelError if the runner is closed or broken or a rank has died."""
        with self._lock:
            self._check()

    def close(self) -> None:
        """Stop the ranks: a barrier, then destroy the group; kills ranks that do not stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _live_runners.discard(self)
            if self._broken is None and self.tp_size > 1 and all(p.is_alive() for p in self._procs):
                try:
                    self._send_all(("close",))
                    self.group.barrier()      # every rank is done before the store (hosted here) goes away
                except Exception:
                    pass
            self.group.shutdown()
            for c in self._conns:      # a rank still waiting for a command sees EOF and exits
                c.close()
            for p in self._procs:
                p.join(timeout=10)
            self._kill_ranks()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""
        return [p.pid for p in self._procs]

    # ---------------------------------------------------------------- internals

    def _cache_op(self, cache: ShardedCache, op: str, *args) -> None:
        with self._lock:
            self._check()
            with torch.inference_mode():
                getattr(cache.local, op)(*args)      # validate (and apply) on rank 0 first
            self._send_all((op, cache.id) + tuple(_np(a) if isinstance(a, torch.Tensor) else a for a in args))

    def _check(self) -> None:
        if self._closed:
            raise TensorParallelError("the tensor-parallel runner is closed")
        if self._broken is not None:
            raise TensorParallelError(self._broken)
        for rank, p in enumerate(self._procs, start=1):
            if not p.is_alive():
                raise self._fail(f"tensor-parallel rank {rank} (pid {p.pid}) died, exit code {p.exitcode}")

    def _send_all(self, msg: tuple) -> None:
        while self._freed:
            cid = self._freed.pop()
            self._send_all(("free", cid))
        for rank, c in enumerate(self._conns, start=1):
            try:
                c.send(msg)
            except (OSError, EOFError, BrokenPipeError) as exc:
                raise self._fail(f"tensor-parallel rank {rank} is unreachable: {exc}") from exc

    def _fail(self, what: str) -> TensorParallelError:
        """Mark the runner broken (every later call raises) and describe what the ranks reported."""
        details = []
        for rank, (p, c) in enumerate(zip(self._procs, self._conns), start=1):
            try:
                while c.poll(0.2 if not p.is_alive() else 0):
                    kind, text = c.recv()
                    if kind == "error":
                        details.append(f"rank {rank}: {text.strip().splitlines()[-1]}")
            except (OSError, EOFError):
                pass
            if not p.is_alive() and f"rank {rank} " not in what:
                details.append(f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}")
        msg = what + ("; " + "; ".join(details) if details else "")
        if self._broken is None:
            self._broken = msg + " (close this runner and start a new one)"
        return TensorParallelError(self._broken)

    def _wait_loaded(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(range(len(self._procs)))
        while pending:
            for i in list(pending):
                c, p = self._conns[i], self._procs[i]
                if c.poll(0.05):
                    try:
                        kind, text = c.recv()
                    except EOFError:
                        p.join(timeout=5)
                        raise TensorParallelError(
                            f"tensor-parallel rank {i + 1} exited during start-up with code {p.exitcode} (a "
                            "script that starts ranks needs an `if __name__ == '__main__':` guard)") from None
                    if kind == "error":
                        raise TensorParallelError(f"tensor-parallel rank {i + 1} failed to start:\n{text}")
                    pending.discard(i)
                elif not p.is_alive() and not c.poll(0):
                    raise TensorParallelError(
                        f"tensor-parallel rank {i + 1} exited during start-up with code {p.exitcode}")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel ranks {sorted(r + 1 for r in pending)} did not "
                                          f"load the model within {timeout_s:.0f}s")

    def _kill_ranks(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def check_spec_tp_size(spec: str, tp_size: int) -> None:
    """Refuse a tensor-parallel size for a model spec from its config alone (nothing is loaded)."""
    config = _model_config(spec)
    if config is not None:
        check_tp_size(config, tp_size)


def make_target_runner(spec: str, tp_size: int = 1, model: nn.Module | None = None, **kwargs):
    """The target runner for a model spec: a ModelRunner at tp_size 1, else a TensorParallelRunner.

    Refuses (TensorParallelSizeError, a ValueError) a size that does not divide the heads.
    """
    if tp_size == 1:
        from .models import load_model
        return ModelRunner(model if model is not None else load_model(spec))
    return TensorParallelRunner(spec, tp_size, model=model, **kwargs)
