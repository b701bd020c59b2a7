"""What the core needs from a model: the runner interface that drafting and verification call.

gsd_serve.models.ModelRunner implements it for any transformers causal LM, and the tensor-parallel runner
for a sharded one; the core never imports either.
"""
from __future__ import annotations

from typing import Protocol

import torch


class Cache(Protocol):
    """One sequence's KV cache (core.kv_cache.KVCache, or a handle to caches on tensor-parallel ranks)."""

    @property
    def length(self) -> int: ...

    def truncate(self, length: int) -> None: ...

    def keep(self, start: int, positions) -> None: ...


class Runner(Protocol):
    vocab_size: int
    output_ids: torch.Tensor | None   # a draft's reduced output vocabulary (logit row i is token output_ids[i])

    def new_cache(self) -> Cache: ...

    def forward(self, cache: Cache, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [n, V] of `tokens` fed after the cache's contents (positions default to continuing it;
        `mask` is a boolean [1, 1, n, cache.length + n] attention mask, True = attend)."""

    def to_full_ids(self, ids: torch.Tensor) -> torch.Tensor: ...
