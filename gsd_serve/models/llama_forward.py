"""A lean forward for Llama-family decoders: the same weights and arithmetic as transformers' modules,
without the framework around them.

transformers' decoder spends ~10 ms of Python per forward on a 30-layer model (mask preparation, kwargs
plumbing, per-module hooks and output dataclasses), which on CPU is a fifth of a one-token target step and
most of a two-layer draft's step. This path calls the model's own submodules (projections, norms' weights,
rotary embedding) in the order LlamaDecoderLayer does, with our KVCache and boolean tree masks.

Used by ModelRunner for `model_type` in SUPPORTED (Llama, SmolLM2, Mistral without sliding window, Qwen2's
biased projections); anything else keeps the transformers forward. GSD_SERVE_LEAN_FORWARD=0 turns it off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .switches import forced

SUPPORTED = {"llama", "mistral", "qwen2"}


def lean_decoder(model: torch.nn.Module) -> "LeanDecoder | None":
    """A LeanDecoder over `model`'s weights, or None where this model needs transformers' own forward."""
    if forced("GSD_SERVE_LEAN_FORWARD") is False:
        return None
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED:
        return None
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
            and config.model_type == "mistral":
        return None
    if getattr(config, "hidden_act", "silu") != "silu":
        return None
    decoder = model.base_model
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(decoder, n) for n in needed):
        return None
    for layer in decoder.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or hasattr(attn, "q_norm") or not hasattr(attn, "head_dim"):
            return None
    return LeanDecoder(decoder)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as LlamaRMSNorm: normalise in fp32, scale in the input dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_qkv(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hd: int):
    """A decoder layer's queries, keys and values [1, heads, n, hd] for hidden states h [1, n, d], RoPE applied."""
    attn, n = layer.self_attn, h.shape[1]
    x = _rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, hd).transpose(1, 2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def layer_rest(layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The layer's output from its input h and its attention output o [1, heads, n, hd]: o_proj, residual, MLP."""
    n = h.shape[1]
    h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, n, -1))
    x = _rms_norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
    mlp = layer.mlp
    return h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


class LeanDecoder:
    """hidden states [n, d] for n new tokens fed after a KVCache, given positions and an optional mask."""

    def __init__(self, decoder: torch.nn.Module):
        self.decoder = decoder
        first = decoder.layers[0].self_attn
        self.head_dim = first.head_dim
        self.scaling = getattr(first, "scaling", self.head_dim ** -0.5)

    def __call__(self, cache, tokens: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        return self.forward_many([cache], [tokens], [positions], [mask])[0]

    @torch.inference_mode()
    def forward_many(self, caches: list, tokens: list[torch.Tensor], positions: list[torch.Tensor],
                     masks: list[torch.Tensor | None], collect: tuple[int, ...] = ()) -> list:
        """Several sequences in one pass: their tokens share every projection and MLP GEMM (the cost that
        grows slowly with rows), and each attends only to its own cache under its own mask.

        With `collect` (layer indices), each sequence's result is (hidden, features): the residual stream
        after those layers, concatenated [n, len(collect) * d] (what a feature draft reads)."""
        dec = self.decoder
        sizes = [t.numel() for t in tokens]
        starts = [c.length for c in caches]
        h = dec.embed_tokens(torch.cat(tokens).view(1, -1))               # [1, n, d]
        cos, sin = dec.rotary_emb(h, torch.cat(positions).view(1, -1))    # [1, n, hd]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                      # broadcast over heads
        masks = list(masks)
        for j, (m, size, start) in enumerate(zip(masks, sizes, starts)):
            if m is None and size > 1:
                # causal among the new tokens, everything already cached is visible
                masks[j] = torch.ones(size, start + size, dtype=torch.bool, device=h.device).tril(start)[None, None]
        bounds = [(sum(sizes[:j]), sum(sizes[: j + 1])) for j in range(len(sizes))]
        hd = self.head_dim
        kept: dict[int, torch.Tensor] = {}
        # In bf16/fp16 attention runs in float64. CPU attention kernels sum a query's scores in an order that
        # depends on how many queries come together and where masked keys sit, so a token verified in a tree
        # and the same token decoded alone differ by ~1e-7 in fp32; a bf16 model rounds that to a whole ulp
        # now and then, and near-ties flip between speculation and plain decoding (3 of 6 prompts differed
        # within 48 tokens). In float64 those differences vanish below fp32 rounding: with oneDNN's bf16 GEMMs,
        # which are batch-invariant up to 32 rows, a tree computes each token bit-identically to a decoding
        # step. It costs ~5% of a one-token step and ~12% of a 16-token tree on the 2-core dev CPU. fp32 models
        # keep fp32 attention (the ~1e-7 differences only matter at near-ties of that size). K/V are cached
        # in the attention dtype (exact upcasts).
        adt = torch.float64 if h.dtype in (torch.bfloat16, torch.float16) else h.dtype
        for i, layer in enumerate(dec.layers):
            q, k, v = layer_qkv(layer, h, cos, sin, hd)
            outs = []
            for cache, (a, b), m in zip(caches, bounds, masks):
                keys, values = cache.update(k[:, :, a:b].to(adt), v[:, :, a:b].to(adt), i)
                outs.append(F.scaled_dot_product_attention(q[:, :, a:b].to(adt), keys, values, attn_mask=m,
                                                           scale=self.scaling,
                                                           enable_gqa=keys.shape[1] != q.shape[1]))
            o = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).to(h.dtype)
            h = layer_rest(layer, h, o)
            if i in collect:
                kept[i] = h[0]
        hidden = _rms_norm(h, dec.norm.weight, dec.norm.variance_epsilon)[0]
        if not collect:
            return [hidden[a:b] for a, b in bounds]
        feats = torch.cat([kept[i] for i in collect], dim=-1)
        return [(hidden[a:b], feats[a:b]) for a, b in bounds]
