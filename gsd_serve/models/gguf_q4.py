"""The default target's own 4-bit weights: its GGUF's Q4_1 blocks as int4 weight-only linears.

The default target ships as SmolLM2-135M-Instruct.Q4_1.gguf: every projection of every layer is 4-bit
integers q with a scale d and a minimum m per block of 32 inputs, w = q * d + m, and the fp32 model this
project runs is exactly that dequantization (the embedding, tied to the output layer, is Q8_0 and stays
dense). `use_gguf_q4(model)` swaps the projections for `Int4Linear`s built from the GGUF's own blocks
(checked against the model's weights, element by element) that multiply with torch's int4 CPU kernel
(`_weight_int4pack_mm_for_cpu`): about 6x fewer weight bytes per token than fp32, 3.5x fewer than bf16.

Not exact to the last bit: the kernel dequantizes as (q - 8) * d + (m + 8 d) with d and m in bfloat16
(fp16 in the file), with bfloat16 activations; its fp32 form (bit-faithful scales) is ~30x slower than
dense fp32 on this project's CPUs, so it is not offered. It is also slow for many rows (a 16-token tree
costs ~5x a dense bf16 one), so it suits plain decoding, not verification. See README ("4-bit weights").
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

GROUP = 32
_BLOCK_BYTES = 20   # Q4_1: fp16 d, fp16 m, 16 bytes of 4-bit values (low nibbles: 0..15, high: 16..31)
PROJECTIONS = {"attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"),
               "attn_v": ("self_attn", "v_proj"), "attn_output": ("self_attn", "o_proj"),
               "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj")}


def decode_q4_1(raw: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [rows, cols] int32 in 0..15, d [rows, cols/32] fp32, m [rows, cols/32] fp32) of Q4_1 blocks."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GROUP, _BLOCK_BYTES)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[:, :, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols).astype(np.int32)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m)


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order transformers' GGUF loader gives q/k projections (undoing llama.cpp's rope permute)."""
    idx = np.arange(n_rows)
    dim = n_rows // n_head // 2
    return torch.from_numpy(idx.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows).copy())


class Int4Linear(nn.Module):
    """y = x @ W.T with W = q * d + m held as packed int4 (bf16 activations, bf16 scales)."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int().contiguous(), 2),
                             persistent=False)
        # torch's int4 kernel computes (q - 8) * scale + zero
        sz = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).to(torch.bfloat16).contiguous()   # [in/32, out, 2]
        self.register_buffer("scales_zeros", sz, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def gguf_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def use_gguf_q4(model: nn.Module, gguf_path: str | None = None) -> int:
    """Swap the default target's projections for Int4Linears from its GGUF; returns how many. The model must
    be the default target (any dtype; it should be bf16, since the kernel takes bf16 activations)."""
    import gguf

    if not gguf_available():
        raise ValueError("this torch has no int4 CPU matmul (_weight_int4pack_mm_for_cpu)")
    if gguf_path is None:
        from .loading import GGUF_FILE, _gguf_dir
        gguf_path = str(_gguf_dir() / GGUF_FILE)
    reader = gguf.GGUFReader(gguf_path)
    config = model.config
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", config.num_attention_heads))
    layers = model.base_model.layers
    count = 0
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in PROJECTIONS:
            continue
        if t.tensor_type.name != "Q4_1":
            raise ValueError(f"{t.name} is {t.tensor_type.name}, not Q4_1")
        owner, attr = PROJECTIONS[parts[2]]
        module = getattr(layers[int(parts[1])], owner)
        dense = getattr(module, attr)
        cols, rows = (int(x) for x in t.shape.tolist())
        q, d, m = decode_q4_1(np.asarray(t.data), rows, cols)
        if parts[2] in ("attn_q", "attn_k"):
            order = _unpermute_rows(rows, heads if parts[2] == "attn_q" else kv)
            q, d, m = q[order], d[order], m[order]
        w = q.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)
        if not torch.equal(w.to(dense.weight.dtype), dense.weight.detach()):
            err = (w - dense.weight.detach().float()).abs().max().item()
            raise ValueError(f"{t.name}: the GGUF blocks do not match the model's weights (max error {err:g}); "
                             "use_gguf_q4 is for the default target only")
        setattr(module, attr, Int4Linear(q, d, m))
        count += 1
    if count != 7 * len(layers):
        raise ValueError(f"expected {7 * len(layers)} Q4_1 projections in {gguf_path}, found {count}")
    return count
