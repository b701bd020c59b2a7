"""The target worker: the gsd.v1.Target service (Decode; Prefill and Verify).

Decode hands the worker a whole request: its decode loop runs here (scheduler.py), fused with the worker's
other sessions, and the committed tokens stream back. Prefill and Verify serve a caller that drives the loop
itself, one round at a time, with per-session target state kept here.

A Verify call carries the graphs of several sessions and verifies them in one fused target forward. Each
item succeeds or fails on its own: an item the worker refuses (or whose forward fails) gets
SESSION_STATUS_ERROR with its reason, and the batch's other items are verified as if it had not been there.
With `feature_layers` in the request (a feature-conditioned draft is in use) Prefill and Verify also return
the target's hidden states after those layers (bf16), for the router to hand to the draft.
Plain Python (no Ray): `services/target` wraps it in a Ray Serve deployment and `grpc_server` serves it.
Model work is serialised by one lock per worker and runs on the process's model thread (threads.MODEL_THREAD:
one OpenMP team for every forward, as in process).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from ..core.config import ConfigError
from ..core.costs import ForwardCosts
from ..core.engine import COST_SEED_SIZES
from ..core.grammar import GrammarCompiler, GrammarError
from ..core.graph import flatten_to_tree
from ..core.lookup import SharedSuffixIndex
from ..core.planner import Planner
from ..core.sampling import MAX_TOP_LOGPROBS
from ..core.verification import TargetSession, verify_batch
from ..models.factory import make_runner
from ..models.runner import ModelRunner
from . import rpc
from .errors import BadRequest, ServingError, TooLarge, Unavailable
from .procinfo import rss_bytes
from .prefix_cache import KVLayout, PrefixCache, export_kv, import_kv, model_fingerprint
from .draft_client import DraftLink, DraftPool
from .shared_index import SharedLog
from .scheduler import END, Scheduler, new_session
from .threads import MODEL_THREAD
from .sessions import (LoadMeter, SessionTable, cache_bytes, check_tokens, chooser_from_proto, committed_tokens,
                       common_prefix, default_session_bytes, replica_identity, still_wanted)

log = logging.getLogger(__name__)
pb = rpc.pb


@dataclass
class _TargetEntry:
    session: TargetSession
    committed: list[int]
    cache_tokens: list[int] = field(default_factory=list)


class TargetWorker:
    """`target_model` (a transformers model, run by ModelRunner) or `runner`: any runner with the
    ModelRunner interface, e.g. a TensorParallelRunner over Ray actors for a tensor-parallel target
    (its caches live on the ranks, so the prefix cache is off for it)."""

    def __init__(self, target_model=None, *, runner=None, name: str = "target", max_sessions: int = 64,
                 ttl_s: float = 300.0, prefix_cache: PrefixCache | None = None, redis_url: str | None = None,
                 block_size: int = 32, replica_id: str | None = None, max_seq_len: int | None = None,
                 device: str | None = None, max_session_bytes: int | None = None, drafts=None, secret=None,
                 shared_lookup_tokens: int = 100_000, shared_redis_url: str | None = None, prefill_chunk: int = 64,
                 prefill_share: float = 1.5,
                 max_decoding: int = 256, tokenizer=None):
        """drafts: discover() -> [(replica_id, address)] of the draft replicas its Decode sessions call (None:
        none); secret: the SharedSecret their calls carry; shared_lookup_tokens: the cross-request index's
        bound (0: none); shared_redis_url: the Redis through which the application's target replicas share
        that index (shared_index.py; None: this replica's own); prefill_chunk, prefill_share: the fewest
        prompt tokens fused per iteration while others decode, and the share of a decoding forward's cost the
        prompt tokens may add (scheduler.py); tokenizer: the target's (JSON mode's grammar reads it; None: loaded by
        `name` at the first JSON request)."""
        if runner is None:
            runner = make_runner(target_model, None, device)
        self.runner = runner
        self.vocab_size = int(runner.vocab_size)
        config = getattr(target_model, "config", None)
        self.n_layers = int(getattr(config, "num_hidden_layers", 0))
        self.max_seq_len = max_seq_len or int(getattr(config, "max_position_embeddings", 8192))
        self.name = name
        self.tokenizer = tokenizer
        self._grammars: GrammarCompiler | None = None    # JSON mode's, built at the first JSON request
        self._grammar_lock = threading.Lock()
        self.expired_calls = 0      # calls skipped because their caller had given up
        self.sessions = SessionTable(max_sessions, ttl_s, max_bytes=max_session_bytes or default_session_bytes(),
                                     size_of=lambda e: cache_bytes(e.session.cache))
        self.load = LoadMeter()
        self.lock = threading.Lock()
        self._warned_features = False
        self.replica_id = replica_id or replica_identity()
        if target_model is None or not isinstance(runner, ModelRunner):
            prefix_cache = PrefixCache(None, "none")        # K/V lives on the ranks: not exportable here
        self.prefix_cache = prefix_cache or PrefixCache(redis_url, model_fingerprint(target_model, name),
                                                        block_size=block_size)
        if self.prefix_cache.url and self.prefix_cache.layout is None:
            self.prefix_cache.layout = self._kv_layout()
        self.max_decoding = max_decoding
        costs = getattr(runner, "forward_seconds", None)
        seed = (list(COST_SEED_SIZES), [costs(n) for n in COST_SEED_SIZES]) if costs is not None else None
        shared = SharedSuffixIndex(shared_lookup_tokens) if shared_lookup_tokens > 0 else None
        self.planner = Planner(ForwardCosts(seed), shared=shared)
        self.shared_log = None
        if shared_redis_url and shared is not None:
            fingerprint = self.prefix_cache.fingerprint if self.prefix_cache.fingerprint != "none" else \
                model_fingerprint(target_model, name) if target_model is not None else name
            self.shared_log = SharedLog(shared_redis_url, fingerprint, self.replica_id)
            self.shared_log.attach(shared)
        self.drafts = DraftPool(drafts, secret) if drafts is not None else None
        self.scheduler = Scheduler(runner, self.planner, self.drafts, prefill_chunk=prefill_chunk,
                                   prefill_share=prefill_share,
                                   restore=self._restore_prompt, store=self._store_prompt, execute=MODEL_THREAD.run,
                                   lock=self.lock, on_forward=self.load.record)

    def _kv_layout(self) -> KVLayout:
        """The layout of this model's K/V as the cache exports it (one token's forward, once)."""
        with torch.inference_mode():
            cache = self.runner.new_cache()
            self.runner.forward(cache, torch.tensor([0], dtype=torch.long), last_only=True)
            return KVLayout.of(export_kv(cache, 0, 1))

    def _new_session(self) -> TargetSession:
        return TargetSession(self.runner, cache=self.runner.new_cache())

    # Decode: a whole request decoded here ---------------------------------------
    def _restore_prompt(self, session, tokens: list[int]) -> int:
        """Restore what the prefix cache holds of a prompt into the session's empty cache; returns the tokens."""
        blocks = self.prefix_cache.lookup(tokens, len(tokens) - 1)
        if not blocks:
            return 0
        try:
            return import_kv(session.target.cache, blocks, self.n_layers, getattr(self.runner, "device", None))
        except Exception as exc:  # noqa: BLE001 (a bad entry is a miss)
            log.warning("prefix cache: unusable blocks (%s)", exc)
            session.target.cache = self.runner.new_cache()
            return 0

    def _store_prompt(self, session, tokens: list[int]) -> None:
        cache = session.target.cache
        self.prefix_cache.store(tokens, lambda a, b: export_kv(cache, a, b),
                                first_block=session.cached_tokens // self.prefix_cache.block_size,
                                limit=len(tokens))

    def start_decode(self, req: "pb.DecodeRequest", deadline_s: float | None = None):
        """Validate a Decode request and start its session; returns the session (its `out` queue yields token
        lists, then END or an exception)."""
        if not req.session_id:
            raise BadRequest("session_id is empty")
        if not req.tokens:
            raise BadRequest("the prompt is empty")
        if req.max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {req.max_tokens}")
        if len(req.tokens) + req.max_tokens > self.max_seq_len:
            raise BadRequest(f"{len(req.tokens)} prompt tokens + max_tokens {req.max_tokens} exceed the model's "
                             f"{self.max_seq_len}")
        check_tokens(req.tokens, self.vocab_size, "tokens")
        check_tokens(req.stop_token_ids, self.vocab_size, "stop_token_ids")
        try:
            spec = rpc.spec_from_proto(req.spec)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        rpc.check_spec_size(spec)
        sampling = rpc.sampling_from_proto(req.sampling)
        if not sampling.greedy and sampling.seed is None:
            raise BadRequest("sampling needs a seed (the router sets one)")
        layers = self._feature_layers(req.feature_layers)
        top_logprobs = req.top_logprobs if req.HasField("top_logprobs") else None
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        grammar = self._grammar(req)
        if self.scheduler.active >= self.max_decoding:
            raise Unavailable(f"this replica decodes {self.max_decoding} requests at most; retry elsewhere")
        draft = None
        if spec.method != "ar" and self.drafts is not None:
            draft = DraftLink(self.drafts, req.session_id, bytes(str(list(req.tokens[:32])), "ascii"),
                              req.sampling, rpc.spec_to_proto(spec))
        deadline = time.monotonic() + deadline_s if deadline_s else float("inf")
        session = new_session(req.session_id, self.runner, self.planner, list(req.tokens), req.max_tokens, spec,
                              sampling, set(req.stop_token_ids), self.vocab_size, draft=draft,
                              feature_layers=layers, deadline=deadline, top_logprobs=top_logprobs, grammar=grammar)
        self.scheduler.submit(session)
        return session

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._grammar_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    from ..models.checkpoints import ModelLoadError, load_tokenizer
                    try:
                        self.tokenizer = load_tokenizer(self.name)
                    except ModelLoadError as exc:
                        raise BadRequest(f"'response_format': this replica has no tokenizer for JSON mode ({exc})",
                                         "response_format") from None
                self._grammars = GrammarCompiler(self.tokenizer, (), self.vocab_size)
            return self._grammars

    def _grammar(self, req: "pb.DecodeRequest"):
        """The request's grammar (JSON mode), past the output already generated (a failover); None without one."""
        try:
            fmt = rpc.format_from_proto(req.response_format)
            if fmt is None:
                return None
            if req.output_tokens >= len(req.tokens):
                raise BadRequest(f"output_tokens ({req.output_tokens}) must be fewer than the tokens sent")
            grammar = self._grammar_compiler().constraint(fmt, req.stop_token_ids)
        except GrammarError as exc:
            raise BadRequest(str(exc), "response_format") from None
        if req.output_tokens and not grammar.consume(req.tokens[len(req.tokens) - req.output_tokens:]):
            raise BadRequest("the output already generated does not fit the response_format's grammar")
        return grammar

    def decode(self, req: "pb.DecodeRequest", expired=None, cancelled=None, deadline_s: float | None = None):
        """Decode one request here; yields DecodeChunk messages (the first names this replica and the prefix-cache
        hit, the last carries the finish reason and the stats)."""
        session = self.start_decode(req, deadline_s)
        if cancelled is not None:
            cancelled(lambda: self.scheduler.cancel(session.id))
        first = True
        sent = len(req.tokens)     # the absolute index of the next token to send
        try:
            while True:
                items = [session.out.get()]
                while not session.out.empty():
                    items.append(session.out.get_nowait())
                tokens, end = [], False
                for item in items:
                    if item is END:
                        end = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        tokens.extend(item)
                chunk = pb.DecodeChunk(tokens=tokens)
                if session.chooser.top_logprobs is not None:    # noted before the tokens were queued
                    lps = session.chooser.logprobs
                    chunk.logprobs.extend(rpc.logprob_to_proto(lps[i]) for i in range(sent, sent + len(tokens)))
                sent += len(tokens)
                if first:
                    chunk.replica_id = self.replica_id
                    chunk.cached_tokens = session.cached_tokens
                    first = False
                if end:
                    chunk.finish_reason = session.seq.finish_reason or "length"
                    chunk.stats.CopyFrom(rpc.stats_to_proto(session.stats))
                    if self.shared_log is not None and session.spec.shared_lookup:
                        self.shared_log.publish(session.seq.tokens)
                yield chunk
                if end:
                    return
        finally:
            self.scheduler.cancel(session.id)    # a reader that left early: the session stops

    # state rebuilding --------------------------------------------------------
    def _build(self, entry: _TargetEntry, tokens: list[int], need_logits: bool):
        """Make the (empty) cache hold `tokens`; restore what the prefix cache has. Returns (logits, cached).
        With the session's feature layers, `entry.session.last_features` holds the features of the tokens
        computed here (positions cached.. len(tokens)-1)."""
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
        ts.last_features = None
        if len(rest):
            if ts.feature_layers:
                logits, ts.last_features = self.runner.forward_features(ts.cache, rest, layers=ts.feature_layers,
                                                                        last_only=True)
            else:
                logits = self.runner.forward(ts.cache, rest, last_only=True)
            ts.forwards += 1
        entry.cache_tokens = list(tokens)
        self.prefix_cache.store(tokens, lambda s, e: export_kv(ts.cache, s, e),
                                first_block=cached // self.prefix_cache.block_size)
        return logits, cached

    def _sync(self, entry: _TargetEntry, new: list[int]) -> int:
        """Bring the cache to new[:-1]; returns tokens restored from the prefix cache."""
        ts = entry.session
        keep = common_prefix(entry.cache_tokens, new[:-1])
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
    def _feature_layers(self, layers) -> tuple[int, ...]:
        layers = tuple(int(i) for i in layers)
        if not layers:
            return ()
        if self.n_layers and any(not 0 <= i < self.n_layers for i in layers):
            raise BadRequest(f"feature layers must be in [0, {self.n_layers}), got {list(layers)}")
        if len(set(layers)) != len(layers) or len(layers) > 16:
            raise BadRequest(f"feature layers must be distinct, at most 16, got {list(layers)}")
        if type(self.runner) is not ModelRunner or getattr(self.runner, "_lean", None) is None:
            # a tensor-parallel, device or non-Llama runner: no features; the draft feeds zeros (still exact)
            if not self._warned_features:
                log.warning("this target runner cannot hand out features; feature drafts get zeros")
                self._warned_features = True
            return ()
        return layers

    def prefill(self, req: "pb.PrefillRequest", expired=None) -> "pb.PrefillResponse":
        t0 = time.perf_counter()
        if not req.session_id:
            raise BadRequest("session_id is empty")
        if not req.tokens:
            raise BadRequest("the prompt is empty")
        if len(req.tokens) >= self.max_seq_len:
            raise BadRequest(f"the prompt has {len(req.tokens)} tokens; the model takes fewer than {self.max_seq_len}")
        check_tokens(req.tokens, self.vocab_size, "tokens")
        chooser = chooser_from_proto(req.sampling, self.vocab_size)
        layers = self._feature_layers(req.feature_layers)
        tokens = list(req.tokens)
        with self.load.turn(self.lock):
            still_wanted(expired)
            t1 = time.monotonic()
            first, cached, feats = MODEL_THREAD.run(self._prefill_locked, req, chooser, layers, tokens)
            self.load.record(t1, time.monotonic(), [req.session_id])
        resp = pb.PrefillResponse(first_token=first, cached_tokens=cached, seconds=time.perf_counter() - t0,
                                  replica_id=self.replica_id)
        if feats is not None:
            resp.features.CopyFrom(rpc.features_to_proto(feats, cached))
        return resp

    @torch.inference_mode()
    def _prefill_locked(self, req, chooser, layers, tokens):
        self.sessions.pop(req.session_id)
        entry = _TargetEntry(self._new_session(), tokens)
        entry.session.feature_layers = layers
        logits, cached = self._build(entry, tokens, need_logits=True)
        first = int(chooser.choose(logits, torch.tensor([len(tokens)]))[0])
        entry.committed = tokens + [first]
        feats, entry.session.last_features = entry.session.last_features, None
        self.sessions.put(req.session_id, entry)
        return first, cached, feats

    def _prepare_item(self, item: "pb.VerifyItem", layers: tuple[int, ...]):
        """Validate one item and bring its session up to date: a RESYNC result, or the job to verify.
        Raises ServingError (or ValueError) for an item that must be refused; nothing was changed then, except
        that a session whose rebuild failed is dropped (its next round resyncs)."""
        sid = item.session_id
        if not sid:
            raise BadRequest("session_id is empty")
        if item.delta_start + len(item.delta) >= self.max_seq_len:
            raise BadRequest(f"session {sid}: the sequence would exceed {self.max_seq_len} tokens")
        check_tokens(item.delta, self.vocab_size, "delta")
        try:
            graph = rpc.graph_from_proto(item.graph)    # GraphTooLarge (RESOURCE_EXHAUSTED) passes through
        except rpc.GraphError as exc:
            raise BadRequest(f"session {sid}: {exc}") from None
        check_tokens(graph.tokens, self.vocab_size, "graph")
        budget = item.budget if item.budget > 0 else 16
        if not 1 <= budget <= 1024:
            raise BadRequest(f"budget must be in [1, 1024], got {budget}")
        chooser = chooser_from_proto(item.sampling, self.vocab_size)
        entry = self.sessions.get(sid)
        if item.delta_start == 0 and entry is not None:
            entry = None
        new = committed_tokens(entry.committed if entry else None, item.delta_start, item.delta)
        if new is None:
            return pb.VerifyResult(session_id=sid, status=rpc.RESYNC)
        root_index = len(new) - 1
        if item.root_index != root_index or graph.tokens[0] != new[-1]:
            raise BadRequest(f"session {sid}: root does not match the committed tokens")
        tree = flatten_to_tree(graph, budget)
        # the tree's own depths (paths through the edges), not the message's claimed ones, give the positions
        if len(new) + int(tree.depths.max()) >= self.max_seq_len:
            raise BadRequest(f"session {sid}: the sequence would exceed {self.max_seq_len} tokens")
        if entry is None:
            entry = _TargetEntry(self._new_session(), new)
        entry.session.feature_layers = layers
        try:
            cached = self._sync(entry, new)
        except Exception:
            self.sessions.pop(sid)
            raise
        return sid, entry, graph, tree, root_index, chooser, cached

    @staticmethod
    def _refused(sid: str, exc: Exception) -> "pb.VerifyResult":
        """The result of an item refused alone (its request fails; the batch's others go on)."""
        if isinstance(exc, ServingError):
            code = exc.grpc_code
        elif isinstance(exc, ValueError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            log.exception("verify item %s failed", sid)
            code = grpc.StatusCode.INTERNAL
        return pb.VerifyResult(session_id=sid, status=rpc.ERROR, error=f"{exc}"[:1000] or type(exc).__name__,
                               error_code=code.value[0])

    def _verify_jobs(self, jobs: list) -> list:
        """Verdicts of the jobs: one fused forward; if that fails, each job alone (so one bad item fails only
        itself). A job's entry is an exception where it failed."""
        try:
            return verify_batch([(e.session, tree, root, chooser) for _, e, _, tree, root, chooser, _ in jobs])
        except Exception:  # noqa: BLE001 (isolate the culprit below)
            if len(jobs) == 1:
                raise
        out = []
        for job in jobs:
            _, entry, _, tree, root, chooser, _ = job
            entry.session.cache.truncate(root)       # the failed forward may have appended to any cache
            try:
                out.append(verify_batch([(entry.session, tree, root, chooser)])[0])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    def verify(self, req: "pb.VerifyRequest", expired=None) -> "pb.VerifyResponse":
        """One call verifies the graphs of several sessions: one fused target forward over all their trees
        (each tree attends only to its own session's cache), then each session's own acceptance."""
        t0 = time.perf_counter()
        if not req.items:
            raise BadRequest("no items")
        if len(req.items) > rpc.MAX_VERIFY_ITEMS:
            raise TooLarge(f"{len(req.items)} items in one Verify; at most {rpc.MAX_VERIFY_ITEMS} are accepted")
        if len({i.session_id for i in req.items}) != len(req.items):
            raise BadRequest("a session appears twice in one Verify")
        layers = self._feature_layers(req.feature_layers)
        with self.load.turn(self.lock):
            still_wanted(expired)
            t1 = time.monotonic()
            results, forward_s, jobs = MODEL_THREAD.run(self._verify_locked, req, layers)
            self.load.record(t1, time.monotonic(), [j[0] for j in jobs])
        return pb.VerifyResponse(results=results, seconds=time.perf_counter() - t0, replica_id=self.replica_id,
                                 forward_seconds=forward_s, rows=sum(len(j[3]) for j in jobs), sessions=len(jobs))

    @torch.inference_mode()
    def _verify_locked(self, req, layers):
        prepared = []
        for item in req.items:
            try:
                prepared.append(self._prepare_item(item, layers))
            except Exception as exc:  # noqa: BLE001 (this item alone is refused)
                prepared.append(self._refused(item.session_id, exc))
        jobs = [p for p in prepared if not isinstance(p, pb.VerifyResult)]
        tf = time.perf_counter()
        verdicts = self._verify_jobs(jobs) if jobs else []
        forward_s = time.perf_counter() - tf
        done = {}
        for (sid, entry, graph, tree, root, _, cached), verdict in zip(jobs, verdicts):
            if isinstance(verdict, Exception):
                self.sessions.pop(sid)
                done[sid] = self._refused(sid, verdict)
                continue
            entry.cache_tokens = entry.cache_tokens[:root] + [graph.tokens[v] for v in verdict.graph_path]
            self.sessions.put(sid, entry)
            res = pb.VerifyResult(session_id=sid, status=rpc.OK, graph_path=verdict.graph_path,
                                  emitted=verdict.emitted, verified_tokens=verdict.verified_tokens,
                                  cached_tokens=cached, tree_path=verdict.tree_path)
            if verdict.features is not None:
                res.features.CopyFrom(rpc.features_to_proto(verdict.features, root))
            done[sid] = res
        results = [p if isinstance(p, pb.VerifyResult) else done[p[0]] for p in prepared]
        return results, forward_s, jobs

    def load_snapshot(self) -> dict:
        return self.load.snapshot()

    def release(self, ids) -> int:
        with self.lock:
            return sum(self.sessions.pop(s) is not None for s in ids)

    def info(self) -> "pb.InfoResponse":
        # never waits for the model lock: the scheduler takes it back after every forward, so under load a
        # waiting Info could starve past its deadline (the sweep of expired Prefill/Verify sessions waits for an
        # idle moment instead)
        if self.lock.acquire(blocking=False):
            try:
                self.sessions.sweep()
            finally:
                self.lock.release()
        st = self.prefix_cache.stats
        return pb.InfoResponse(replica_id=self.replica_id, kind="target", model=self.name,
                               session_ids=self.sessions.ids() + list(self.scheduler.sessions),
                               max_sessions=self.sessions.max_sessions,
                               pid=os.getpid(), rss_bytes=rss_bytes(),
                               prefix_cache_hits=st.hits, prefix_cache_queries=st.queries,
                               prefix_tokens_saved=st.tokens_saved, torch_threads=torch.get_num_threads(),
                               session_bytes=self.sessions.bytes, max_session_bytes=self.sessions.max_bytes,
                               load=self.load.to_proto(), forwards=self.scheduler.forwards,
                               forward_sessions=self.scheduler.forward_sessions,
                               widest_forward=self.scheduler.widest)
