"""The draft worker: per-session draft state behind the gsd.v1.Draft service (Propose).

Plain Python (no Ray): `services/draft` wraps it in a Ray Serve deployment and `grpc_server` serves it.
Model work is serialised by one lock per worker.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..core.config import ConfigError
from ..core.drafting import DraftSession
from ..models.runner import make_runner
from . import rpc
from .errors import BadRequest
from .procinfo import rss_bytes
from .sessions import (SessionTable, check_tokens, chooser_from_proto, committed_tokens, common_prefix,
                       replica_identity, still_wanted)

pb = rpc.pb


@dataclass
class _DraftEntry:
    session: DraftSession
    committed: list[int]
    cache_tokens: list[int] = field(default_factory=list)   # tokens whose K/V is in the draft cache
    graph: object = None                                     # (graph, slots, root_index) of the last round


class DraftWorker:
    def __init__(self, draft_model, output_ids=None, *, name: str = "draft", max_sessions: int = 64,
                 ttl_s: float = 300.0, replica_id: str | None = None, device: str | None = None):
        self.runner = make_runner(draft_model, output_ids, device)
        self.vocab_size = self.runner.vocab_size
        config = getattr(draft_model, "config", None)
        self.max_seq_len = int(getattr(config, "max_position_embeddings", 8192))
        self.expired_calls = 0      # calls skipped because their caller had given up
        self.name = name
        self.sessions = SessionTable(max_sessions, ttl_s)
        self.lock = threading.Lock()
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
        chooser = chooser_from_proto(req.sampling, self.vocab_size)
        with self.lock, torch.inference_mode():
            still_wanted(expired)
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
            ds = entry.session
            f0, n0 = ds.forwards, ds.tokens_fed
            root_index = len(new) - 1
            n = max(spec.merge_context, 0)
            context = tuple(new[-1 - n:-1]) if n > 0 else ()
            graph, slots = ds.propose(new[-1], root_index, context, spec, chooser,
                                      max_depth=req.max_depth if req.max_depth > 0 else 0,
                                      history=new if spec.lookup else None)
            if slots[0] >= 0:   # the round's first forward fed pending + root: all committed now
                entry.cache_tokens = list(new)
                entry.graph = (graph, slots, root_index)
            else:               # nothing was fed (no drafting this round)
                ds.pending = new[ds.cache.length:-1]
            self.sessions.put(req.session_id, entry)
            return pb.ProposeResponse(status=rpc.OK, graph=rpc.graph_to_proto(graph),
                                      draft_forwards=ds.forwards - f0, draft_tokens=ds.tokens_fed - n0,
                                      seconds=time.perf_counter() - t0, replica_id=self.replica_id)

    def release(self, ids) -> int:
        with self.lock:
            return sum(self.sessions.pop(s) is not None for s in ids)

    def info(self) -> "pb.InfoResponse":
        with self.lock:
            self.sessions.sweep()
            return pb.InfoResponse(replica_id=self.replica_id, kind="draft", model=self.name,
                                   session_ids=self.sessions.ids(), max_sessions=self.sessions.max_sessions,
                                   pid=os.getpid(), rss_bytes=rss_bytes())
