"""A target replica's decode loop: every request it serves runs core.decode here, their model work fused.

The router hands each request to a target replica once (Target.Decode) and relays the committed tokens the
replica streams back. Here each request's `decode()` generator runs to its end:
- Plain steps and verifications of all sessions go into one fused target forward per iteration (each session
  attends only to its own cache under its own mask, so each gets the tokens it would get alone).
- New prompts are prefilled in chunks fused with the other sessions' rounds. While others are decoding, an
  iteration feeds as many prompt tokens as cost `prefill_share` times its decoding rows (at least
  `prefill_chunk`), from the measured cost of a prompt token: a long prompt cannot stall the others (an
  iteration costs at most ~1 + prefill_share of a decoding-only one), and prompts arriving faster than a
  fixed small chunk could feed do not queue without end. A replica with nothing else to do prefills in one
  piece.
- A session whose planner drafts sends one Propose to a draft replica (draft_client.py) and sits out the
  forwards until its graph comes back; the others go on meanwhile. Plain and lookup rounds cost no RPC.
- One Planner (core/planner.py) serves every session: its cost model learns from the fused forwards, and
  each session plans knowing how many rows the others add to the forward and how fast they generate.

Exactness: each session's tokens are the target's own choices, whatever was fused with them.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..core.config import SpecConfig
from ..core.decode import Chunk, DecodeStats, Prefill, Propose, Sequence, Step, Verify, decode
from ..core.graph import VerifyTree
from ..core.planner import Planner
from ..core.sampling import SamplingParams, TokenChooser
from ..core.verification import PrefillChunk, TargetSession, verify_batch
from .errors import DeadlineExceeded

log = logging.getLogger(__name__)

NEW, PREFILL, FORWARD, DRAFTING, READY, DONE = "new", "prefill", "forward", "drafting", "ready", "done"
END = object()          # marks the end of a session's output queue


def _root_tree(root: int) -> VerifyTree:
    """A plain step as a verification tree: the root alone."""
    return VerifyTree(torch.tensor([root]), torch.tensor([-1]), torch.tensor([0]), [0], [1.0])


@dataclass
class DecodeSession:
    """One request on this replica: its sequence, its decode loop and where that loop stands."""

    id: str
    seq: Sequence
    spec: SpecConfig
    chooser: TokenChooser
    target: TargetSession
    planner: object
    draft: object = None                  # a DraftLink, or None (no draft replicas)
    deadline: float = float("inf")
    out: queue.Queue = field(default_factory=queue.Queue)
    stats: DecodeStats = None
    state: str = NEW
    loop: object = None
    request: object = None
    answer: object = None
    prefilled: int = 0                    # prompt tokens in the target cache
    cached_tokens: int = 0                # of those, restored from the prefix cache
    tree: VerifyTree | None = None
    draft_graph: object = None            # the graph the draft replica sent for this round
    draft_started: float = 0.0            # when this round's Propose was sent
    draft_rows: int = 0                   # committed tokens it carried for the replica to read
    rows: int = 0                         # rows this session put into the last forward
    cancelled: bool = False
    error: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)


class Scheduler:
    """Runs the replica's sessions. `runner`: the target runner; `planner`: the replica's Planner; `drafts`: a
    DraftPool (None: no draft replicas); `restore(session, tokens) -> cached` and `store(session, tokens)`: the
    prefix cache's hooks around a prompt's prefill; `execute(fn)`: where model work runs (the model thread);
    `lock`: the worker's model lock (held for each iteration)."""

    def __init__(self, runner, planner: Planner, drafts=None, *, prefill_chunk: int = 64, whole_prefill: int = 2048,
                 prefill_share: float = 1.5, restore=None, store=None, execute=None, lock=None, on_forward=None):
        self.runner = runner
        self.planner = planner
        self.drafts = drafts
        self.prefill_chunk = prefill_chunk
        self.whole_prefill = whole_prefill
        self.prefill_share = prefill_share
        self.prompt_token_s: float | None = None   # measured seconds per prompt token fed (moving average)
        self.restore = restore
        self.store = store
        self.execute = execute or (lambda fn: fn())
        self.lock = lock or threading.Lock()
        self.on_forward = on_forward       # on_forward(start, end, session_ids): the worker's load meter
        self.sessions: dict[str, DecodeSession] = {}
        self._cond = threading.Condition()
        self._wake = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self.iterations = 0
        self.forwards = 0
        self.forward_sessions = 0   # sessions the forwards carried, summed
        self.widest = 0          # the most sessions one forward has carried
        self.dropped = 0         # sessions stopped before their end: the client left or the deadline passed
        self.prefill_chunks = 0  # pieces of prompts fed
        self.rows_ema = 0.0
        self._rows, self._rates, self._rate = 0, {}, 0.0

    # ------------------------------------------------------------ sessions in and out
    def submit(self, session: DecodeSession) -> None:
        with self._cond:
            if session.id in self.sessions:
                raise ValueError(f"session {session.id} is already decoding on this replica")
            self.sessions[session.id] = session
            self._wake = True
            self._cond.notify_all()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="gsd-scheduler")
                self._thread.start()

    def cancel(self, session_id: str) -> None:
        """The client left: the session stops at the next iteration."""
        with self._cond:
            s = self.sessions.get(session_id)
            if s is not None:
                s.cancelled = True
                self._wake = True
                self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    @property
    def active(self) -> int:
        return len(self.sessions)

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wake and not self._stop:
                    if not self.sessions:
                        self._cond.wait(timeout=5.0)
                        if not self.sessions and not self._wake:
                            self._thread = None
                            return
                    else:
                        self._cond.wait(timeout=0.5)
                        break
                if self._stop:
                    return
                self._wake = False
            try:
                with self.lock:
                    busy = self.execute(self._iteration)
            except Exception:  # noqa: BLE001 (a bug: fail every session rather than hang them)
                log.exception("scheduler iteration failed")
                self._fail_all(RuntimeError("the target replica failed while decoding"))
                continue
            if busy:
                with self._cond:
                    self._wake = True

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            sessions = list(self.sessions.values())
            self.sessions.clear()
        for s in sessions:
            self._end(s, exc)

    @torch.inference_mode()
    def _iteration(self) -> bool:
        """Advance every session that can move, then run one fused forward. True when there is more to do at once."""
        self.iterations += 1
        now = time.monotonic()
        sessions = list(self.sessions.values())
        # what every session adds to a forward and how fast it goes: each plans knowing the others' (once per
        # iteration: a session's planner asks for its own rate and the rest is the sum less its own)
        self._rows = sum(s.rows for s in sessions if s.state in (FORWARD, READY, PREFILL))
        self._rates = {s.id: s.planner.own_rate() for s in sessions if s.planner is not None
                       and hasattr(s.planner, "own_rate")}
        self._rate = sum(self._rates.values())
        for s in sessions:
            if s.cancelled or now > s.deadline:
                self.dropped += 1
                self._drop(s, None if s.cancelled else DeadlineExceeded("the request's deadline passed"))
                continue
            if s.state in (NEW, READY):
                try:
                    self._advance(s)
                except Exception as exc:  # noqa: BLE001 (this session alone fails)
                    log.exception("session %s failed", s.id)
                    self._drop(s, exc)
        return self._forward()

    def _advance(self, s: DecodeSession) -> None:
        """Run the session's decode loop up to its next model request."""
        if s.loop is None:
            s.loop = decode(s.seq, s.spec, s.planner if s.spec.method != "ar" else None, s.stats)
            s.answer = None
        if s.planner is not None and hasattr(s.planner, "set_load"):
            mine = s.rows if s.state in (FORWARD, READY, PREFILL) else 0
            s.planner.set_load(self._rows - mine, self._rate - self._rates.get(s.id, 0.0))
        while True:
            try:
                request = s.loop.send(s.answer)
            except StopIteration as done:
                s.stats = done.value
                self._finish(s)
                return
            s.answer = None
            if isinstance(request, Chunk):
                if request.tokens:
                    s.out.put(list(request.tokens))
                s.chooser.forget_before(s.seq.root_index)
                continue
            s.request = request
            if isinstance(request, Prefill):
                if self.restore is not None:
                    s.cached_tokens = self.restore(s, s.seq.tokens)
                s.prefilled = s.target.cache.length
                s.state = PREFILL
                return
            if isinstance(request, Propose):
                if s.draft is not None:
                    s.state = DRAFTING       # before the call: its answer may come at once, on this thread
                    s.draft_started = time.perf_counter()
                    s.draft_rows = len(s.seq.tokens) - s.draft.synced
                    if s.draft.propose(s.seq.tokens, request.max_depth, request.chain, request.chain_probs,
                                       lambda g, s=s: self._drafted(s, g)):
                        return
                    s.state = READY
                continue          # no draft replica: the round goes on without a graph
            if isinstance(request, Verify):
                s.tree = request.tree
            elif isinstance(request, Step):
                s.tree = _root_tree(s.seq.root)
            s.state = FORWARD
            return

    def _drafted(self, s: DecodeSession, graph) -> None:
        """A Propose ended (on a gRPC thread): the session's next iteration goes on with `graph` (None: without)."""
        with self._cond:
            if s.state == DRAFTING:
                s.answer = s.draft_graph = graph
                s.state = READY
                if graph is not None and hasattr(s.planner, "observe_draft"):
                    # the call as a whole (the replica's forwards, its queue, the RPC): what drafting costs here
                    s.planner.observe_draft(max(s.draft_rows, 1), time.perf_counter() - s.draft_started)
                self._wake = True
                self._cond.notify_all()

    def _forward(self) -> bool:
        """One fused forward over every session waiting for one: trees, plain steps and prompt chunks."""
        trees = [s for s in self.sessions.values() if s.state == FORWARD]
        prefilling = [s for s in self.sessions.values() if s.state == PREFILL]
        if not trees and not prefilling:
            return any(s.state in (NEW, READY) for s in self.sessions.values())
        chunks, chunk_of = [], []
        budget = self._prefill_budget(trees)
        for s in prefilling:
            if budget <= 0:
                s.rows = 0
                continue
            todo = s.seq.tokens[s.prefilled:]
            take = todo[:budget]
            budget -= len(take)
            last = len(take) == len(todo)
            chunks.append(PrefillChunk(s.target, take, last, s.chooser, len(s.seq.tokens)))
            self.prefill_chunks += 1
            chunk_of.append(s)
            s.rows = len(take)
        jobs = [(s.target, s.tree, s.seq.root_index, s.chooser) for s in trees]
        for s in trees:
            s.rows = len(s.tree)
        rows = sum(s.rows for s in trees) + sum(len(c.tokens) for c in chunks)
        t0 = time.perf_counter()
        m0 = time.monotonic()
        marks = [_grammar_state(s) for s in trees + chunk_of]
        try:
            results = verify_batch(jobs, chunks)
        except Exception:
            if len(jobs) + len(chunks) == 1:
                raise
            for s, mark in zip(trees + chunk_of, marks):    # choices made before the failure are made again
                if mark is not None:
                    s.chooser.grammar.restore(mark)
            results = self._one_by_one(jobs, chunks, trees, chunk_of)
        seconds = time.perf_counter() - t0
        self.forwards += 1
        self.forward_sessions += len(trees) + len(chunk_of)
        self.widest = max(self.widest, len(trees) + len(chunk_of))
        self.rows_ema = rows if self.forwards == 1 else 0.9 * self.rows_ema + 0.1 * rows
        if self.on_forward is not None:
            self.on_forward(m0, time.monotonic(), [s.id for s in trees + chunk_of])
        tree_rows, keys = _tree_rows(trees)
        if not chunks:        # prompt rows skip the output layer: they would skew the cost of a round's rows
            self.planner.target_costs.observe(rows, seconds, keys)
        else:
            fed = rows - tree_rows
            spent = seconds - (self.planner.target_costs.seconds(tree_rows, keys) if tree_rows else 0.0)
            per_token = max(spent, 0.1 * seconds) / fed
            self.prompt_token_s = per_token if self.prompt_token_s is None \
                else 0.7 * self.prompt_token_s + 0.3 * per_token
        for s, verdict in zip(trees, results[: len(jobs)]):
            if isinstance(verdict, BaseException):
                self._drop(s, verdict)
                continue
            if s.planner is not None and hasattr(s.planner, "waited"):
                s.planner.waited(seconds)
            s.answer = verdict.emitted[0] if isinstance(s.request, Step) else verdict
            if s.draft is not None:
                if isinstance(s.request, Verify) and s.request.graph is s.draft_graph:
                    s.draft.last_path = list(verdict.graph_path)   # where the replica's last graph was accepted
                s.draft.add_features(s.seq.root_index, verdict.features)
            s.state = READY
        for s, chunk, res in zip(chunk_of, chunks, results[len(jobs):]):
            if isinstance(res, BaseException):
                self._drop(s, res)
                continue
            if s.draft is not None:
                s.draft.add_features(s.prefilled, res.features)
            s.prefilled += len(chunk.tokens)
            if chunk.last:
                if self.store is not None:
                    self.store(s, s.seq.tokens)
                s.answer = res.first
                s.state = READY
        return True

    def _prefill_budget(self, trees: list[DecodeSession]) -> int:
        """Prompt tokens this iteration may feed: all it can (whole_prefill) when no session is decoding; else
        what costs prefill_share times the decoding rows' forward (at least one row's), at least prefill_chunk."""
        if not trees and not any(s.state in (READY, DRAFTING) for s in self.sessions.values()):
            return self.whole_prefill
        if self.prompt_token_s is None:
            return self.prefill_chunk
        rows, keys = _tree_rows(trees)
        fits = self.prefill_share * self.planner.target_costs.seconds(max(rows, 1), keys) / self.prompt_token_s
        return max(self.prefill_chunk, min(self.whole_prefill, int(fits)))

    def _one_by_one(self, jobs, chunks, trees, chunk_of) -> list:
        """After a failed fused forward: each piece alone, so one bad session fails only itself."""
        out = []
        for s, job in zip(trees, jobs):
            s.target.cache.truncate(s.seq.root_index)
            try:
                out.append(verify_batch([job])[0])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        for s, chunk in zip(chunk_of, chunks):
            s.target.cache.truncate(s.prefilled)
            try:
                out.append(verify_batch([], [chunk])[0])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out

    # ------------------------------------------------------------ endings
    def _finish(self, s: DecodeSession) -> None:
        s.state = DONE
        self.sessions.pop(s.id, None)
        s.stats.cached_prompt_tokens = s.cached_tokens
        if s.draft is not None:
            s.stats.draft_forwards = s.draft.draft_forwards
            s.stats.draft_tokens = s.draft.draft_tokens
            s.stats.draft_features_missing = s.draft.features_missing
            s.stats.draft_failovers = s.draft.failovers
            s.stats.feature_bytes = s.draft.feature_bytes
            s.draft.release()
        if self.planner.shared is not None and s.spec.shared_lookup:
            self.planner.shared.add(s.seq.tokens)
        s.out.put(END)

    def _drop(self, s: DecodeSession, exc: BaseException | None) -> None:
        self.sessions.pop(s.id, None)
        s.state = DONE
        if s.loop is not None:
            s.loop.close()
        if s.draft is not None:
            s.draft.release()
        self._end(s, exc)

    @staticmethod
    def _end(s: DecodeSession, exc: BaseException | None) -> None:
        s.state = DONE
        s.error = exc
        s.out.put(exc if exc is not None else END)


def _tree_rows(trees: list[DecodeSession]) -> tuple[int, int]:
    """The rows the sessions' trees put into a forward, and the forward's context: every row attends to its own
    session's context, so the mean over rows."""
    rows = sum(len(s.tree) for s in trees)
    return rows, sum(len(s.tree) * len(s.seq.tokens) for s in trees) // max(rows, 1)


def _grammar_state(s: DecodeSession):
    """The session's grammar state (JSON mode), None without a grammar."""
    return s.chooser.grammar.state() if s.chooser.grammar is not None else None


def new_session(session_id: str, runner, planner: Planner, tokens: list[int], max_tokens: int, spec: SpecConfig,
                sampling: SamplingParams, stop_ids, vocab_size: int, *, draft=None, feature_layers=(),
                deadline: float = float("inf"), top_logprobs: int | None = None, grammar=None) -> DecodeSession:
    """A session ready for Scheduler.submit; with `top_logprobs` its chooser notes each output token's logprobs,
    with a `grammar` (core.grammar.GrammarConstraint: JSON mode) every token it decides is constrained."""
    seq = Sequence(tokens, max_tokens, stop_ids, grammar=grammar)
    chooser = TokenChooser(sampling, vocab_size, top_logprobs, grammar)
    target = TargetSession(runner, feature_layers=tuple(feature_layers))
    plan = planner.sequence(sampling.greedy, spec.planner, spec.shared_lookup) if spec.method != "ar" else None
    return DecodeSession(session_id, seq, spec, chooser, target, plan, draft if spec.method != "ar" else None,
                         deadline, stats=DecodeStats(method=spec.method))
