"""A KV cache that grows in place and compacts by gathering, never by copying the whole cache.

transformers' DynamicCache concatenates on every step (a full copy per forward) and can only crop its tail.
Speculative decoding needs two more operations per round: append a tree of tokens, then keep only the
accepted path. `KVCache` keeps one preallocated buffer per layer (doubled when full) and implements
both as slice writes.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_MIN_CAPACITY = 256


class BufferLayer(DynamicLayer):
    """One layer's keys and values in a buffer of shape [batch, heads, capacity, head_dim]."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self._k = key_states.new_empty(key_states.shape[:2] + (_MIN_CAPACITY, key_states.shape[-1]))
        self._v = value_states.new_empty(value_states.shape[:2] + (_MIN_CAPACITY, value_states.shape[-1]))
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = self._k.shape[-2]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[:2] + (capacity, old.shape[-1]))
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self.length + n)
        self._k[..., self.length : self.length + n, :] = key_states
        self._v[..., self.length : self.length + n, :] = value_states
        self.length += n
        self.keys = self._k[..., : self.length, :]
        self.values = self._v[..., : self.length, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized and tokens_to_remove < 0:
            self.truncate(max(0, self.length + tokens_to_remove))

    def truncate(self, length: int) -> None:
        if not self.is_initialized:
            return
        self.length = min(self.length, length)
        self.keys = self._k[..., : self.length, :]
        self.values = self._v[..., : self.length, :]

    def keep(self, start: int, positions: torch.Tensor) -> None:
        """Move the entries at `positions` (all >= start, increasing) to start.. and drop the rest."""
        if not self.is_initialized:
            return
        m = positions.numel()
        # The gathered rows are materialised before the write, so overlapping ranges are safe.
        self._k[..., start : start + m, :] = self._k[..., positions, :]
        self._v[..., start : start + m, :] = self._v[..., positions, :]
        self.truncate(start + m)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("KVCache holds one sequence")


class KVCache(Cache):
    """The cache of one sequence, for any decoder-only transformers model with standard attention layers."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=BufferLayer)

    @property
    def length(self) -> int:
        return self.layers[0].get_seq_length() if self.layers else 0

    def append_slots(self, layer_idx: int, n: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                     device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for n new entries of layer `layer_idx`, for a forward that writes them itself: returns that
        layer's key and value buffers [1, kv_heads, capacity, head_dim] and the first new slot; the new
        entries count as cached from now on."""
        while len(self.layers) <= layer_idx:
            self.layers.append(BufferLayer())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            empty = torch.empty(1, kv_heads, 0, head_dim, dtype=dtype, device=device)
            layer.lazy_initialization(empty, empty)
        start = layer.length
        layer._reserve(start + n)
        layer.length = start + n
        layer.keys = layer._k[..., : layer.length, :]
        layer.values = layer._v[..., : layer.length, :]
        return layer._k, layer._v, start

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def keep(self, start: int, positions: torch.Tensor | list[int]) -> None:
        """Keep entries [0, start) and then the entries at `positions`, in that order."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.numel() and bool((positions == torch.arange(start, start + positions.numel())).all()):
            self.truncate(start + positions.numel())
            return
        for layer in self.layers:
            layer.keep(start, positions)
