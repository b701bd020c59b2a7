"""Draft and target workers: per-session model state behind the gsd.v1 Draft / Target gRPC services.

A worker owns one model and a bounded, TTL-leased table of sessions. The router owns the committed
tokens; every call carries the tokens committed since the router's last call to this worker, so a worker
can always check its caches against the truth and repair them (truncate what diverged, feed what is
missing). A session this worker does not hold is rebuilt from the full sequence (the router resends it
when asked with STATUS_RESYNC). Model work is serialised by one lock per worker.

These classes are plain Python (no Ray): `services/draft` and `services/target` wrap them in Ray Serve
deployments, and `serve_grpc` runs one in a gRPC server.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch

from . import rpc
from .config import ConfigError, SpecConfig
from .drafting import DraftSession
from .prefix_cache import PrefixCache, export_kv, import_kv, model_fingerprint
from .runner import ModelRunner
from .sampling import TokenChooser
from .graph import flatten_to_tree
from .verification import TargetSession, verify_batch

log = logging.getLogger(__name__)
pb = rpc.pb


class SessionTable:
    """Sessions leased with a TTL, least recently used evicted beyond `max_sessions` (memory stays bounded)."""

    def __init__(self, max_sessions: int = 64, ttl_s: float = 300.0):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, object]] = OrderedDict()
        self.evicted = 0

    def get(self, sid: str):
        item = self._items.get(sid)
        if item is None:
            return None
        if time.monotonic() - item[0] > self.ttl_s:
            del self._items[sid]
            self.evicted += 1
            return None
        self._items[sid] = (time.monotonic(), item[1])
        self._items.move_to_end(sid)
        return item[1]

    def put(self, sid: str, value) -> None:
        self._items[sid] = (time.monotonic(), value)
        self._items.move_to_end(sid)
        self.sweep()

    def pop(self, sid: str):
        item = self._items.pop(sid, None)
        return None if item is None else item[1]

    def sweep(self) -> None:
        now = time.monotonic()
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


class DeviceModelRunner(ModelRunner):
    """A ModelRunner for a model on an accelerator: the core builds token/position/mask tensors on the CPU,
    so they are moved to the model's device here and the logits come back to the CPU."""

    def __init__(self, model, output_ids=None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        super().__init__(model.to(self.device), output_ids)

    def forward(self, cache, tokens, positions=None, mask=None, last_only=False):
        if positions is None:
            positions = torch.arange(cache.length, cache.length + tokens.numel())
        dev = self.device
        out = super().forward(cache, tokens.to(dev), positions.to(dev), None if mask is None else mask.to(dev),
                              last_only=last_only)
        return out.cpu()


def make_runner(model, output_ids=None, device: str | None = None) -> ModelRunner:
    if device in (None, "", "cpu"):
        return ModelRunner(model, output_ids)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceModelRunner(model, output_ids, device)


class Expired(RuntimeError):
    """The caller gave up (deadline or cancellation) while the call waited for the model."""


def _still_wanted(expired) -> None:
    # checked once the model lock is held: a call that waited out its deadline behind other work is
    # answered without spending a forward on it
    if expired is not None and expired():
        raise Expired("the caller's deadline passed while the call waited for the model")


class BadRequest(ValueError):
    """A request field is invalid: INVALID_ARGUMENT."""


def _committed(old: list[int] | None, delta_start: int, delta) -> list[int] | None:
    """The router's committed tokens: ours up to delta_start, then the delta. None: we must resync."""
    if not delta:
        raise BadRequest("delta must hold at least the root token")
    if delta_start == 0:
        return list(delta)
    if old is None or delta_start > len(old):
        return None
    return old[:delta_start] + list(delta)


def _lcp(a: list[int], b: list[int], start: int = 0) -> int:
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _check_tokens(tokens, vocab_size: int, what: str) -> None:
    for t in tokens:
        if not 0 <= t < vocab_size:
            raise BadRequest(f"{what}: token id {t} outside the vocabulary [0, {vocab_size})")


def _sampling(msg, vocab_size: int):
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


# ---------------------------------------------------------------- draft

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
        keep = _lcp(entry.cache_tokens, new[:-1])
        if keep < ds.cache.length:
            ds.rollback_to(keep)
            entry.cache_tokens = entry.cache_tokens[:keep]
        ds.pending = new[ds.cache.length:-1]
        entry.committed = new

    def propose(self, req: "pb.ProposeRequest", expired=None) -> "pb.ProposeResponse":
        t0 = time.perf_counter()
        if not req.session_id:
            raise BadRequest("session_id is empty")
        _check_tokens(req.delta, self.vocab_size, "delta")
        try:
            spec = rpc.spec_from_proto(req.spec)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        chooser = _sampling(req.sampling, self.vocab_size)
        with self.lock, torch.inference_mode():
            _still_wanted(expired)
            entry = self.sessions.get(req.session_id)
            if req.delta_start == 0 and entry is not None:
                self.sessions.pop(req.session_id)
                entry = None
            new = _committed(entry.committed if entry else None, req.delta_start, req.delta)
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
                                   session_ids=self.sessions.ids(), max_sessions=self.sessions.max_sessions)


# ---------------------------------------------------------------- target

@dataclass
class _TargetEntry:
    session: TargetSession
    committed: list[int]
    cache_tokens: list[int] = field(default_factory=list)


class TargetWorker:
    """`target_model` (a transformers model, run by ModelRunner) or `runner`: any runner with the
    ModelRunner interface, e.g. gsd_serve.tp_ray.RayTensorParallelRunner for a tensor-parallel target
    (its caches live on the ranks, so the prefix cache is off for it)."""

    def __init__(self, target_model=None, *, runner=None, name: str = "target", max_sessions: int = 64,
                 ttl_s: float = 300.0, prefix_cache: PrefixCache | None = None, redis_url: str | None = None,
                 block_size: int = 32, replica_id: str | None = None, max_seq_len: int | None = None,
                 device: str | None = None):
        if runner is None:
            runner = make_runner(target_model, None, device)
        self.runner = runner
        self.vocab_size = int(runner.vocab_size)
        config = getattr(target_model, "config", None)
        self.n_layers = int(getattr(config, "num_hidden_layers", 0))
        self.max_seq_len = max_seq_len or int(getattr(config, "max_position_embeddings", 8192))
        self.name = name
        self.sessions = SessionTable(max_sessions, ttl_s)
        self.lock = threading.Lock()
        self.replica_id = replica_id or replica_identity()
        if target_model is None or not isinstance(runner, ModelRunner):
            prefix_cache = PrefixCache(None, "none")        # K/V lives on the ranks: not exportable here
        self.prefix_cache = prefix_cache or PrefixCache(redis_url, model_fingerprint(target_model, name),
                                                        block_size=block_size)

    def _new_session(self) -> TargetSession:
        return TargetSession(self.runner, cache=self.runner.new_cache())

    # state rebuilding --------------------------------------------------------
    def _build(self, entry: _TargetEntry, tokens: list[int], need_logits: bool):
        """Make the (empty) cache hold `tokens`; restore what the prefix cache has. Returns (logits, cached)."""
        ts = entry.session
        cached = 0
        limit = len(tokens) - 1 if need_logits else len(tokens)
        blocks = self.prefix_cache.lookup(tokens, limit)
        if blocks:
            try:
                cached = import_kv(ts.cache, blocks, self.n_layers, getattr(self.runner, "device", None))
            except Exception as exc:  # noqa: BLE001 (a bad entry is a miss)
                log.warning("prefix cache: unusable blocks (%s)", exc)
                ts.cache = self.runner.new_cache()
                cached = 0
        rest = torch.tensor(tokens[cached:], dtype=torch.long)
        logits = None
        if len(rest):
            logits = self.runner.forward(ts.cache, rest, last_only=True)
            ts.forwards += 1
        entry.cache_tokens = list(tokens)
        self.prefix_cache.store(tokens, lambda s, e: export_kv(ts.cache, s, e),
                                first_block=cached // self.prefix_cache.block_size)
        return logits, cached

    def _sync(self, entry: _TargetEntry, new: list[int]) -> int:
        """Bring the cache to new[:-1]; returns tokens restored from the prefix cache."""
        ts = entry.session
        keep = _lcp(entry.cache_tokens, new[:-1])
        if keep < ts.cache.length:
            ts.cache.truncate(keep)
            entry.cache_tokens = entry.cache_tokens[:keep]
        cached = 0
        if ts.cache.length == 0 and len(new) > 1:
            _, cached = self._build(entry, new[:-1], need_logits=False)
        elif ts.cache.length < len(new) - 1:
            ts.extend(new[ts.cache.length:-1])
            entry.cache_tokens = list(new[:-1])
        entry.committed = new
        return cached

    # RPCs --------------------------------------------------------------------
    def prefill(self, req: "pb.PrefillRequest", expired=None) -> "pb.PrefillResponse":
        t0 = time.perf_counter()
        if not req.session_id:
            raise BadRequest("session_id is empty")
        if not req.tokens:
            raise BadRequest("the prompt is empty")
        if len(req.tokens) >= self.max_seq_len:
            raise BadRequest(f"the prompt has {len(req.tokens)} tokens; the model takes fewer than {self.max_seq_len}")
        _check_tokens(req.tokens, self.vocab_size, "tokens")
        chooser = _sampling(req.sampling, self.vocab_size)
        tokens = list(req.tokens)
        with self.lock, torch.inference_mode():
            _still_wanted(expired)
            self.sessions.pop(req.session_id)
            entry = _TargetEntry(self._new_session(), tokens)
            logits, cached = self._build(entry, tokens, need_logits=True)
            first = int(chooser.choose(logits, torch.tensor([len(tokens)]))[0])
            entry.committed = tokens + [first]
            self.sessions.put(req.session_id, entry)
        return pb.PrefillResponse(first_token=first, cached_tokens=cached, seconds=time.perf_counter() - t0,
                                  replica_id=self.replica_id)

    def _prepare_item(self, item: "pb.VerifyItem"):
        """Validate one item and bring its session up to date: a RESYNC result, or the job to verify."""
        sid = item.session_id
        if not sid:
            raise BadRequest("session_id is empty")
        _check_tokens(item.delta, self.vocab_size, "delta")
        try:
            graph = rpc.graph_from_proto(item.graph)
        except rpc.GraphError as exc:
            raise BadRequest(f"session {sid}: {exc}") from None
        _check_tokens(graph.tokens, self.vocab_size, "graph")
        budget = item.budget if item.budget > 0 else 16
        if not 1 <= budget <= 1024:
            raise BadRequest(f"budget must be in [1, 1024], got {budget}")
        chooser = _sampling(item.sampling, self.vocab_size)
        entry = self.sessions.get(sid)
        if item.delta_start == 0 and entry is not None:
            entry = None
        new = _committed(entry.committed if entry else None, item.delta_start, item.delta)
        if new is None:
            return pb.VerifyResult(session_id=sid, status=rpc.RESYNC)
        root_index = len(new) - 1
        if item.root_index != root_index or graph.tokens[0] != new[-1]:
            raise BadRequest(f"session {sid}: root does not match the committed tokens")
        if len(new) + max(graph.depth) >= self.max_seq_len:
            raise BadRequest(f"session {sid}: the sequence would exceed {self.max_seq_len} tokens")
        if entry is None:
            entry = _TargetEntry(self._new_session(), new)
        cached = self._sync(entry, new)
        return sid, entry, graph, flatten_to_tree(graph, budget), root_index, chooser, cached

    def verify(self, req: "pb.VerifyRequest", expired=None) -> "pb.VerifyResponse":
        """One call verifies the graphs of several sessions: one fused target forward over all their trees
        (each tree attends only to its own session's cache), then each session's own acceptance."""
        t0 = time.perf_counter()
        if not req.items:
            raise BadRequest("no items")
        if len({i.session_id for i in req.items}) != len(req.items):
            raise BadRequest("a session appears twice in one Verify")
        with self.lock, torch.inference_mode():
            _still_wanted(expired)
            prepared = [self._prepare_item(item) for item in req.items]
            jobs = [p for p in prepared if not isinstance(p, pb.VerifyResult)]
            verdicts = verify_batch([(entry.session, tree, root, chooser)
                                     for _, entry, _, tree, root, chooser, _ in jobs])
            done = {}
            for (sid, entry, graph, _, root, _, cached), verdict in zip(jobs, verdicts):
                entry.cache_tokens = entry.cache_tokens[:root] + [graph.tokens[v] for v in verdict.graph_path]
                self.sessions.put(sid, entry)
                done[sid] = pb.VerifyResult(session_id=sid, status=rpc.OK, graph_path=verdict.graph_path,
                                            emitted=verdict.emitted, verified_tokens=verdict.verified_tokens,
                                            cached_tokens=cached)
            results = [p if isinstance(p, pb.VerifyResult) else done[p[0]] for p in prepared]
        return pb.VerifyResponse(results=results, seconds=time.perf_counter() - t0, replica_id=self.replica_id)

    def release(self, ids) -> int:
        with self.lock:
            return sum(self.sessions.pop(s) is not None for s in ids)

    def info(self) -> "pb.InfoResponse":
        with self.lock:
            self.sessions.sweep()
            st = self.prefix_cache.stats
            return pb.InfoResponse(replica_id=self.replica_id, kind="target", model=self.name,
                                   session_ids=self.sessions.ids(), max_sessions=self.sessions.max_sessions,
                                   prefix_cache_hits=st.hits, prefix_cache_queries=st.queries,
                                   prefix_tokens_saved=st.tokens_saved)


# ---------------------------------------------------------------- gRPC servicers

def _call(context, fn, request):
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the call started")
    try:
        return fn(request, expired=lambda: not context.is_active())
    except Expired as exc:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    except BadRequest as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except ValueError as exc:  # e.g. SamplingParams / SpecConfig validation
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Exception as exc:  # noqa: BLE001 (a bug: log it, answer INTERNAL; the router fails over)
        log.exception("%s failed", getattr(fn, "__name__", "call"))
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class _WorkerServicer:
    """Release and Info, the same for both kinds of worker."""

    def __init__(self, worker):
        self.worker = worker

    def Release(self, request, context):  # noqa: N802
        return pb.ReleaseResponse(released=self.worker.release(request.session_ids))

    def Info(self, request, context):  # noqa: N802
        return self.worker.info()


class DraftServicer(_WorkerServicer, rpc.pb_grpc.DraftServicer):
    def Propose(self, request, context):  # noqa: N802
        return _call(context, self.worker.propose, request)


class TargetServicer(_WorkerServicer, rpc.pb_grpc.TargetServicer):
    def Prefill(self, request, context):  # noqa: N802
        return _call(context, self.worker.prefill, request)

    def Verify(self, request, context):  # noqa: N802
        return _call(context, self.worker.verify, request)


def serve_grpc(worker, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8):
    """Start a gRPC server (with health checking) for a DraftWorker or TargetWorker; returns (server, port)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=rpc.CHANNEL_OPTIONS)
    if isinstance(worker, DraftWorker):
        rpc.pb_grpc.add_DraftServicer_to_server(DraftServicer(worker), server)
        service = "gsd.v1.Draft"
    else:
        rpc.pb_grpc.add_TargetServicer_to_server(TargetServicer(worker), server)
        service = "gsd.v1.Target"
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind gRPC server on {host}:{port}")
    server.start()
    hs.set(service, health_pb2.HealthCheckResponse.SERVING)
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound
