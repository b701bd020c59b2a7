"""What both workers share: the leased session table and the checks of a call's committed tokens.

The router owns the committed tokens; every call carries the tokens committed since its last call to
this worker, so a worker can always check its caches against the truth and repair them (truncate what
diverged, feed what is missing). A session this worker does not hold is rebuilt from the full
sequence (the router resends it when asked with STATUS_RESYNC).
"""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager

from ..core.sampling import TokenChooser
from . import rpc
from .errors import BadRequest, Expired


class SessionTable:
    """Sessions leased with a TTL and bounded twice, least recently used evicted first: by count
    (`max_sessions`) and by the memory their caches hold (`max_bytes`, measured by `size_of(value)` each
    time a session is put back: caches grow as sequences do). A count alone bounds nothing useful: one
    full-length fp32 cache of the default target is ~0.4 GB, so 64 of them are ~24 GB. The session just put
    is never evicted by its own put (it is the one in use); it goes first once it is the oldest."""

    def __init__(self, max_sessions: int = 64, ttl_s: float = 300.0, clock=time.monotonic,
                 max_bytes: int | None = None, size_of=None):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock          # seconds; a test steps its own clock instead of sleeping past the TTL
        self.max_bytes = max_bytes
        self.size_of = size_of or (lambda value: 0)
        self._items: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        self.evicted = 0

    def _drop(self, sid: str) -> None:
        del self._items[sid]
        self.bytes -= self._sizes.pop(sid, 0)

    def get(self, sid: str):
        item = self._items.get(sid)
        if item is None:
            return None
        if self.clock() - item[0] > self.ttl_s:
            self._drop(sid)
            self.evicted += 1
            return None
        self._items[sid] = (self.clock(), item[1])
        self._items.move_to_end(sid)
        return item[1]

    def put(self, sid: str, value) -> None:
        self._items[sid] = (self.clock(), value)
        self._items.move_to_end(sid)
        size = int(self.size_of(value))
        self.bytes += size - self._sizes.get(sid, 0)
        self._sizes[sid] = size
        self.sweep(keep=sid)

    def pop(self, sid: str):
        item = self._items.get(sid)
        if item is None:
            return None
        self._drop(sid)
        return item[1]

    def sweep(self, keep: str | None = None) -> None:
        now = self.clock()
        for sid in [s for s, (t, _) in self._items.items() if now - t > self.ttl_s]:
            self._drop(sid)
            self.evicted += 1
        while len(self._items) > self.max_sessions or (self.max_bytes is not None and self.bytes > self.max_bytes):
            victim = next((s for s in self._items if s != keep), None)
            if victim is None:
                break
            self._drop(victim)
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        return list(self._items)


def cache_bytes(cache) -> int:
    """Bytes a KVCache holds (its buffers' capacity, which is what it occupies); 0 for caches kept elsewhere
    (tensor-parallel ranks)."""
    total = 0
    for layer in getattr(cache, "layers", ()) or ():
        for name in ("_k", "_v"):
            t = getattr(layer, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def default_session_bytes() -> int:
    """A worker's default bound on its sessions' memory: a quarter of this machine's physical memory."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 1024 ** 3


def still_wanted(expired) -> None:
    """Checked once the model lock is held: a call that waited out its deadline behind other work is
    answered without spending a forward on it."""
    if expired is not None and expired():
        raise Expired("the caller's deadline passed while the call waited for the model")


def committed_tokens(old: list[int] | None, delta_start: int, delta) -> list[int] | None:
    """The router's committed tokens: ours up to delta_start, then the delta. None: we must resync."""
    if not delta:
        raise BadRequest("delta must hold at least the root token")
    if delta_start == 0:
        return list(delta)
    if old is None or delta_start > len(old):
        return None
    return old[:delta_start] + list(delta)


def common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_tokens(tokens, vocab_size: int, what: str) -> None:
    for t in tokens:
        if not 0 <= t < vocab_size:
            raise BadRequest(f"{what}: token id {t} outside the vocabulary [0, {vocab_size})")


def chooser_from_proto(msg, vocab_size: int) -> TokenChooser:
    try:
        params = rpc.sampling_from_proto(msg)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if not params.greedy and params.seed is None:
        raise BadRequest("sampling needs a seed (the router sets one) so draft and target agree")
    return TokenChooser(params, vocab_size)


def replica_identity() -> str:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return f"{ctx.deployment}#{ctx.replica_id.unique_id}"
    except Exception:  # noqa: BLE001 (not in a Serve replica)
        return f"local#{uuid.uuid4().hex[:8]}"


class LoadMeter:
    """What a worker measures of its own load over the last `window_s` seconds: sessions seen, calls waiting
    for the model, the fraction of time the model computed, and sessions per fused forward. Reported in Info
    and to Serve's autoscaler (services/autoscaling.py): the router calls workers on their own gRPC ports, so
    Serve itself counts no requests on them."""

    def __init__(self, window_s: float = 10.0, clock=time.monotonic):
        import threading

        self.window_s = window_s
        self.clock = clock
        self.queued = 0                       # calls waiting for the model now
        self._count_lock = threading.Lock()
        self._busy: list[tuple[float, float]] = []      # (start, end) of model work
        self._batches: list[tuple[float, int]] = []     # (time, sessions) of fused forwards
        self._seen: dict[str, float] = {}               # session -> last call

    def _prune(self, now: float) -> None:
        cut = now - self.window_s
        if self._busy and self._busy[0][1] < cut:
            self._busy = [b for b in self._busy if b[1] >= cut]
        if self._batches and self._batches[0][0] < cut:
            self._batches = [b for b in self._batches if b[0] >= cut]
        if len(self._seen) > 64 and min(self._seen.values()) < cut:
            self._seen = {s: t for s, t in self._seen.items() if t >= cut}

    @contextmanager
    def turn(self, lock):
        """Hold the worker's model `lock`, counted as queued while waiting for it."""
        with self._count_lock:
            self.queued += 1
        try:
            lock.acquire()
        finally:
            with self._count_lock:
                self.queued -= 1
        try:
            yield
        finally:
            lock.release()

    def record(self, start: float, end: float, session_ids) -> None:
        """One fused piece of model work from `start` to `end` for these sessions."""
        ids = list(session_ids)
        with self._count_lock:
            for sid in ids:
                self._seen[sid] = end
            self._busy.append((start, end))
            self._batches.append((end, len(ids)))
            self._prune(end)

    def snapshot(self) -> dict:
        now = self.clock()
        cut = now - self.window_s
        with self._count_lock:
            self._prune(now)
            busy = sum(min(e, now) - max(s, cut) for s, e in self._busy if e > cut)
            fill = [n for _, n in self._batches]
            active = sum(1 for t in self._seen.values() if t >= cut)
            queued = self.queued
        return {"active_sessions": active, "queued": queued, "busy": round(min(1.0, busy / self.window_s), 4),
                "batch_fill": round(sum(fill) / len(fill), 3) if fill else 0.0}

    def to_proto(self):
        from . import rpc

        return rpc.pb.ReplicaLoad(**self.snapshot())
