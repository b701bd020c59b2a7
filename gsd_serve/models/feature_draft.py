"""A draft that reads the target's features (EAGLE-3 style): one decoder layer over the token embedding and
a feature of the previous position, predicting tokens over a reduced vocabulary.

The input of the row for token t_j at position j is

    inp([rms(embed(t_j)), rms(feature_{j-1})])    feature_{j-1} = fuse(target's hidden states after a low, a
                                                 middle and a top layer at position j-1), for committed
                                                 tokens; the draft's own output state at j-1 for drafted ones

then one Llama decoder layer (attention over the draft's own KV cache), a final norm and the output layer
restricted to `output_ids`. The target computes those hidden states anyway (its verification forward
covers every tree node; prefill covers the prompt), so the draft sees what the target "thought" one
position earlier: the reason such drafts agree with the target far more often than an independent small
model (EAGLE-3, arXiv 2503.01840). Deeper drafting levels feed the draft's own output state in place of
the fused feature, which is what training-time test (training/features.py: `gsd-serve distill --kind features`) trains it for.

Files (a checkpoint directory): config.json ({"draft_kind": "features", ...}), model.safetensors (the draft's
own tensors; the embedding is the target's and is taken from it at load time), draft_vocab.json.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.kv_cache import KVCache

KIND = "features"
DEFAULT_FEATURE_LAYERS = (2, 15, 29)    # low / middle / top of a 30-layer target (after these layers)


@dataclass
class FeatureDraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int                       # the target's (the embedding's rows)
    feature_layers: list[int] = field(default_factory=lambda: list(DEFAULT_FEATURE_LAYERS))
    draft_kind: str = KIND

    @property
    def feature_width(self) -> int:
        return self.hidden_size * len(self.feature_layers)

    @classmethod
    def from_target(cls, config, feature_layers=DEFAULT_FEATURE_LAYERS) -> "FeatureDraftConfig":
        n = int(config.num_hidden_layers)
        layers = [int(i) for i in feature_layers]
        if not layers or any(not 0 <= i < n for i in layers):
            raise ValueError(f"feature layers must be in [0, {n}), got {layers}")
        rope = getattr(config, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        heads = int(config.num_attention_heads)
        return cls(hidden_size=int(config.hidden_size), intermediate_size=int(config.intermediate_size),
                   num_attention_heads=heads, num_key_value_heads=int(getattr(config, "num_key_value_heads", heads)),
                   head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                   rms_norm_eps=float(config.rms_norm_eps), rope_theta=theta, vocab_size=int(config.vocab_size),
                   feature_layers=layers)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureDraftConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def is_feature_draft(path) -> bool:
    f = Path(path) / "config.json"
    try:
        return f.exists() and json.loads(f.read_text()).get("draft_kind") == KIND
    except (OSError, ValueError):
        return False


def is_feature_draft_model(model) -> bool:
    return isinstance(model, FeatureDraft)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FeatureDraft(nn.Module):
    """The draft network. `rows` below means any leading shape; positions give each row's rotary angle."""

    def __init__(self, config: FeatureDraftConfig, output_ids: torch.Tensor):
        super().__init__()
        c = self.config = config
        d, hd = c.hidden_size, c.head_dim
        self.embed = nn.Embedding(c.vocab_size, d)
        self.fuse = nn.Linear(c.feature_width, d, bias=False)
        self.norm_embed = RMSNorm(d, c.rms_norm_eps)
        self.norm_feature = RMSNorm(d, c.rms_norm_eps)
        self.inp = nn.Linear(2 * d, d, bias=False)
        self.input_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, c.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, c.rms_norm_eps)
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)
        self.norm = RMSNorm(d, c.rms_norm_eps)
        self.head = nn.Linear(d, int(output_ids.numel()), bias=False)
        self.register_buffer("output_ids", output_ids.clone().long(), persistent=False)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    # pieces ---------------------------------------------------------------------------------------
    def fused(self, target_features: torch.Tensor) -> torch.Tensor:
        """[rows, feature_width] target hidden states -> [rows, d] draft features."""
        return self.fuse(target_features.to(self.compute_dtype))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: the weights' (fp32 where the projections run as Q8_0 blocks)."""
        return self.norm.weight.dtype

    def quantize_q8(self) -> int:
        """Run every projection and the output layer as Q8_0 blocks in the C kernels (gguf_blocks): a forward
        of a few rows reads a quarter of fp32's bytes and skips the small-GEMM penalty of unpacked weights.
        Lossy, which a draft may be: its numbers only shape proposals. Returns how many were swapped."""
        from .gguf_blocks import q8_linear

        if self.compute_dtype != torch.float32:
            raise ValueError("Q8_0 blocks run with fp32 activations: load the feature draft in float32")
        names = ("fuse", "inp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "head")
        for name in names:
            setattr(self, name, q8_linear(getattr(self, name), name))
        return len(names)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def qkv(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor):
        """Input rows -> (residual x, q, k, v) with q/k rotated; q: [..., heads, rows, hd]."""
        c = self.config
        e = self.embed(tokens)
        x = self.inp(torch.cat([self.norm_embed(e), self.norm_feature(features.to(e.dtype))], dim=-1))
        a = self.input_layernorm(x)
        lead = a.shape[:-2]
        n = a.shape[-2]
        q = self.q_proj(a).view(*lead, n, c.num_attention_heads, c.head_dim).transpose(-3, -2)
        k = self.k_proj(a).view(*lead, n, c.num_key_value_heads, c.head_dim).transpose(-3, -2)
        v = self.v_proj(a).view(*lead, n, c.num_key_value_heads, c.head_dim).transpose(-3, -2)
        cos, sin = self.rope(positions, q.dtype)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return x, q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual stream after attention output `attn` [..., heads, rows, hd] and the MLP: the state."""
        lead = attn.shape[:-3]
        n = attn.shape[-2]
        h = x + self.o_proj(attn.transpose(-3, -2).reshape(*lead, n, -1))
        m = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(states)).float()

    # inference over a KV cache ---------------------------------------------------------------------
    def step(self, cache: KVCache, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
        """States [n, d] of n rows fed after the cache (their K/V appended), attending under `mask`
        ([1, 1, n, cache.length + n], True = attend; None: causal among the new rows)."""
        x, q, k, v = self.qkv(tokens[None], features[None], positions[None])
        start = cache.length
        keys, values = cache.update(k, v, 0)
        n = tokens.numel()
        if mask is None and n > 1:
            mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)[None, None]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              enable_gqa=keys.shape[1] != q.shape[1])
        return self.finish(x, attn)[0]


def new_feature_draft(target, output_ids: torch.Tensor,
                      feature_layers=DEFAULT_FEATURE_LAYERS) -> FeatureDraft:
    """A fresh draft for `target`: its embedding, its output rows for `output_ids`, and the decoder layer
    copied from the target's last layer (a start that already maps a residual stream to next tokens)."""
    config = FeatureDraftConfig.from_target(target.config, feature_layers)
    draft = FeatureDraft(config, output_ids)
    dec = target.base_model
    with torch.no_grad():
        draft.embed.weight.copy_(dec.embed_tokens.weight.float())
        draft.head.weight.copy_(target.get_output_embeddings().weight.float()[output_ids])
        last = dec.layers[-1]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(draft, name).weight.copy_(getattr(last.self_attn, name).weight.float())
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(draft, name).weight.copy_(getattr(last.mlp, name).weight.float())
        draft.input_layernorm.weight.copy_(last.input_layernorm.weight.float())
        draft.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight.float())
        draft.norm.weight.copy_(dec.norm.weight.float())
    return draft


SHARED_WITH_TARGET = ("embed.weight", "head.weight")   # not stored: the target's embedding (tied head) rows


def save_feature_draft(draft: FeatureDraft, path: Path, dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in draft.state_dict().items()
             if k not in SHARED_WITH_TARGET}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(asdict(draft.config), indent=1))
    (path / "draft_vocab.json").write_text(json.dumps({"token_ids": draft.output_ids.tolist()}))


def load_feature_draft(path, target, dtype: torch.dtype = torch.float32) -> FeatureDraft:
    """The draft in `path`, completed with the target's embedding and output rows."""
    from safetensors.torch import load_file

    path = Path(path)
    config = FeatureDraftConfig.from_dict(json.loads((path / "config.json").read_text()))
    if config.vocab_size != int(target.config.vocab_size) or config.hidden_size != int(target.config.hidden_size):
        raise ValueError(f"{path}: a feature draft for another target (vocabulary {config.vocab_size}, "
                         f"width {config.hidden_size})")
    output_ids = torch.tensor(json.loads((path / "draft_vocab.json").read_text())["token_ids"], dtype=torch.long)
    draft = FeatureDraft(config, output_ids)
    state = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    embed = target.base_model.embed_tokens.weight.detach().float()
    state["embed.weight"] = embed
    state["head.weight"] = target.get_output_embeddings().weight.detach().float()[output_ids]
    draft.load_state_dict(state)
    return draft.to(dtype).eval()


class FeatureDraftRunner:
    """The runner interface for a FeatureDraft (see core/runner.py), with features.

    `forward(cache, tokens, positions, mask, last_only, features=...)`: each row's feature is either a
    target feature (width feature_width: fused here) or a draft state (width d). `forward_states` returns
    the rows' output states too, which drafting feeds to the children of those rows.
    """

    needs_features = True

    def __init__(self, draft: FeatureDraft):
        self.model = draft.eval()
        self.output_ids = draft.output_ids
        self.vocab_size = draft.config.vocab_size
        self.feature_layers = tuple(draft.config.feature_layers)
        self.feature_width = draft.config.feature_width
        self.dtype = draft.compute_dtype
        self.forwards = 0
        self.tokens_fed = 0

    def new_cache(self) -> KVCache:
        return KVCache()

    @torch.inference_mode()
    def forward_states(self, cache, tokens: torch.Tensor, features: torch.Tensor, positions=None, mask=None,
                       last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.numel()
        if positions is None:
            positions = torch.arange(cache.length, cache.length + n)
        if features.shape != (n, features.shape[-1]) or features.shape[-1] not in (self.feature_width,
                                                                                      self.model.config.hidden_size):
            raise ValueError(f"features must be [{n}, {self.feature_width}] (target) or [{n}, "
                             f"{self.model.config.hidden_size}] (draft states), got {tuple(features.shape)}")
        feats = self.model.fused(features) if features.shape[-1] == self.feature_width else features.to(self.dtype)
        states = self.model.step(cache, tokens, feats, positions, mask)
        self.forwards += 1
        self.tokens_fed += n
        out = states[-1:] if last_only else states
        return self.model.logits(out), states

    fuses_many = True

    @torch.inference_mode()
    def forward_states_many(self, caches: list, tokens: list[torch.Tensor], features: list[torch.Tensor],
                            positions: list[torch.Tensor], masks: list, last_only=False) -> list:
        """`forward_states` for several sequences in one pass: their rows share every projection and MLP GEMM,
        each attends only to its own cache under its own mask (None: causal among its new rows)."""
        last = list(last_only) if isinstance(last_only, (list, tuple)) else [bool(last_only)] * len(caches)
        m = self.model
        rows = []
        for t, f in zip(tokens, features):
            n = t.numel()
            if f is None or f.shape != (n, f.shape[-1]) or f.shape[-1] not in (self.feature_width, m.config.hidden_size):
                raise ValueError(f"features must be [{n}, {self.feature_width}] (target) or [{n}, "
                                 f"{m.config.hidden_size}] (draft states), got {None if f is None else tuple(f.shape)}")
            rows.append(m.fused(f) if f.shape[-1] == self.feature_width else f.to(self.dtype))
        sizes = [t.numel() for t in tokens]
        x, q, k, v = m.qkv(torch.cat(tokens)[None], torch.cat(rows)[None], torch.cat(positions)[None])
        outs, a = [], 0
        for cache, n, mask in zip(caches, sizes, masks):
            start = cache.length
            keys, values = cache.update(k[:, :, a:a + n], v[:, :, a:a + n], 0)
            if mask is None and n > 1:
                mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)[None, None]
            outs.append(F.scaled_dot_product_attention(q[:, :, a:a + n], keys, values, attn_mask=mask,
                                                       enable_gqa=keys.shape[1] != q.shape[1]))
            a += n
        states = m.finish(x, torch.cat(outs, dim=2))[0]
        self.forwards += 1
        self.tokens_fed += sum(sizes)
        per = list(states.split(sizes))
        picked = [s[-1:] if lo else s for s, lo in zip(per, last)]
        logits = m.logits(torch.cat(picked)).split([p.shape[0] for p in picked])
        return list(zip(logits, per))

    def forward(self, cache, tokens, positions=None, mask=None, last_only=False, features=None) -> torch.Tensor:
        if features is None:
            raise ValueError("a feature draft needs each row's feature (target features or draft states)")
        return self.forward_states(cache, tokens, features, positions, mask, last_only)[0]

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.output_ids[ids]
