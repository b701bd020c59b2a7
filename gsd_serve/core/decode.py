"""The decode loop, written once: one round, the stop/length rule and the statistics.

`decode()` asks for model work instead of doing it: it yields a request (Prefill, Propose, Verify,
Step) and is sent back the answer, and it yields a Chunk each time tokens are committed. The in-process
Engine answers the requests with local model calls; the router answers them with gRPC calls to draft
and target replicas (batched, with failover). Both run exactly this loop, so what a round does and
what it counts cannot drift apart between them.

One round:

    plan    = planner.plan(...)    plain, a lookup chain alone, or the draft's graph (planner.py)
    graph   = propose(root)        the draft's TokenGraph (gsd: merged DAG with the lookup chain in it),
                                   or the lookup chain alone (built here: no draft forward)
    tree    = the graph's most valuable nodes, as many as the planner finds worth their rows (in JSON mode,
              of the nodes the grammar allows: core/grammar.py)
    verdict = verify(tree)         one target forward over the tree, then acceptance
    commit(verdict.emitted)        the accepted draft tokens and the bonus token

A round decodes plainly (one target step on the root) for `ar`, when the planner finds nothing worth a
verification, when only the bonus token still fits, or when no draft answered and no chain was proposed.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Protocol

from .config import SpecConfig
from .graph import TokenGraph, VerifyTree, flatten_to_tree
from .planner import DRAFT, LOOKUP, PLAIN, RoundPlan


# ---------------------------------------------------------------- what the loop asks for

@dataclass(frozen=True)
class Prefill:
    """Feed the prompt to the target. Answer: the first generated token."""

    sequence: "Sequence"


@dataclass(frozen=True)
class Propose:
    """Draft a graph under the root (the last committed token), at most `max_depth` levels deep, with the
    lookup `chain` (tokens under the root, each with its acceptance probability in `chain_probs`) put in
    first.

    Answer: the graph (a TokenGraph, or anything `flatten_to_tree` takes), or None when no draft can serve
    the round."""

    sequence: "Sequence"
    max_depth: int
    chain: tuple[int, ...] = ()
    chain_probs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Verify:
    """Verify `tree` (the most valuable nodes of `graph`, best first) with one target forward. Answer: a
    Verdict-like object (`emitted`, `graph_path`, `verified_tokens`)."""

    sequence: "Sequence"
    graph: Any
    tree: VerifyTree


@dataclass(frozen=True)
class Step:
    """One plain decoding step on the root. Answer: the next token."""

    sequence: "Sequence"


@dataclass(frozen=True)
class Chunk:
    """Tokens just committed (deliver them). Answer: None."""

    tokens: list[int]


class VerdictLike(Protocol):
    emitted: list[int]
    graph_path: list[int]
    verified_tokens: int


# ---------------------------------------------------------------- the sequence

class Sequence:
    """The committed tokens of one request (prompt, then output) and when it is finished.

    `tokens` is the authoritative list: drivers read it while answering a request and never change it.
    `stop_strings` (a stops.StopStrings, or anything with its `push` and `end`) ends the output at the first
    stop string in its text; `text_end` is then the length of the output's text before it.
    `grammar` (a grammar.GrammarConstraint, JSON mode) is the output's grammar: the loop prunes drafted trees
    with it, and the target's chooser (holding the same object) masks and consumes each token it decides.
    """

    def __init__(self, prompt: list[int], max_new_tokens: int, stop_token_ids=(), stop_strings=None, grammar=None):
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_strings = stop_strings if stop_strings else None
        self.grammar = grammar
        self.finish_reason: str | None = None    # "stop" (a stop token or string) or "length"

    @property
    def prompt(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def root(self) -> int:
        return self.tokens[-1]

    @property
    def root_index(self) -> int:
        return len(self.tokens) - 1

    @property
    def room(self) -> int:
        """Tokens that may still be generated."""
        return self.max_new_tokens - (len(self.tokens) - self.prompt_len)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text_end(self) -> int | None:
        """Characters of the output's decoded text before the stop string that ended it (None: none did)."""
        return self.stop_strings.end if self.stop_strings is not None else None

    def commit(self, tokens: list[int]) -> list[int]:
        """Append what a round produced, cut at the length limit, after a stop token and after the token that
        completes a stop string; returns the tokens actually committed."""
        if self.finished:
            return []
        tokens = list(tokens[: self.room])
        for i, t in enumerate(tokens):
            if t in self.stop_token_ids:
                tokens = tokens[: i + 1]
                self.finish_reason = "stop"
                break
        if self.stop_strings is not None:
            keep = self.stop_strings.push(tokens)
            if keep is not None:
                tokens = tokens[:keep]
                self.finish_reason = "stop"
        self.tokens.extend(tokens)
        if self.finish_reason is None and self.room <= 0:
            self.finish_reason = "length"
        return tokens


# ---------------------------------------------------------------- statistics

@dataclass
class DecodeStats:
    """What one request cost. The loop fills the round counts and times; drivers add what only they
    see (draft work, prefix-cache hits, failovers)."""

    method: str = "ar"
    new_tokens: int = 0
    rounds: int = 0              # decoding rounds after the prefill (speculative rounds and plain steps)
    drafted_rounds: int = 0      # rounds that verified a drafted graph
    lookup_rounds: int = 0       # rounds that verified a lookup chain alone (no draft forward)
    plain_steps: int = 0         # rounds a speculative method decoded plainly (the planner's choice, or no draft)
    target_forwards: int = 0     # prefill + rounds (+ rebuilds a driver reports)
    verified_tokens: int = 0     # tree tokens the target verified, roots included
    accepted_tokens: int = 0     # proposed tokens accepted (bonus tokens not counted)
    lookup_accepted: int = 0     # of those, tokens of lookup chains
    merge_edges: int = 0
    draft_forwards: int = 0
    draft_tokens: int = 0        # tokens fed to the draft after the prompt: catch-up and proposals
    draft_proposal_tokens: int = 0  # of those, drafted nodes fed so that the draft proposes their children
    draft_prefill_tokens: int = 0   # prompt tokens fed to the draft
    draft_features_missing: int = 0  # feature drafts: committed tokens fed without the target's features
    cached_prompt_tokens: int = 0   # prompt tokens restored from the prefix cache
    resyncs: int = 0             # sessions rebuilt on a replica
    failovers: int = 0           # times the request moved to another target replica
    draft_failovers: int = 0     # draft calls that failed (their rounds went on without a draft)
    grammar_pruned: int = 0      # JSON mode: drafted tree nodes the grammar forbade (dropped before verification)
    feature_bytes: int = 0       # served feature drafts: target features sent to draft replicas (bytes)
    seconds: float = 0.0
    ttft: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    mean_accept_len: float = 0.0  # emitted tokens / target forwards
    draft_tokens_per_round: float = 0.0
    tokens_per_s: float = 0.0
    accept_lengths: dict[int, int] = field(default_factory=dict)  # tokens committed by a round -> rounds

    def finish(self, seconds: float) -> None:
        self.seconds = seconds
        self.mean_accept_len = self.new_tokens / self.target_forwards if self.target_forwards else 0.0
        self.draft_tokens_per_round = self.draft_tokens / self.rounds if self.rounds else 0.0
        self.tokens_per_s = self.new_tokens / seconds if seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["accept_lengths"] = {str(k): v for k, v in sorted(self.accept_lengths.items())}
        return d


# ---------------------------------------------------------------- the loop

def chain_graph(root: int, tokens, probs) -> TokenGraph:
    """A graph holding one proposed chain under the root (a lookup round: no draft involved)."""
    graph = TokenGraph(root)
    parent = 0
    for token, prob in zip(tokens, probs):
        parent, _ = graph.add(parent, token, prob)
    return graph


def chain_in_tree(tree: VerifyTree, chain_len: int) -> int:
    """How many of a chain's tokens (graph nodes 1..chain_len, one under the other from the root: the chain goes
    into a graph first) the tree verifies along the chain's own path."""
    cur, k = 0, 1
    for i in range(1, len(tree)):
        if k > chain_len:
            break
        if tree.nodes[i] == k and int(tree.parents[i]) == cur:
            cur, k = i, k + 1
    return k - 1


def _grammar_done(seq: Sequence) -> bool:
    """The output's grammar is complete: only a stop token can come, nothing is worth drafting."""
    return seq.grammar is not None and seq.grammar.is_finished()


def _allowed_tree(grammar, graph, size: int, stats: DecodeStats) -> VerifyTree:
    """The `size` most probable nodes of the graph that the grammar allows: flattened from twice as many (a node
    the grammar drops frees its row for the next best), pruned, cut to `size`. The dropped nodes are counted in
    `stats.grammar_pruned`."""
    before = grammar.pruned
    allowed = grammar.prune(flatten_to_tree(graph, 2 * size)).prefix(size)
    stats.grammar_pruned += grammar.pruned - before
    return allowed


def decode(seq: Sequence, spec: SpecConfig, planner=None, stats: DecodeStats | None = None
           ) -> Generator[Any, Any, DecodeStats]:
    """Generate into `seq` until it is finished; returns the stats (StopIteration.value).

    `planner` (a planner.SequencePlanner, or anything with its `plan`, `tree_size` and `record_round`) decides
    each round of a speculative method; without one every round drafts and verifies the whole budget."""
    stats = stats if stats is not None else DecodeStats(method=spec.method)
    start = time.perf_counter()
    first = yield Prefill(seq)
    stats.target_forwards += 1
    stats.ttft = time.perf_counter() - start
    yield Chunk(seq.commit([first]))
    speculative = spec.method != "ar"
    lag = seq.prompt_len           # committed tokens the draft has not read (its next forward feeds them)
    while not seq.finished:
        t0 = time.perf_counter()
        if not speculative or seq.room <= 1 or _grammar_done(seq):   # only the bonus token fits, or only a stop
            plan = RoundPlan(PLAIN)
        elif planner is None:
            plan = RoundPlan(DRAFT, max_depth=min(spec.max_depth, seq.room - 1))
        else:
            plan = planner.plan(seq.tokens, seq.room, spec.method, spec.lookup, spec.max_depth, lag)
        graph = None
        if plan.kind == DRAFT:
            graph = yield Propose(seq, plan.max_depth, tuple(plan.chain), tuple(plan.chain_probs))
            if graph is None and plan.chain_len:        # no draft answered: the chain alone
                plan = dataclasses.replace(plan, kind=LOOKUP)
        if plan.kind == LOOKUP:
            graph = chain_graph(seq.root, plan.chain[: plan.chain_len], plan.chain_probs[: plan.chain_len])
        t1 = time.perf_counter()
        verified, in_chain = 1, 0
        if graph is None:
            emitted = [(yield Step(seq))]
            stats.plain_steps += speculative
        else:
            size = spec.budget + len(plan.chain) if plan.kind == DRAFT else len(graph)
            if seq.grammar is None:
                tree = flatten_to_tree(graph, size)
            else:
                tree = _allowed_tree(seq.grammar, graph, size, stats)
            if plan.kind == DRAFT and planner is not None:
                tree = tree.prefix(planner.tree_size(tree.path_probs))
            verdict = yield Verify(seq, graph, tree)
            emitted = list(verdict.emitted)
            verified = verdict.verified_tokens
            in_chain = chain_in_tree(tree, len(plan.chain)) if plan.chain else 0
            if plan.kind == DRAFT:
                stats.drafted_rounds += 1
            else:
                stats.lookup_rounds += 1
            stats.verified_tokens += verified
            stats.merge_edges += int(getattr(graph, "merge_edges", 0))
        t2 = time.perf_counter()
        chunk = seq.commit(emitted)
        n = len(chunk)       # a round cut short by a stop token or the length limit counts what it gave
        stats.rounds += 1
        stats.target_forwards += 1
        stats.accepted_tokens += n - 1
        if plan.chain and graph is not None:
            same = 0
            for a, b in zip(plan.chain[:in_chain], chunk[:-1]):
                if a != b:
                    break
                same += 1
            stats.lookup_accepted += same
        stats.accept_lengths[n] = stats.accept_lengths.get(n, 0) + 1
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += t2 - t1
        lag = 0 if plan.kind == DRAFT else lag + len(emitted)
        if planner is not None and speculative:
            planner.record_round(plan, emitted, t2 - t0, verified, in_chain)
        yield Chunk(chunk)
    stats.new_tokens = len(seq.tokens) - seq.prompt_len
    stats.finish(time.perf_counter() - start)
    return stats
