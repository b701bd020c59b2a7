"""A compiled, static decode/verify step (gpt-fast style): `--compile on|off|auto`.

`CompiledRunner` is a ModelRunner whose caches are `StaticKVCache`s: one preallocated buffer per layer
whose capacity grows in powers of two (so shapes repeat), K/V written at explicit slots, attention over the
whole buffer under a mask. A forward of n <= MAX_COMPILED_ROWS tokens pads n to a bucket (1, 2, 4, ...,
64 rows) and runs `torch.compile`d code for that (bucket, capacity) shape: one decoding step and every
verification tree of the same bucket reuse one compiled graph. Larger forwards (prefill) run the eager
lean forward on the same cache. On CUDA the graphs are compiled without CUDA graphs (each session has its
own cache buffers, which CUDA graphs would re-record per session).

Compile time is reported (`compile_seconds`, `warmup()`), kept out of measured tokens/s by `bench`'s
warm-up, and cached across runs in the cache directory (inductor's FX graph cache). A shape whose
compilation fails falls back to eager for good (`fallbacks`). Whether to compile is the factory's choice
(factory.compile_wanted: `GSD_SERVE_COMPILE=0` turns it off).

Numerics: compiled kernels reduce in other orders than eager ones, and different buckets compile to
different kernels, so a one-token step and a tree can differ in the last bits: near-ties can flip, as in
bf16 (bench reports the divergences and their top-2 gaps). On this project's 2-core CPUs compiling made the
forward slower (../shared/research/cpu-forward.md), so `auto` compiles on CUDA only.
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from ..core.config import cache_dir
from .llama_forward import _rms_norm, layer_qkv, layer_rest
from .runner import ModelRunner

MAX_COMPILED_ROWS = 64
MIN_CAPACITY = 256


def _bucket(n: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return b


class StaticKVCache:
    """One sequence's K/V: buffers [layers, 1, kv_heads, capacity, head_dim]; `length` entries are valid.

    Implements what the lean forward (`update`) and the core (`length`, `truncate`, `keep`) use."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.shape = (layers, 1, kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.k = self.v = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[3]

    def reserve(self, needed: int) -> None:
        """Room for `needed` entries plus one scratch slot (padded rows write there)."""
        if needed + 1 <= self.capacity:
            return
        cap = max(MIN_CAPACITY, _bucket(needed + 1))
        shape = self.shape[:3] + (cap,) + self.shape[4:]
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k is not None:
            k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
            v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = k, v

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int):
        """Append n entries of one layer (the eager path); returns that layer's valid keys and values."""
        n = key.shape[-2]
        if layer == 0:
            self.reserve(self.length + n)
        end = self.length + n
        self.k[layer, :, :, self.length:end] = key
        self.v[layer, :, :, self.length:end] = value
        if layer == self.shape[0] - 1:
            self.length = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, int(length))

    def keep(self, start: int, positions) -> None:
        positions = torch.as_tensor(positions, dtype=torch.long, device=self.device)
        m = positions.numel()
        if m:
            self.k[:, :, :, start: start + m] = self.k[:, :, :, positions]
            self.v[:, :, :, start: start + m] = self.v[:, :, :, positions]
        self.length = start + m


def _use_project_inductor_cache() -> None:
    """Compiled kernels cache under the project's cache directory unless the user chose a place. Inductor
    writes its default (/tmp/torchinductor_<user>) into $TORCHINDUCTOR_CACHE_DIR the first time anything asks
    for its cache directory, which model loading already does: a setdefault here never took effect."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


class CompiledRunner(ModelRunner):
    """ModelRunner with static caches and compiled fixed-shape forwards (Llama-family models only)."""

    def __init__(self, model: torch.nn.Module, output_ids: torch.Tensor | None = None):
        super().__init__(model, output_ids, pack=False)   # the compiler picks its own GEMM kernels
        if self._lean is None:
            raise ValueError("--compile needs a Llama-family model (the lean forward)")
        cfg = model.config
        self._kv_heads = int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
        self._layers = int(cfg.num_hidden_layers)
        self._device = self.head_weight.device
        self.compile_seconds = 0.0
        self.compiled_shapes: set[tuple[int, int]] = set()
        self.fallbacks: set[tuple[int, int]] = set()
        _use_project_inductor_cache()
        self._step = torch.compile(self._static_step, dynamic=False, fullgraph=True)

    def new_cache(self) -> StaticKVCache:
        # attention runs in the dtype the lean forward uses (float64 for bf16/fp16 models)
        adt = torch.float64 if self.dtype in (torch.bfloat16, torch.float16) else self.dtype
        return StaticKVCache(self._layers, self._kv_heads, self._lean.head_dim, adt, self._device)

    def _static_step(self, tokens, positions, mask, slots, k_all, v_all):
        """Hidden states [B, d] of B rows; their K/V go to `slots` of every layer's buffer."""
        dec = self._lean.decoder
        hd = self._lean.head_dim
        h = dec.embed_tokens(tokens.view(1, -1))
        cos, sin = dec.rotary_emb(h, positions.view(1, -1))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        adt = k_all.dtype
        for i, layer in enumerate(dec.layers):
            q, k, v = layer_qkv(layer, h, cos, sin, hd)
            k_all[i].index_copy_(2, slots, k.to(adt))
            v_all[i].index_copy_(2, slots, v.to(adt))
            o = F.scaled_dot_product_attention(q.to(adt), k_all[i], v_all[i], attn_mask=mask,
                                               scale=self._lean.scaling,
                                               enable_gqa=k_all.shape[2] != q.shape[1]).to(h.dtype)
            h = layer_rest(layer, h, o)
        return _rms_norm(h, dec.norm.weight, dec.norm.variance_epsilon)[0]

    @torch.inference_mode()
    def hidden(self, cache, tokens, positions=None, mask=None):
        n = tokens.numel()
        if not isinstance(cache, StaticKVCache):
            raise TypeError("pass a cache made by this runner's new_cache()")
        if n > MAX_COMPILED_ROWS or cache.length == 0:
            return self._eager(cache, tokens, positions, mask)     # prefill: eager, same cache
        start = cache.length
        cache.reserve(start + n)
        cap, b = cache.capacity, _bucket(n)
        if (b, cap) in self.fallbacks:
            return self._eager(cache, tokens, positions, mask)
        dev = self._device
        if positions is None:
            positions = torch.arange(start, start + n)
        full = torch.zeros(b, cap, dtype=torch.bool)
        if mask is None:
            full[:n, :start + n] = torch.ones(n, start + n, dtype=torch.bool).tril(start)
        else:
            full[:n, :start + n] = mask[0, 0]
        full[n:, cap - 1] = True                                 # padded rows: only their scratch slot
        slots = torch.full((b,), cap - 1, dtype=torch.long)
        slots[:n] = torch.arange(start, start + n)
        pad = lambda t, fill: torch.cat([t.reshape(-1), t.new_full((b - n,), fill)])   # noqa: E731
        args = (pad(tokens.long(), 0).to(dev), pad(positions.long(), int(positions.reshape(-1)[-1])).to(dev),
                full[None, None].to(dev), slots.to(dev), cache.k, cache.v)
        fresh = (b, cap) not in self.compiled_shapes
        t0 = time.perf_counter()
        try:
            hidden = self._step(*args)
        except Exception as exc:  # noqa: BLE001 (a shape the compiler cannot handle runs eagerly from now on)
            import warnings
            warnings.warn(f"compiled step failed for {b} rows x {cap} slots ({type(exc).__name__}); eager from now on")
            self.fallbacks.add((b, cap))
            return self._eager(cache, tokens, positions, mask)
        if fresh:
            self.compiled_shapes.add((b, cap))
            self.compile_seconds += time.perf_counter() - t0
        cache.length = start + n
        self.forwards += 1
        self.tokens_fed += n
        return hidden[:n]

    def _eager(self, cache, tokens, positions, mask):
        """The lean forward on the same cache, its inputs moved to the model's device (the core builds them
        on the CPU)."""
        dev = self._device
        return super().hidden(cache, tokens.to(dev), None if positions is None else positions.to(dev),
                              None if mask is None else mask.to(dev))

    def forward(self, cache, tokens, positions=None, mask=None, last_only=False):
        """ModelRunner.forward with the logits on the CPU, where the core reads them."""
        return super().forward(cache, tokens, positions, mask, last_only=last_only).cpu()

    def forward_many(self, caches, tokens, positions, masks, features=(), last_only=False):
        if features:
            raise ValueError("--compile does not hand out target features yet (feature drafts need the eager path)")
        last = list(last_only) if isinstance(last_only, (list, tuple)) else [bool(last_only)] * len(caches)
        return [self.forward(c, t, p, m, last_only=lo) for c, t, p, m, lo in zip(caches, tokens, positions, masks, last)]

    def warmup(self, buckets=(1, 2, 4, 8, 16, 32), capacity: int = MIN_CAPACITY) -> float:
        """Compile the step for these row buckets at one capacity; returns the seconds it took."""
        t0 = time.perf_counter()
        cache = self.new_cache()
        cache.reserve(capacity - 1)
        with torch.inference_mode():
            self.hidden(cache, torch.tensor([1]))                 # a one-token prefill (eager)
            for b in buckets:
                self.hidden(cache, torch.ones(b, dtype=torch.long))
                cache.truncate(1)
        return time.perf_counter() - t0
