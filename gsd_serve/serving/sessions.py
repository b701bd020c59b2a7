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

from ..core.sampling import TokenChooser
from . import rpc
from .errors import BadRequest, Expired


class SessionTable:
    """Sessions leased with a TTL, least recently used evicted beyond `max_sessions` (memory stays bounded)."""

    def __init__(self, max_sessions: int = 64, ttl_s: float = 300.0, clock=time.monotonic):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock          # seconds; a test steps its own clock instead of sleeping past the TTL
        self._items: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self.evicted = 0

    def get(self, sid: str):
        item = self._items.get(sid)
        if item is None:
            return None
        if self.clock() - item[0] > self.ttl_s:
            del self._items[sid]
            self.evicted += 1
            return None
        self._items[sid] = (self.clock(), item[1])
        self._items.move_to_end(sid)
        return item[1]

    def put(self, sid: str, value) -> None:
        self._items[sid] = (self.clock(), value)
        self._items.move_to_end(sid)
        self.sweep()

    def pop(self, sid: str):
        item = self._items.pop(sid, None)
        return None if item is None else item[1]

    def sweep(self) -> None:
        now = self.clock()
        for sid in [s for s, (t, _) in self._items.items() if now - t > self.ttl_s]:
            del self._items[sid]
            self.evicted += 1
        while len(self._items) > self.max_sessions:
            self._items.popitem(last=False)
            self.evicted += 1

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        return list(self._items)


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
