"""A cluster-wide prefix cache of K/V blocks in Redis (vLLM / LMCache style).

A prompt is cut into fixed-size token blocks; block i's key is a SHA-256 chained over the model identity
and every token up to the end of block i, so one key names a whole prefix. An entry holds the K/V of that
block for every layer (a header, a checksum and raw tensor bytes), is written with a TTL, and is skipped
when larger than `max_entry_bytes` (the server's `maxmemory` + `allkeys-lru` bounds the total). A lookup
fetches the keys of all blocks in one MGET and keeps the leading run of valid hits. Redis is shared, so an
entry is data from outside: it is used only when its dtype, shape, block length and layer count are the
model's (`KVLayout`) and its checksum holds; the model's fingerprint covers all of its weights.

Redis is an optimisation, never a dependency: any Redis error, a timeout, a missing or corrupt entry is a
miss. After an error the cache stays off for `retry_after_s` so an outage costs no latency per request.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

MAGIC = b"GSDKV1\0"
KEY_PREFIX = "gsd:v1:kv"


def model_fingerprint(model, name: str = "") -> str:
    """The identity of a model's architecture and of all its weights (K/V of another model must never be
    used): every parameter and buffer is hashed, once per replica (about a second for 135M parameters)."""
    cfg = model.config
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({k: getattr(cfg, k, None) for k in (
        "model_type", "num_hidden_layers", "num_key_value_heads", "num_attention_heads", "hidden_size",
        "vocab_size", "rope_theta", "max_position_embeddings")}, sort_keys=True, default=str).encode())
    h.update(name.encode())
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach().cpu().contiguous()
        h.update(f"{pname}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class KVLayout:
    """What every cached block of this model must be: [layers, 2, kv_heads, block, head_dim] of `dtype`."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str                  # torch dtype name without the "torch." prefix, e.g. "float32"

    @classmethod
    def of(cls, kv: torch.Tensor) -> "KVLayout":
        return cls(int(kv.shape[0]), int(kv.shape[2]), int(kv.shape[4]), str(kv.dtype).replace("torch.", ""))


def block_hashes(tokens: list[int], block_size: int, fingerprint: str, salt: str = "") -> list[str]:
    """Chained hashes of the full blocks of `tokens` (a short tail is not hashed)."""
    prev = hashlib.sha256(f"{fingerprint}|{block_size}|{salt}".encode()).digest()
    out = []
    for b in range(len(tokens) // block_size):
        h = hashlib.sha256(prev)
        h.update(struct.pack(f"<{block_size}I", *tokens[b * block_size:(b + 1) * block_size]))
        prev = h.digest()
        out.append(prev.hex())
    return out


@dataclass
class PrefixCacheStats:
    queries: int = 0            # lookups attempted
    hits: int = 0               # lookups that restored at least one block
    tokens_saved: int = 0       # prompt tokens restored instead of prefilled
    blocks_written: int = 0
    errors: int = 0             # Redis errors and corrupt entries (each one a miss)


@dataclass
class PrefixCache:
    """K/V block cache for one model. `url` None (or Redis unreachable) means every lookup misses."""

    url: str | None
    fingerprint: str
    block_size: int = 32
    ttl_s: int = 3600
    max_entry_bytes: int = 16 * 1024 * 1024
    max_blocks: int = 256             # blocks looked up / stored per prompt
    timeout_s: float = 0.5
    retry_after_s: float = 2.0
    layout: KVLayout | None = None    # entries are used only once checked against it (none: every lookup misses)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        self._client = None
        self._down_until = 0.0
        self._lock = threading.Lock()

    # -------------------------------------------------------------- redis plumbing
    def _redis(self):
        if not self.url or time.monotonic() < self._down_until:
            return None
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                                socket_connect_timeout=self.timeout_s, health_check_interval=30)
        return self._client

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        self._down_until = time.monotonic() + self.retry_after_s
        log.warning("prefix cache: Redis unavailable (%s); treating as a miss for %.0fs", exc, self.retry_after_s)
        try:
            if self._client is not None:
                self._client.close()
        except Exception:  # noqa: BLE001
            pass
        self._client = None

    def key(self, block_hash: str) -> str:
        return f"{KEY_PREFIX}:{self.fingerprint}:{self.block_size}:{block_hash}"

    # -------------------------------------------------------------- (de)serialisation
    @staticmethod
    def pack(block_hash: str, kv: torch.Tensor) -> bytes:
        """kv: [layers, 2, heads, block, head_dim]."""
        kv = kv.contiguous()
        payload = kv.numpy().tobytes()
        header = json.dumps({"hash": block_hash, "shape": list(kv.shape), "dtype": str(kv.dtype).replace("torch.", ""),
                             "crc": zlib.crc32(payload)}).encode()
        return MAGIC + struct.pack("<I", len(header)) + header + payload

    def unpack(self, block_hash: str, data: bytes) -> torch.Tensor:
        """The tensor of an entry; ValueError when it is not a valid entry of this block for this model.

        Redis is shared and writable by others: an entry is checked against the model's layout (dtype,
        layer count, heads, head size) and the block length before a byte of it is interpreted."""
        layout = self.layout
        if layout is None:
            raise ValueError("no model layout to check entries against")
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
            raise ValueError("bad magic")
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        if n > min(len(data) - start, 4096):
            raise ValueError("bad header length")
        header = json.loads(data[start:start + n])
        if not isinstance(header, dict):
            raise ValueError("bad header")
        payload = memoryview(data)[start + n:]
        if header.get("hash") != block_hash:
            raise ValueError("hash mismatch")
        shape = [layout.layers, 2, layout.kv_heads, self.block_size, layout.head_dim]
        if header.get("dtype") != layout.dtype:
            raise ValueError(f"dtype {header.get('dtype')!r} is not the model's {layout.dtype}")
        if header.get("shape") != shape:
            raise ValueError(f"shape {header.get('shape')!r} is not the model's {shape}")
        dtype = getattr(torch, layout.dtype)
        expected = shape[0] * shape[1] * shape[2] * shape[3] * shape[4] * torch.empty((), dtype=dtype).element_size()
        if len(payload) != expected:
            raise ValueError("payload size mismatch")
        if zlib.crc32(payload) != header.get("crc"):
            raise ValueError("checksum mismatch")
        return torch.frombuffer(bytearray(payload), dtype=dtype).view(shape)

    # -------------------------------------------------------------- lookup / store
    def lookup(self, tokens: list[int], limit: int) -> list[torch.Tensor]:
        """K/V tensors of the leading cached blocks of `tokens`, covering at most `limit` tokens."""
        nblocks = min(limit // self.block_size, self.max_blocks)
        if nblocks <= 0 or not self.url or self.layout is None:
            return []
        r = self._redis()
        if r is None:
            return []
        self.stats.queries += 1
        hashes = block_hashes(tokens[: nblocks * self.block_size], self.block_size, self.fingerprint)
        try:
            values = r.mget([self.key(h) for h in hashes])
        except Exception as exc:  # noqa: BLE001 (any failure is a miss)
            self._failed(exc)
            return []
        out = []
        for h, v in zip(hashes, values):
            if v is None:
                break
            try:
                out.append(self.unpack(h, v))
            except Exception as exc:  # noqa: BLE001 (a corrupt entry is a miss)
                self.stats.errors += 1
                log.warning("prefix cache: dropping corrupt entry %s (%s)", h[:12], exc)
                try:
                    r.delete(self.key(h))
                except Exception:  # noqa: BLE001
                    pass
                break
        if out:
            self.stats.hits += 1
            self.stats.tokens_saved += len(out) * self.block_size
        return out

    def store(self, tokens: list[int], kv_of_range, first_block: int = 0, limit: int | None = None) -> int:
        """Write blocks first_block.. of `tokens` (full blocks within `limit` tokens); returns blocks written.

        `kv_of_range(start, end)` gives the [layers, 2, heads, end - start, head_dim] K/V of those positions.
        Blocks already present are skipped (SET NX).
        """
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        nblocks = min(limit // self.block_size, self.max_blocks)
        if nblocks <= first_block or not self.url:
            return 0
        r = self._redis()
        if r is None:
            return 0
        hashes = block_hashes(tokens[: nblocks * self.block_size], self.block_size, self.fingerprint)
        written = 0
        try:
            exists = r.mget([self.key(h) for h in hashes[first_block:]])
            pipe = r.pipeline(transaction=False)
            for i, present in zip(range(first_block, nblocks), exists):
                if present is not None:
                    continue
                data = self.pack(hashes[i], kv_of_range(i * self.block_size, (i + 1) * self.block_size))
                if len(data) > self.max_entry_bytes:
                    continue
                pipe.set(self.key(hashes[i]), data, ex=self.ttl_s, nx=True)
                written += 1
            if written:
                pipe.execute()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return 0
        self.stats.blocks_written += written
        return written


# ---------------------------------------------------------------- K/V export / import for KVCache

def export_kv(cache, start: int, end: int) -> torch.Tensor:
    """[layers, 2, heads, end - start, head_dim] copy of a KVCache's entries start..end (batch 1)."""
    return torch.stack([torch.stack([layer.keys[0, :, start:end], layer.values[0, :, start:end]])
                        for layer in cache.layers]).cpu().clone()


def import_kv(cache, blocks: list[torch.Tensor], n_layers: int, device=None) -> int:
    """Append cached blocks to an empty KVCache (layers are created by the first update); returns tokens restored."""
    if not blocks:
        return 0
    kv = torch.cat(blocks, dim=3)
    if kv.shape[0] != n_layers:
        raise ValueError("cached K/V has another layer count")
    if device is not None:
        kv = kv.to(device)
    for i in range(n_layers):
        k = kv[i, 0].unsqueeze(0).contiguous()
        v = kv[i, 1].unsqueeze(0).contiguous()
        cache.update(k, v, i)
    return kv.shape[3]
