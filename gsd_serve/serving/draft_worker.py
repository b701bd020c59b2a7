"""The draft worker: per-session draft state behind the gsd.v1.Draft service (Propose).

Plain Python (no Ray): `services/draft.py` wraps it in a Ray Serve deployment and `grpc_server` serves it.
Propose calls that arrive while the model is busy are drafted together (batching.BatchGate): every level
of all their graphs is one draft forward (core.drafting.propose_many), the way a target replica fuses the
verification of several sessions. A feature-conditioned draft takes the target's features of committed
positions with each call (ProposeRequest.features); positions it never got are fed as zeros.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..core.config import ConfigError
from ..core.drafting import DraftSession, ProposeJob, propose_many
from ..models.factory import make_runner
from . import rpc
from .batching import BatchGate
from .threads import MODEL_THREAD
from .errors import BadRequest
from .procinfo import rss_bytes
from .sessions import (LoadMeter, SessionTable, cache_bytes, check_tokens, chooser_from_proto, committed_tokens,
                       common_prefix, default_session_bytes, replica_identity, still_wanted)

log = logging.getLogger(__name__)
pb = rpc.pb


@dataclass
class _DraftEntry:
    session: DraftSession
    committed: list[int]
    cache_tokens: list[int] = field(default_factory=list)   # tokens whose K/V is in the draft cache
    graph: object = None                                     # (graph, slots, root_index) of the last round


@dataclass
class _Call:
    """A validated Propose, waiting for its batch."""

    req: "pb.ProposeRequest"
    spec: object
    chooser: object
    features: tuple | None          # (start, tensor) of the target's features, or None
    expired: object
    t0: float


class DraftWorker:
    def __init__(self, draft_model, output_ids=None, *, name: str = "draft", max_sessions: int = 64,
                 ttl_s: float = 300.0, replica_id: str | None = None, device: str | None = None,
                 max_session_bytes: int | None = None, max_batch: int = 64):
        self.runner = make_runner(draft_model, output_ids, device)
        self.vocab_size = self.runner.vocab_size
        config = getattr(draft_model, "config", None)
        self.max_seq_len = int(getattr(config, "max_position_embeddings", 8192))
        self.feature_layers = tuple(getattr(self.runner, "feature_layers", ()) or ())
        self.feature_width = int(getattr(self.runner, "feature_width", 0) or 0)
        self.expired_calls = 0      # calls skipped because their caller had given up
        self.name = name
        self.sessions = SessionTable(max_sessions, ttl_s, max_bytes=max_session_bytes or default_session_bytes(),
                                     size_of=lambda e: cache_bytes(e.session.cache))
        self.lock = threading.Lock()
        self.load = LoadMeter()
        self.gate = BatchGate(self._run_batch, max_batch, execute=MODEL_THREAD.run)   # one OpenMP team
        self.replica_id = replica_id or replica_identity()

    def _sync(self, entry: _DraftEntry, new: list[int], last_path) -> None:
        ds = entry.session
        if entry.graph is not None:
            graph, slots, ridx = entry.graph
            entry.graph = None
            path = list(last_path)
            ok = (path and path[0] == 0 and all(0 <= v < len(graph) for v in path)
                  and ridx + len(path) <= len(new) - 1
                  and all(graph.tokens[v] == new[ridx + i] for i, v in enumerate(path))
                  and all(i == 0 or any(c == v for c, _ in graph.edges[path[i - 1]]) for i, v in enumerate(path)))
            if ok:
                ds.commit(graph, slots, path)
                entry.cache_tokens = entry.cache_tokens[:ridx] + [graph.tokens[v] for v in path]
                entry.cache_tokens = entry.cache_tokens[: ds.cache.length]
            else:
                ds.rollback_to(min(ds.cache.length, ridx + 1))
                entry.cache_tokens = entry.cache_tokens[: ds.cache.length]
        keep = common_prefix(entry.cache_tokens, new[:-1])
        if keep < ds.cache.length:
            ds.rollback_to(keep)
            entry.cache_tokens = entry.cache_tokens[:keep]
        ds.pending = new[ds.cache.length:-1]
        entry.committed = new

    # the call, checked before it queues ------------------------------------------------
    def propose(self, req: "pb.ProposeRequest", expired=None) -> "pb.ProposeResponse":
        t0 = time.perf_counter()
        if not req.session_id:
            raise BadRequest("session_id is empty")
        try:
            spec = rpc.spec_from_proto(req.spec)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        rpc.check_spec_size(spec)     # the graph a round may draft is bounded before any work
        depth = min(req.max_depth, spec.max_depth) if req.max_depth > 0 else spec.max_depth
        if req.delta_start + len(req.delta) + depth > self.max_seq_len:
            raise BadRequest(f"the sequence would exceed the draft's {self.max_seq_len} positions")
        check_tokens(req.delta, self.vocab_size, "delta")
        check_tokens(req.chain, self.vocab_size, "chain")
        if len(req.chain) != len(req.chain_probs) or len(req.chain) > 64:
            raise BadRequest("chain and chain_probs must be as long as each other, at most 64 tokens")
        if any(not 0.0 <= p <= 1.0 for p in req.chain_probs):
            raise BadRequest("chain_probs must be probabilities in [0, 1]")
        chooser = chooser_from_proto(req.sampling, self.vocab_size)
        feats = None
        if req.HasField("features") and self.feature_layers:
            try:
                feats = rpc.features_from_proto(req.features)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            if feats is not None and (feats[1].shape[1] != self.feature_width
                                      or feats[0] + feats[1].shape[0] > req.delta_start + len(req.delta)):
                raise BadRequest(f"features: {tuple(feats[1].shape)} rows from position {feats[0]} do not fit this "
                                 f"draft (width {self.feature_width}) or the committed tokens")
        return self.gate.submit(_Call(req, spec, chooser, feats, expired, t0))

    # a batch of calls, with the model ---------------------------------------------------
    def _prepare(self, call: _Call):
        """Bring the call's session up to date: a RESYNC response, or (entry, committed tokens, features missing
        before the call)."""
        req = call.req
        entry = self.sessions.get(req.session_id)
        if req.delta_start == 0 and entry is not None:
            self.sessions.pop(req.session_id)
            entry = None
        new = committed_tokens(entry.committed if entry else None, req.delta_start, req.delta)
        if new is None:
            return pb.ProposeResponse(status=rpc.RESYNC, replica_id=self.replica_id)
        if req.root_index != len(new) - 1:
            raise BadRequest(f"root_index {req.root_index} does not match the committed tokens ({len(new)})")
        if entry is None:
            entry = _DraftEntry(DraftSession(self.runner), new)
        elif req.delta_start < len(entry.committed):
            entry.session.lookup.reset()   # the router rewrote committed tokens: n-gram positions are stale
        self._sync(entry, new, req.last_path)
        if call.features is not None:
            entry.session.add_features(*call.features)
        return entry, new, entry.session.features_missing

    def _job(self, call: _Call, entry: _DraftEntry, new: list[int]) -> ProposeJob:
        spec, req = call.spec, call.req
        n = max(spec.merge_context, 0)
        chain = (list(req.chain), list(req.chain_probs)) if req.has_chain else (None, None)
        return ProposeJob(entry.session, new[-1], len(new) - 1, tuple(new[-1 - n:-1]) if n > 0 else (), spec,
                          call.chooser, req.max_depth if req.max_depth > 0 else 0,
                          new if spec.lookup and not req.has_chain else None, *chain)

    def _run_batch(self, jobs) -> None:
        with self.lock, torch.inference_mode():
            t1 = time.monotonic()
            ready, seen = [], set()
            for job in jobs:
                call = job.payload
                try:
                    still_wanted(call.expired)
                    if call.req.session_id in seen:
                        raise BadRequest("two Propose calls for one session at once")
                    seen.add(call.req.session_id)
                    prep = self._prepare(call)
                except Exception as exc:  # noqa: BLE001 (this call alone fails; Expired is counted by the server)
                    job.error = exc
                    continue
                if isinstance(prep, pb.ProposeResponse):
                    job.result = prep
                    continue
                ready.append((job, prep))
            if not ready:
                return
            before = [(e.session.forwards, e.session.tokens_fed) for _, (e, _, _) in ready]
            try:
                outs = propose_many([self._job(j.payload, e, new) for j, (e, new, _) in ready])
            except Exception:
                if len(ready) == 1:
                    raise
                # a failed batch leaves its sessions' caches anywhere: rebuild them all (RESYNC), each alone
                log.exception("batched Propose of %d sessions failed; they resync", len(ready))
                for job, _ in ready:
                    self.sessions.pop(job.payload.req.session_id)
                    job.result = pb.ProposeResponse(status=rpc.RESYNC, replica_id=self.replica_id)
                return
            for (job, (entry, new, missing0)), (graph, slots), (f0, n0) in zip(ready, outs, before):
                call, ds = job.payload, entry.session
                if slots[0] >= 0:   # the round's first forward fed pending + root: all committed now
                    entry.cache_tokens = list(new)
                    entry.graph = (graph, slots, len(new) - 1)
                else:               # nothing was fed (no drafting this round)
                    ds.pending = new[ds.cache.length:-1]
                self.sessions.put(call.req.session_id, entry)
                job.result = pb.ProposeResponse(status=rpc.OK, graph=rpc.graph_to_proto(graph),
                                                draft_forwards=ds.forwards - f0, draft_tokens=ds.tokens_fed - n0,
                                                seconds=time.perf_counter() - call.t0, replica_id=self.replica_id,
                                                features_missing=ds.features_missing - missing0)
            self.load.record(t1, time.monotonic(), [j.payload.req.session_id for j, _ in ready])

    def release(self, ids) -> int:
        with self.lock:
            return sum(self.sessions.pop(s) is not None for s in ids)

    def load_snapshot(self) -> dict:
        snap = self.load.snapshot()
        snap["queued"] = self.gate.queued
        return snap

    def info(self) -> "pb.InfoResponse":
        with self.lock:
            self.sessions.sweep()
            return pb.InfoResponse(replica_id=self.replica_id, kind="draft", model=self.name,
                                   session_ids=self.sessions.ids(), max_sessions=self.sessions.max_sessions,
                                   pid=os.getpid(), rss_bytes=rss_bytes(), torch_threads=torch.get_num_threads(),
                                   session_bytes=self.sessions.bytes, max_session_bytes=self.sessions.max_bytes,
                                   feature_layers=list(self.feature_layers),
                                   load=pb.ReplicaLoad(**self.load_snapshot()))
