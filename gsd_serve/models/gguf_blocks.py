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

import mmap
import struct
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from .checkpoints import gguf_path as default_gguf_path
from .gguf_kernels import block_matmul

GROUP = 32
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}   # Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; Q8_0: fp16 d, 32 int8
PROJECTIONS = {"attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"),
               "attn_v": ("self_attn", "v_proj"), "attn_output": ("self_attn", "o_proj"),
               "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"), "ffn_down": ("mlp", "down_proj")}


GGML_KINDS = {3: "Q4_1", 8: "Q8_0"}       # ggml type ids of the two block kinds (others are not multiplied here)


class GGUFTensor(NamedTuple):
    name: str
    kind: str                   # "Q4_1", "Q8_0" or "ggml type N"
    dims: tuple[int, ...]       # GGUF order: (inputs, outputs) for a weight matrix
    data: np.ndarray | None     # uint8 view of the blocks [outputs, inputs / 32 * block bytes]; None: other kinds


def gguf_tensors(path: str) -> list[GGUFTensor]:
    """The tensors of a GGUF file (format v2/v3), their block bytes mapped from the file, without decoding its
    metadata: the `gguf` package's reader builds a numpy view per field and takes ~3 s on the default target's
    100k-entry vocabulary (on every target load), where skipping the fields takes ~50 ms."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if mm[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    pos = 24
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # value type -> bytes

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype in scalar:
            pos += scalar[vtype]
        elif vtype == 8:                                  # string: u64 length + bytes
            pos += 8 + struct.unpack_from("<Q", mm, pos)[0]
        elif vtype == 9:                                  # array: u32 element type, u64 count, elements
            etype, count = struct.unpack_from("<IQ", mm, pos)
            pos += 12
            if etype in scalar:
                pos += scalar[etype] * count
            else:
                for _ in range(count):
                    skip_value(etype)
        else:
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

    alignment = 32
    for _ in range(n_kv):
        klen = struct.unpack_from("<Q", mm, pos)[0]
        key = mm[pos + 8: pos + 8 + klen]
        pos += 8 + klen
        vtype = struct.unpack_from("<I", mm, pos)[0]
        pos += 4
        if key == b"general.alignment" and vtype == 4:
            alignment = struct.unpack_from("<I", mm, pos)[0]
        skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        nlen = struct.unpack_from("<Q", mm, pos)[0]
        name = mm[pos + 8: pos + 8 + nlen].decode()
        pos += 8 + nlen
        n_dims = struct.unpack_from("<I", mm, pos)[0]
        dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, ttype, dims, offset))
    start = -(-pos // alignment) * alignment
    buf = np.frombuffer(mm, dtype=np.uint8)
    out = []
    for name, ttype, dims, offset in infos:
        kind = GGML_KINDS.get(ttype, f"ggml type {ttype}")
        data = None
        if kind in BLOCK_BYTES:
            rows = int(np.prod(dims[1:]))
            row_bytes = dims[0] // GROUP * BLOCK_BYTES[kind]
            data = buf[start + offset: start + offset + rows * row_bytes].reshape(rows, row_bytes)
        out.append(GGUFTensor(name, kind, tuple(int(d) for d in dims), data))
    return out


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


def repack(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """GGUF blocks [rows, nb * block bytes] -> the kernels' row layout (gguf_matmul.c): per row the blocks'
    fp16 scales d, then (Q4_1) their minimums m, then their q bytes. The same bytes, reordered."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, BLOCK_BYTES[kind])
    parts = [b[:, :, 0:2]] + ([b[:, :, 2:4], b[:, :, 4:]] if kind == "Q4_1" else [b[:, :, 2:]])
    return torch.cat([p.reshape(rows, -1) for p in parts], dim=1).contiguous()


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """A dense weight [rows, cols] as Q8_0 blocks in the kernels' row layout (per 32 inputs an fp16 scale
    d = max|w| / 127 and int8 q = round(w / d)), as llama.cpp quantizes. Lossy: for a draft, whose numerics only
    shape proposals (verification keeps the output exact), never for the target."""
    w = weight.detach().float()
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // GROUP, GROUP)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half()
    safe = torch.where(d.float() == 0, torch.ones_like(d.float()), d.float())
    q = torch.round(blocks / safe).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8).reshape(rows, -1), q.view(torch.uint8).reshape(rows, -1)], dim=1).contiguous()


def q8_linear(dense: nn.Module, name: str = "linear") -> "BlockLinear":
    """A bias-free nn.Linear as Q8_0 blocks (lossy: for drafts only)."""
    weight = getattr(dense, "weight", None)
    if weight is None or getattr(dense, "bias", None) is not None or weight.shape[1] % GROUP:
        raise ValueError(f"{name} cannot run as Q8_0 blocks")
    return BlockLinear("Q8_0", quantize_q8_0(weight.detach().float()), weight.shape[1])


def use_q8_blocks(model: nn.Module) -> int:
    """Quantize a (draft) model's projections and output layer to Q8_0 blocks run by the C kernels
    (GGUFDecoder, and ModelRunner for the output layer, reduced to a draft's vocabulary by taking rows); returns
    how many. Lossy, so for drafts only."""
    count = 0
    for layer in model.base_model.layers:
        for owner_name, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            owner = getattr(layer, owner_name)
            for name in names:
                setattr(owner, name, q8_linear(getattr(owner, name), f"{owner_name}.{name}"))
                count += 1
    model.set_output_embeddings(q8_linear(model.get_output_embeddings(), "the output layer"))
    return count + 1


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order transformers' GGUF loader gives q/k projections (undoing llama.cpp's rope permute)."""
    idx = np.arange(n_rows)
    dim = n_rows // n_head // 2
    return torch.from_numpy(idx.reshape(n_head, dim, 2).swapaxes(2, 1).reshape(n_rows).copy())


class BlockLinear(nn.Module):
    """y = x @ W.T, W held as GGUF blocks (kind Q4_1 or Q8_0) in the kernels' row layout (`repack`), fp32 in
    and out."""

    def __init__(self, kind: str, blocks: torch.Tensor, in_features: int):
        super().__init__()
        if kind not in BLOCK_BYTES or in_features % GROUP or in_features > 4096 * GROUP:
            raise ValueError(f"unsupported block weight {kind} with {in_features} inputs")
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)

    def rows(self, ids: torch.Tensor) -> "BlockLinear":
        """This weight's rows `ids` (a reduced output vocabulary): the same blocks, fewer outputs."""
        return BlockLinear(self.kind, self.blocks[ids], self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y = block_matmul(self.kind.lower(), flat, self.blocks, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


def use_gguf_blocks(model: nn.Module, gguf_path: str | None = None) -> int:
    """Swap the default target's projections and output layer for BlockLinears over its GGUF's blocks;
    returns how many were swapped. The model must be the default target in fp32 (the blocks are checked
    against its weights, element by element)."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("GGUF block weights run with fp32 activations: load the target in float32")
    tensors = gguf_tensors(gguf_path or str(default_gguf_path()))
    config = model.config
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", config.num_attention_heads))
    layers = model.base_model.layers
    count = 0

    def swap(owner: nn.Module, attr: str, t: GGUFTensor, dense: torch.Tensor,
             order: torch.Tensor | None = None) -> None:
        if t.data is None:
            raise ValueError(f"{t.name} is {t.kind}, not Q4_1 or Q8_0")
        kind, cols = t.kind, t.dims[0]
        blocks = torch.from_numpy(t.data.copy())
        if order is not None:
            blocks = blocks[order]
        if not torch.equal(dequantize(kind, blocks, cols), dense.detach()):
            err = (dequantize(kind, blocks, cols) - dense.detach()).abs().max().item()
            raise ValueError(f"{t.name}: the GGUF blocks do not match the model's weights (max error {err:g}); "
                             "GGUF block weights are for the default target only")
        setattr(owner, attr, BlockLinear(kind, repack(kind, blocks), cols))

    for t in tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight" and getattr(config, "tie_word_embeddings", False):
            swap(model, "lm_head", t, model.get_input_embeddings().weight)
            count += 1
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in PROJECTIONS:
            owner, attr = PROJECTIONS[parts[2]]
            module = getattr(layers[int(parts[1])], owner)
            rows = t.dims[1]
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
    """The decoder forward over GGUF block weights: each layer is one call into this project's C kernels
    (`layer_forward`: RMSNorm, the fused q|k|v projection, RoPE and the cache write, attention, o_proj, the
    fused gate|up projection, SiLU, down_proj, both residual adds).

    Same interface and arithmetic as LeanDecoder (models/llama_forward.py), but everything runs per token in
    fixed orders, so a token's hidden state is bit-identical whether it is decoded alone, verified in a tree
    or batched with other sequences; and a layer costs one call instead of ~40 tensor operations, which on a
    2-core CPU is several milliseconds per step."""

    def __init__(self, model: nn.Module, arch: str = "native"):
        from .gguf_kernels import library

        self.lib = library(arch)     # this CPU's build; the tests also run the portable one
        dec = model.base_model
        self.decoder = dec
        cfg = model.config
        first = dec.layers[0].self_attn
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(first.head_dim)
        if self.head_dim % 16 or self.heads % self.kv_heads:
            raise ValueError("GGUFDecoder needs a head size that is a multiple of 16 and whole KV groups")
        self.scaling = float(getattr(first, "scaling", self.head_dim ** -0.5))
        self.hidden_size = int(cfg.hidden_size)
        self.ff = int(dec.layers[0].mlp.gate_proj.out_features)
        self.layers = []
        self._keep = []     # the fused weights and fp32 norms the pointers below point into
        for layer in dec.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = [_fuse([attn.q_proj, attn.k_proj, attn.v_proj]), attn.o_proj,
                     _fuse([mlp.gate_proj, mlp.up_proj]), mlp.down_proj]
            kinds = {p.kind for p in parts}
            if len(kinds) != 1:
                raise ValueError("GGUFDecoder runs a layer's projections in one block kind")
            n1 = layer.input_layernorm.weight.detach().float().contiguous()
            n2 = layer.post_attention_layernorm.weight.detach().float().contiguous()
            self._keep.append((parts, n1, n2))
            self.layers.append((4 if kinds == {"Q4_1"} else 8,
                                n1.data_ptr(), float(layer.input_layernorm.variance_epsilon), parts[0].blocks.data_ptr(),
                                parts[1].blocks.data_ptr(), n2.data_ptr(),
                                float(layer.post_attention_layernorm.variance_epsilon), parts[2].blocks.data_ptr(),
                                parts[3].blocks.data_ptr()))
        self.final_norm = (dec.norm.weight.detach().float().contiguous(), float(dec.norm.variance_epsilon))

    def __call__(self, cache, tokens, positions, mask):
        return self.forward_many([cache], [tokens], [positions], [mask])[0]

    @torch.inference_mode()
    def forward_many(self, caches: list, tokens: list[torch.Tensor], positions: list[torch.Tensor],
                     masks: list[torch.Tensor | None], collect: tuple[int, ...] = ()) -> list:
        import ctypes

        dec, lib = self.decoder, self.lib
        H, KVH, hd, d, ff = self.heads, self.kv_heads, self.head_dim, self.hidden_size, self.ff
        sizes = [t.numel() for t in tokens]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        n, nseq = bounds[-1], len(caches)
        h = dec.embed_tokens(torch.cat(tokens)).float().contiguous()             # [n, d], updated in place
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
        c_bounds = (ctypes.c_int * (nseq + 1))(*bounds)
        c_masks = (ctypes.c_void_p * nseq)(*[None if m is None else m.data_ptr() for m in mask_bytes])
        c_k, c_v = (ctypes.c_void_p * nseq)(), (ctypes.c_void_p * nseq)()
        c_caps, c_starts = (ctypes.c_long * nseq)(), (ctypes.c_long * nseq)()
        scratch = torch.empty(n * (d + (H + 2 * KVH) * hd + 2 * H * hd + 3 * ff + d))
        kept = {}
        for i, (kind, n1, e1, qkv, o, n2, e2, gate_up, down) in enumerate(self.layers):
            for s, (cache, size) in enumerate(zip(caches, sizes)):
                kbuf, vbuf, start = cache.append_slots(i, size, KVH, hd, torch.float32)
                c_k[s], c_v[s], c_caps[s], c_starts[s] = kbuf.data_ptr(), vbuf.data_ptr(), kbuf.shape[2], start
            lib.layer_forward(kind, h.data_ptr(), n, d, n1, e1, qkv, o, n2, e2, gate_up, ff, down, cos.data_ptr(),
                              sin.data_ptr(), nseq, c_bounds, c_k, c_v, c_caps, c_starts, c_masks, H, KVH, hd,
                              self.scaling, scratch.data_ptr())
            if i in collect:
                kept[i] = h.clone()
        hidden = torch.empty_like(h)
        lib.rms_norm(h.data_ptr(), self.final_norm[0].data_ptr(), self.final_norm[1], n, d, hidden.data_ptr())
        if not collect:
            return [hidden[a:b] for a, b in zip(bounds, bounds[1:])]
        feats = torch.cat([kept[i] for i in collect], dim=-1)
        return [(hidden[a:b], feats[a:b]) for a, b in zip(bounds, bounds[1:])]


def uses_gguf_blocks(model: nn.Module) -> bool:
    """Whether `model`'s projections run on GGUF blocks (use_gguf_blocks)."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    return bool(layers) and isinstance(getattr(layers[0].self_attn, "q_proj", None), BlockLinear)


def gguf_decoder(model: nn.Module) -> GGUFDecoder | None:
    """A GGUFDecoder where `model`'s projections run on GGUF blocks (use_gguf_blocks), else None."""
    return GGUFDecoder(model) if uses_gguf_blocks(model) else None
