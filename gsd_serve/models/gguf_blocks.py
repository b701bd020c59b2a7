"""The default target's own GGUF weights, multiplied in their 4- and 8-bit blocks (`--target-weights gguf`).

The default target ships as SmolLM2-135M-Instruct.Q4_1.gguf: every projection of every layer is Q4_1 (4-bit
q, fp16 scale d and minimum m per block of 32 inputs, w = q * d + m) and the embedding, tied to the output
layer, is Q8_0 (8-bit q, fp16 d, w = q * d). The fp32 model this project runs is exactly their
dequantization. `use_gguf_blocks(model)` swaps the projections and the output layer for `BlockLinear`s over
the file's own blocks (checked against the model's weights, element by element), multiplied by the C
kernels in kernels/gguf_matmul.c: fp32 activations, each weight dequantized exactly, fp32 sums.

- The same model: only the order of the sums differs from a dense fp32 GEMM (~1e-7 relative), so the output
  can differ from dense fp32 decoding only where the target's top two logits nearly tie (bench reports
  every divergence with its top-2 gap).
- Batch-invariant: a token's projections are bit-identical whether it is decoded alone or verified in a
  tree, so speculation and plain decoding in this mode agree token for token.
- ~6x fewer weight bytes per decoding step than fp32 (0.63 bytes per projection weight, 1.06 per output-layer
  weight), which is what a CPU step waits for.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .gguf_kernels import block_matmul

GROUP = 32
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}   # Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; Q8_0: fp16 d, 32 int8
PROJECTIONS = {"attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"),
               "attn_v": ("self_attn", "v_proj"), "attn_output": ("self_attn", "o_proj"),
               "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj")}


def dequantize(kind: str, blocks: torch.Tensor, cols: int) -> torch.Tensor:
    """The fp32 weight [rows, cols] that blocks [rows, cols/32 * block bytes] hold (as the dense model has it)."""
    rows = blocks.shape[0]
    b = blocks.view(rows, cols // GROUP, BLOCK_BYTES[kind])
    d = b[:, :, 0:2].contiguous().view(torch.float16).float()                       # [rows, nb, 1]
    if kind == "Q8_0":
        return (b[:, :, 2:].contiguous().view(torch.int8).float() * d).reshape(rows, cols)
    m = b[:, :, 2:4].contiguous().view(torch.float16).float()
    qs = b[:, :, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()                              # inputs 0..15, 16..31
    return (q * d + m).reshape(rows, cols)


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order transformers' GGUF loader gives q/k projections (undoing llama.cpp's rope permute)."""
    idx = np.arange(n_rows)
    dim = n_rows // n_head // 2
    return torch.from_numpy(idx.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows).copy())


class BlockLinear(nn.Module):
    """y = x @ W.T, W held as GGUF blocks (kind Q4_1 or Q8_0), fp32 in and out."""

    def __init__(self, kind: str, blocks: torch.Tensor, in_features: int):
        super().__init__()
        if kind not in BLOCK_BYTES or in_features % GROUP:
            raise ValueError(f"unsupported block weight {kind} with {in_features} inputs")
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y = block_matmul(self.kind.lower(), flat, self.blocks, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


def _gguf_path() -> str:
    from .loading import GGUF_FILE, _gguf_dir
    return str(_gguf_dir() / GGUF_FILE)


def use_gguf_blocks(model: nn.Module, gguf_path: str | None = None) -> int:
    """Swap the default target's projections and output layer for BlockLinears over its GGUF's blocks;
    returns how many were swapped. The model must be the default target in fp32 (the blocks are checked
    against its weights, element by element)."""
    import gguf

    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("GGUF block weights run with fp32 activations: load the target in float32")
    reader = gguf.GGUFReader(gguf_path or _gguf_path())
    config = model.config
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", config.num_attention_heads))
    layers = model.base_model.layers
    count = 0

    def swap(owner: nn.Module, attr: str, t, dense: torch.Tensor, order: torch.Tensor | None = None) -> None:
        kind = t.tensor_type.name
        if kind not in BLOCK_BYTES:
            raise ValueError(f"{t.name} is {kind}, not Q4_1 or Q8_0")
        cols, rows = (int(x) for x in t.shape.tolist())
        blocks = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1).copy())
        if order is not None:
            blocks = blocks[order]
        if not torch.equal(dequantize(kind, blocks, cols), dense.detach()):
            err = (dequantize(kind, blocks, cols) - dense.detach()).abs().max().item()
            raise ValueError(f"{t.name}: the GGUF blocks do not match the model's weights (max error {err:g}); "
                             "GGUF block weights are for the default target only")
        setattr(owner, attr, BlockLinear(kind, blocks, cols))

    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight" and getattr(config, "tie_word_embeddings", False):
            swap(model, "lm_head", t, model.get_input_embeddings().weight)
            count += 1
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in PROJECTIONS:
            owner, attr = PROJECTIONS[parts[2]]
            module = getattr(layers[int(parts[1])], owner)
            rows = int(t.shape.tolist()[1])
            order = _unpermute_rows(rows, heads if parts[2] == "attn_q" else kv) \
                if parts[2] in ("attn_q", "attn_k") else None
            swap(module, attr, t, getattr(module, attr).weight, order)
            count += 1
    if count != 7 * len(layers) + 1:
        raise ValueError(f"expected {7 * len(layers) + 1} GGUF block weights, found {count}")
    return count


def _fuse(parts: list[BlockLinear]) -> BlockLinear:
    """One BlockLinear whose outputs are the parts' outputs side by side (one kernel call instead of several)."""
    kinds = {p.kind for p in parts}
    if len(kinds) != 1 or len({p.in_features for p in parts}) != 1:
        raise ValueError("only block weights of one kind and width fuse")
    return BlockLinear(parts[0].kind, torch.cat([p.blocks for p in parts]), parts[0].in_features)


class GGUFDecoder:
    """The decoder forward over GGUF block weights, every step in this project's C kernels.

    Same interface and arithmetic as LeanDecoder (models/llama_forward.py), but each part of a layer runs per
    token in a fixed order: RMSNorm, the fused q|k|v and gate|up projections, RoPE, the cache write, attention
    over the visible keys in slot order, SiLU. So a token's hidden state is bit-identical whether it is decoded
    alone, verified in a tree or batched with other sequences, and there are ~8 calls per layer instead of the
    ~40 tensor operations of the eager path."""

    def __init__(self, model: nn.Module):
        from .gguf_kernels import library

        self.lib = library()
        dec = model.base_model
        self.decoder = dec
        cfg = model.config
        first = dec.layers[0].self_attn
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(first.head_dim)
        if self.head_dim % 16 or self.heads % self.kv_heads:
            raise ValueError("GGUFDecoder needs a head size that is a multiple of 16 and whole KV groups")
        self.scaling = float(getattr(first, "scaling", self.head_dim ** -0.5))
        self.layers = []
        for layer in dec.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]), o=attn.o_proj,
                gate_up=_fuse([mlp.gate_proj, mlp.up_proj]), down=mlp.down_proj,
                norm1=(layer.input_layernorm.weight.detach().float().contiguous(),
                       float(layer.input_layernorm.variance_epsilon)),
                norm2=(layer.post_attention_layernorm.weight.detach().float().contiguous(),
                       float(layer.post_attention_layernorm.variance_epsilon))))
        self.final_norm = (dec.norm.weight.detach().float().contiguous(), float(dec.norm.variance_epsilon))

    def _norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        out = torch.empty_like(x)
        self.lib.rms_norm(x.data_ptr(), norm[0].data_ptr(), norm[1], x.shape[0], x.shape[1], out.data_ptr())
        return out

    def __call__(self, cache, tokens, positions, mask):
        return self.forward_many([cache], [tokens], [positions], [mask])[0]

    @torch.inference_mode()
    def forward_many(self, caches: list, tokens: list[torch.Tensor], positions: list[torch.Tensor],
                     masks: list[torch.Tensor | None], collect: tuple[int, ...] = ()) -> list:
        dec, lib = self.decoder, self.lib
        H, KVH, hd = self.heads, self.kv_heads, self.head_dim
        sizes = [t.numel() for t in tokens]
        bounds = [(sum(sizes[:j]), sum(sizes[: j + 1])) for j in range(len(sizes))]
        n = bounds[-1][1]
        h = dec.embed_tokens(torch.cat(tokens)).float().contiguous()             # [n, d]
        cos, sin = dec.rotary_emb(h[None], torch.cat(positions).view(1, -1))
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()        # [n, hd]
        mask_bytes = []
        for m, cache, size in zip(masks, caches, sizes):
            if m is not None:
                m = m.reshape(size, -1)
                if m.shape[1] != cache.length + size:
                    raise ValueError(f"mask covers {m.shape[1]} keys, the cache and new tokens {cache.length + size}")
                m = m.to(torch.uint8).contiguous()
            mask_bytes.append(m)
        q = torch.empty(n, H, hd)
        o = torch.empty(n, H * hd)
        kept = {}
        for i, L in enumerate(self.layers):
            qkv = L["qkv"](self._norm(h, L["norm1"]))
            for cache, (a, b), m in zip(caches, bounds, mask_bytes):
                kbuf, vbuf, start = cache.append_slots(i, b - a, KVH, hd, torch.float32)
                cap = kbuf.shape[2]
                lib.rope_split(qkv[a:b].data_ptr(), cos[a:b].data_ptr(), sin[a:b].data_ptr(), b - a, H, KVH, hd,
                               q[a:b].data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(), cap, start)
                lib.attention(q[a:b].data_ptr(), kbuf.data_ptr(), vbuf.data_ptr(), cap, start + b - a,
                              None if m is None else m.data_ptr(), b - a, H, KVH, hd, self.scaling,
                              o[a:b].data_ptr())
            h = h + L["o"](o)
            gate_up = L["gate_up"](self._norm(h, L["norm2"]))
            f = gate_up.shape[1] // 2
            # torch's vectorised SiLU: elementwise, the same for a token whatever the rows (f is a multiple of 16)
            h = h + L["down"](F.silu(gate_up[:, :f]) * gate_up[:, f:])
            if i in collect:
                kept[i] = h
        hidden = self._norm(h, self.final_norm)
        if not collect:
            return [hidden[a:b] for a, b in bounds]
        feats = torch.cat([kept[i] for i in collect], dim=-1)
        return [(hidden[a:b], feats[a:b]) for a, b in bounds]


def gguf_decoder(model: nn.Module) -> GGUFDecoder | None:
    """A GGUFDecoder where `model`'s projections run on GGUF blocks (use_gguf_blocks), else None."""
    layers = getattr(model.base_model, "layers", None)
    if not layers or not isinstance(getattr(layers[0].self_attn, "q_proj", None), BlockLinear):
        return None
    return GGUFDecoder(model)
