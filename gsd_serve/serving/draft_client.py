"""A target replica's calls to draft replicas: one Propose per drafted round of a session it decodes.

`DraftPool` knows the live draft replicas (from a `discover()` callable: the registry in Ray, a fixed list in
tests), picks one per session by rendezvous hashing of the session's prompt with bounded loads (requests that
share a prefix share a draft replica while it carries no more than (1 + slack) x its share of this replica's
sessions, then spill to their next choice), and stops using a replica that failed a call for a while.
`DraftLink` is one session's state toward its draft replica: how far the replica has read the committed
tokens, the accepted path of the last graph it drafted, and (feature drafts) the target's features it has
not been sent. Calls are gRPC futures: the session waits for its graph while the replica's other sessions go
on with their rounds; a failed call costs the round its draft (it verifies the lookup chain or decodes
plainly) and the next round drafts on another replica, which rebuilds the session from the committed tokens.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time

import grpc
import torch

from . import rpc

log = logging.getLogger(__name__)
pb = rpc.pb


class DraftPool:
    def __init__(self, discover, secret=None, refresh_s: float = 2.0, dead_s: float = 10.0,
                 rpc_timeout_s: float = 30.0, slack: float = 0.25):
        """discover() -> [(replica_id, address)] of live draft replicas; `secret` a SharedSecret (or None)."""
        self.discover = discover
        self.secret = secret
        self.refresh_s = refresh_s
        self.dead_s = dead_s
        self.rpc_timeout_s = rpc_timeout_s
        self._stubs: dict[str, tuple[str, object, object]] = {}   # replica_id -> (address, channel, stub)
        self._dead: dict[str, float] = {}
        self.loads: dict[str, int] = {}        # this replica's sessions on each draft replica
        self.slack = slack
        self._refreshed = 0.0
        self._lock = threading.Lock()
        self.failovers = 0
        # Release calls in flight: a gRPC future dropped before it completes cancels its call
        self.releasing: set = set()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._refreshed < self.refresh_s and self._stubs:
            return
        self._refreshed = now
        try:
            found = list(self.discover())
        except Exception as exc:  # noqa: BLE001 (keep the replicas we know)
            log.warning("draft discovery failed: %s", exc)
            return
        seen = set()
        for rid, address in found:
            seen.add(rid)
            known = self._stubs.get(rid)
            if known is None or known[0] != address:
                channel = grpc.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)
                self._stubs[rid] = (address, channel, rpc.pb_grpc.DraftStub(channel))
        for rid in [r for r in self._stubs if r not in seen]:
            self._stubs.pop(rid)[1].close()

    def pick(self, key: bytes, current: str | None = None) -> tuple[str, object] | None:
        """(replica_id, stub) for a session keyed `key` now on `current` (None: none yet): `current` while it
        lives, else the first live replica in key's rendezvous order under the load bound; None when there is
        none. The session is counted on the replica returned."""
        with self._lock:
            self._refresh()
            now = time.monotonic()
            live = [r for r in self._stubs if self._dead.get(r, 0.0) <= now]
            if current in live:
                return current, self._stubs[current][2]
            if current is not None:
                self.loads[current] = max(self.loads.get(current, 1) - 1, 0)
            if not live:
                return None
            order = sorted(live, key=lambda r: hashlib.blake2b(key + r.encode(), digest_size=8).digest(),
                           reverse=True)
            bound = math.ceil((1 + self.slack) * (sum(self.loads.get(r, 0) for r in live) + 1) / len(live))
            rid = next((r for r in order if self.loads.get(r, 0) + 1 <= bound), order[0])
            self.loads[rid] = self.loads.get(rid, 0) + 1
            return rid, self._stubs[rid][2]

    def leave(self, replica_id: str | None) -> None:
        """A session on `replica_id` ended."""
        if replica_id is None:
            return
        with self._lock:
            self.loads[replica_id] = max(self.loads.get(replica_id, 1) - 1, 0)

    def failed(self, replica_id: str, exc) -> None:
        code = exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else exc
        log.warning("draft replica %s failed a Propose (%s); the session drafts elsewhere", replica_id, code)
        with self._lock:
            self._dead[replica_id] = time.monotonic() + self.dead_s
            self.failovers += 1

    def metadata(self):
        return self.secret.metadata() if self.secret is not None else None

    def close(self) -> None:
        with self._lock:
            for _, channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()


class DraftLink:
    """One session's Propose calls to its draft replica."""

    def __init__(self, pool: DraftPool, session_id: str, key: bytes, sampling_pb, spec_pb):
        self.pool = pool
        self.session_id = session_id
        self.key = key
        self.sampling_pb = sampling_pb
        self.spec_pb = spec_pb
        self.replica: str | None = None
        self.synced = 0              # committed tokens the replica holds
        self.last_path: list[int] = []   # the accepted path (graph nodes) of the last graph it drafted
        self._feats: torch.Tensor | None = None
        self._feat_start = 0
        self.draft_forwards = 0
        self.failovers = 0
        self.draft_tokens = 0
        self.features_missing = 0
        self.feature_bytes = 0
        # a Release sent while a Propose is in flight would arrive first and the Propose would hold the session
        # again on the replica: the release waits for the Propose to end
        self._lock = threading.Lock()
        self._inflight = False
        self._ended = False

    def add_features(self, start: int, feats: torch.Tensor | None) -> None:
        """The target's features of positions start, start + 1, ... (replacing any from `start` on)."""
        if feats is None or not len(feats):
            return
        if self._feats is not None and self._feat_start <= start <= self._feat_start + len(self._feats):
            self._feats = torch.cat([self._feats[: start - self._feat_start], feats])
        else:
            self._feats, self._feat_start = feats, start

    def propose(self, committed: list[int], max_depth: int, chain, chain_probs, on_done) -> bool:
        """Send the round's Propose; `on_done(graph or None)` is called (on a gRPC thread) when it ends. False when
        no draft replica is available (the round goes on without one)."""
        picked = self.pool.pick(self.key, self.replica)
        if picked is None:
            self.replica = None
            return False
        rid, stub = picked
        if rid != self.replica:
            if self.replica is not None:
                # the session moves (its replica failed a call, or left): if the old one still lives, it frees
                # the session now rather than at its TTL
                self._release_on(self.replica)
            self.replica, self.synced, self.last_path = rid, 0, []
        req = pb.ProposeRequest(session_id=self.session_id, delta_start=self.synced, delta=committed[self.synced:],
                                last_path=self.last_path if self.synced else [], root_index=len(committed) - 1,
                                spec=self.spec_pb, sampling=self.sampling_pb, max_depth=max_depth,
                                chain=list(chain), chain_probs=list(chain_probs), has_chain=True)
        if self._feats is not None:
            req.features.CopyFrom(rpc.features_to_proto(self._feats, self._feat_start))
            self.feature_bytes += len(req.features.bf16)
        n = len(committed)
        with self._lock:
            self._inflight = True
        future = stub.Propose.future(req, timeout=self.pool.rpc_timeout_s, metadata=self.pool.metadata())

        def done(fut) -> None:
            with self._lock:
                self._inflight = False
                ended = self._ended
            if ended:               # the session ended while this Propose was in flight
                self._send_release()
                on_done(None)
                return
            try:
                resp = fut.result()
            except Exception as exc:  # noqa: BLE001 (the replica failed: the round goes on without a draft)
                self.pool.failed(rid, exc)
                self.failovers += 1
                self.synced = 0          # the next round picks another replica (this one is marked dead)
                on_done(None)
                return
            if resp.status == rpc.RESYNC:      # the replica lost the session: the next round resends it all
                self.synced = 0
                on_done(None)
                return
            self.synced = n
            self._feats = None
            self.draft_forwards += resp.draft_forwards
            self.draft_tokens += resp.draft_tokens
            self.features_missing += resp.features_missing
            try:
                on_done(rpc.graph_from_proto(resp.graph))
            except rpc.GraphError as exc:
                log.warning("draft replica %s sent an unusable graph (%s)", rid, exc)
                on_done(None)

        future.add_done_callback(done)
        return True

    def release(self) -> None:
        """Tell the replica the session is over (best effort: its TTL frees it anyway); with a Propose in flight,
        once it has ended."""
        with self._lock:
            self._ended = True
            if self._inflight:
                return
        self._send_release()

    def _send_release(self) -> None:
        if self.replica is None:
            return
        self.pool.leave(self.replica)
        self._release_on(self.replica)

    def _release_on(self, replica: str) -> None:
        picked = self.pool._stubs.get(replica)
        if picked is not None:
            try:
                fut = picked[2].Release.future(pb.ReleaseRequest(session_ids=[self.session_id]), timeout=5,
                                               metadata=self.pool.metadata())
            except Exception:  # noqa: BLE001
                return
            pending = self.pool.releasing
            pending.add(fut)
            fut.add_done_callback(pending.discard)
