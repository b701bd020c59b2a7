"""The one place that decides how much each round speculates.

Before a round the planner picks one of:
- PLAIN: one target step on the root (one token);
- LOOKUP: verify the first n tokens of the lookup chain alone (no draft forward at all);
- DRAFT: let the draft model draft its graph under the root, the lookup chain merged in, then verify the
  graph's most valuable nodes.
After drafting it picks how many of the graph's nodes (best first) the target verifies.

Every choice maximizes the same quantity, the round's expected tokens minus `rate` x its expected seconds,
where `rate` is the tokens per second this sequence achieves (never less than plain decoding's). Picking,
round by round, what maximizes E[tokens] - rate x E[seconds] is what maximizes tokens per second over the
whole request (Dinkelbach's rule for a ratio): a node is verified when its acceptance probability pays
for its row at the current rate, a draft runs when what it is expected to add pays for its forwards, and
a round whose best option is worth less than a plain step decodes plainly, so speculation never runs
slower than plain decoding by more than what it takes to learn the costs.

The costs come from one model of forward time against rows and context length (`costs.ForwardCosts`),
corrected online by every forward this process times, plus a round overhead measured the same way. Acceptance comes from the
draft's own path probabilities for drafted nodes, and for lookup tokens from the engine's measured rate at
their match length (`lookup.AcceptanceStats`) scaled by how the sequence's own lookups have fared. What
the draft adds in a round is measured on the rounds that draft: the tokens accepted on its nodes (when the
lookup chain did not already cover the round) and its seconds. A draft left unused for a while is tried
again (a probe), but only while it could still pay: with the optimism of an upper confidence bound on what
it adds, which narrows as drafted rounds accumulate, so a draft measured to lose on this machine stops
being probed. The draft's first forward after a pause reads every token committed meanwhile (its
catch-up); a round drafts only when its gain over the rounds still to come pays for that.

Whatever the planner decides, the output is the target's own: every emitted token is the target's choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .costs import ForwardCosts
from .lookup import MAX_MATCH, AcceptanceStats, Continuation, SharedSuffixIndex, SuffixLookup

PLAIN, LOOKUP, DRAFT = "plain", "lookup", "draft"

PRIOR_DRAFT_TOKENS = {True: 1.0, False: 0.6}   # accepted draft tokens per round assumed before any is measured
PROBE_MIN, PROBE_MAX = 8, 128                  # rounds without the draft before it is tried again (doubling)
PROBE_OPTIMISM = 1.0                           # accepted tokens added to the draft's estimate when probing, / sqrt(rounds)
SEQUENCE_PRIOR = 6.0                           # expected accepted lookup tokens a sequence's own record is weighed against


class Ema:
    """The mean until 1/alpha samples, then an exponential moving average."""

    __slots__ = ("value", "n", "alpha")

    def __init__(self, alpha: float, value: float | None = None, weight: int = 5):
        """`value`, if given, starts the average as if it were the mean of `weight` samples."""
        self.alpha = alpha
        self.value = value
        self.n = 0 if value is None else weight

    def add(self, x: float) -> None:
        self.n += 1
        w = max(self.alpha, 1.0 / self.n)
        self.value = x if self.value is None else (1 - w) * self.value + w * x

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@dataclass
class RoundPlan:
    """What one round does. `chain` is the lookup proposal (tokens and each token's acceptance probability
    given the ones before it); a LOOKUP round verifies its first `chain_len` tokens."""

    kind: str
    chain: list[int] = field(default_factory=list)
    chain_probs: list[float] = field(default_factory=list)
    chain_len: int = 0
    match_len: int = 0
    source: str = ""
    max_depth: int = 0
    probe: bool = False


@dataclass
class _DraftRecord:
    """What the draft adds, per round that drafts: accepted tokens on its own nodes, verified rows of its own
    nodes, and its seconds beyond the first (catch-up) forward."""

    tokens: Ema
    rows: Ema
    extra_seconds: Ema


class Planner:
    """Engine-wide: the cost models, the acceptance statistics and the cross-request index, shared by the
    sequences it plans (`sequence()` gives each its own planner, started from what the engine has learned).

    target_costs: forward seconds of the target by rows. draft_costs: the draft's, by rows (None: no draft).
    shared: the cross-request suffix index (None: none)."""

    def __init__(self, target_costs: ForwardCosts, draft_costs: ForwardCosts | None = None,
                 shared: SharedSuffixIndex | None = None):
        self.target_costs = target_costs
        self.draft_costs = draft_costs if draft_costs is not None else ForwardCosts(first=0.001)
        self.shared = shared
        self.lookup_stats = {(src, g): AcceptanceStats() for src in ("context", "shared") for g in (True, False)}
        self.draft = {g: _DraftRecord(Ema(0.05), Ema(0.05), Ema(0.05)) for g in (True, False)}
        self.overhead = {PLAIN: Ema(0.05), LOOKUP: Ema(0.05), DRAFT: Ema(0.05)}
        self.rate_tokens = Ema(0.02)
        self.rate_seconds = Ema(0.02)
        self.decisions = {PLAIN: 0, LOOKUP: 0, DRAFT: 0}

    def sequence(self, greedy: bool = True, enabled: bool = True, shared: bool = True) -> "SequencePlanner":
        """The planner of one sequence. enabled=False: every round of a speculative method drafts and verifies its
        whole budget (the algorithm without the planner, for experiments); shared=False: no proposals from the
        cross-request index."""
        return SequencePlanner(self, greedy, enabled, shared)

    def remember(self, tokens) -> None:
        """A finished request's tokens, for the cross-request index."""
        if self.shared is not None:
            self.shared.add(tokens)

    def snapshot(self) -> dict:
        """What the planner believes now (for reports and logs)."""
        rec = self.draft[True]
        return {"target_forward_s": self.target_costs.table(), "draft_forward_s": self.draft_costs.table((1, 4, 8, 32)),
                "overhead_s": {k: e.value for k, e in self.overhead.items()},
                "draft_tokens_per_round": rec.tokens.value, "draft_rows_per_round": rec.rows.value,
                "decisions": dict(self.decisions)}


class SequencePlanner:
    """The planner of one sequence: its own lookup index and its own measures of how speculation goes on its
    text, started from (and feeding) the engine's."""

    def __init__(self, engine: Planner, greedy: bool = True, enabled: bool = True, shared: bool = True):
        self.engine = engine
        self.greedy = greedy
        self.enabled = enabled
        self.shared = engine.shared if shared else None
        self.context = SuffixLookup()
        e = engine.draft[greedy]
        self.draft = _DraftRecord(Ema(0.15, e.tokens.value), Ema(0.15, e.rows.value),
                                  Ema(0.15, e.extra_seconds.value))
        # this sequence's lookup record against what the engine's rates predicted for it: its text may be more
        # (an edit) or less (a paraphrase) predictable than the engine's average
        self.lookup_accepted = {src: 0.0 for src in ("context", "shared")}
        self.lookup_expected = {src: 0.0 for src in ("context", "shared")}
        self.rate_tokens = Ema(0.1, engine.rate_tokens.value)
        self.rate_seconds = Ema(0.1, engine.rate_seconds.value)
        self.since_draft = 0
        self.probe_gap = PROBE_MIN
        self.base_rows = 0
        self.others_rate = 0.0
        self.keys = 0                      # the sequence's context length at its last plan: what a row attends to
        self._round_forward_s = 0.0        # forward seconds timed since the round started
        self._round_draft_s = 0.0          # of those, the draft's
        self._round_draft_first_s = None   # the draft's first forward of the round
        self.decisions = {PLAIN: 0, LOOKUP: 0, DRAFT: 0}

    # ------------------------------------------------------------ what things cost and yield
    def set_load(self, base_rows: int = 0, others_rate: float = 0.0) -> None:
        """Plan the next rounds as one of several sessions whose rounds share a fused forward: `base_rows` rows of
        the others go with this session's, and they generate `others_rate` tokens per second. A row this session
        adds slows every session's round, so rows (and the round's overhead, spent on the same thread) are
        valued at the rate of all of them; the draft's latency delays this session alone."""
        self.base_rows = max(int(base_rows), 0)
        self.others_rate = max(float(others_rate), 0.0)

    def t(self, rows: int) -> float:
        """The forward time of a round that verifies `rows` rows of this sequence (at its context length)."""
        return self.engine.target_costs.seconds(self.base_rows + max(rows, 1), self.keys)

    def overhead(self, kind: str) -> float:
        return self.engine.overhead[kind].get(0.0)

    def own_rate(self) -> float:
        """This sequence's recent tokens per second, and never less than plain decoding's."""
        plain = 1.0 / (self.t(1) + self.overhead(PLAIN))
        if self.rate_tokens.value is None or not self.rate_seconds.value:
            return plain
        return max(plain, self.rate_tokens.value / self.rate_seconds.value)

    def rate(self) -> float:
        """The tokens per second a round's rows must pay for: this sequence's, plus those of the sessions that
        share its forwards."""
        return self.own_rate() + self.others_rate

    def lookup_factor(self, source: str) -> float:
        """How much more (or less) often this sequence's lookup tokens are accepted than the engine's rates say."""
        k = SEQUENCE_PRIOR
        return min(max((self.lookup_accepted[source] + k) / (self.lookup_expected[source] + k), 0.2), 2.0)

    def chain_probs(self, cont: Continuation) -> list[float]:
        """Each chain token's acceptance probability given the tokens before it were accepted: the engine's rate
        at its match length, times this sequence's factor, times the token's share among the matches."""
        engine_stats = self.engine.lookup_stats[(cont.source, self.greedy)]
        factor = self.lookup_factor(cont.source)
        return [min(engine_stats.rate(min(cont.match_len + i, MAX_MATCH)) * factor, 0.98) * share
                for i, share in enumerate(cont.shares)]

    def best_chain_length(self, probs: list[float], rate: float, rows_before: int = 1,
                          fixed_s: float = 0.0) -> tuple[int, float]:
        """(n, value): the chain prefix whose expected tokens minus rate x seconds is largest, verified after
        `rows_before` other rows; value includes the bonus token."""
        best_n, best_v = 0, 1.0 - rate * (self.t(rows_before) + fixed_s)
        expected, survive = 0.0, 1.0
        for n, p in enumerate(probs, 1):
            survive *= p
            expected += survive
            v = 1.0 + expected - rate * (self.t(rows_before + n) + fixed_s)
            if v > best_v:
                best_n, best_v = n, v
        return best_n, best_v

    # ------------------------------------------------------------ before a round
    def plan(self, tokens: list[int], room: int, method: str, lookup: int, max_depth: int,
             draft_lag: int = 0, draft_available: bool = True) -> RoundPlan:
        """The plan of the next round of a sequence whose committed tokens are `tokens`, with `room` tokens left
        to generate. lookup: the longest chain to propose (0: none); max_depth: the draft's levels;
        draft_lag: committed tokens the draft has not read yet (its first forward feeds them)."""
        depth = min(max_depth, room - 1)
        self.keys = len(tokens)
        if method == "ar" or room <= 1:
            return self._decided(RoundPlan(PLAIN))
        cont = Continuation([], [], 0, 0, "")
        n_chain = min(lookup, room - 1)
        if n_chain > 0:
            cont = self.context.match(tokens, n_chain)
            shared = self.shared
            if shared is not None:
                other = shared.match(tokens, n_chain)
                if other and (not cont or (other.match_len, len(other.tokens)) > (cont.match_len, len(cont.tokens))):
                    cont = other
        probs = self.chain_probs(cont) if cont else []
        if not self.enabled:
            if draft_available and depth > 0:
                return self._decided(RoundPlan(DRAFT, cont.tokens, probs, len(cont.tokens), cont.match_len,
                                               cont.source, depth))
            return self._decided(RoundPlan(PLAIN))
        rate = self.rate()
        o_plain, o_spec = self.overhead(PLAIN), self.overhead(LOOKUP)
        v_plain = 1.0 - rate * (self.t(1) + o_plain)
        n_l, v_lookup = self.best_chain_length(probs, rate, 1, o_spec) if probs else (0, float("-inf"))
        # a plain round carries the chain it declined: the token it emits tells whether the chain would have been
        # right (record_round), at no cost
        best = RoundPlan(PLAIN, cont.tokens, probs, 0, cont.match_len, cont.source) if probs else RoundPlan(PLAIN)
        best_v = v_plain
        if n_l > 0 and v_lookup > best_v:
            best = RoundPlan(LOOKUP, cont.tokens, probs, n_l, cont.match_len, cont.source)
            best_v = v_lookup
        if draft_available and depth > 0:
            own = self.own_rate()
            gain = self.draft.tokens.get(PRIOR_DRAFT_TOKENS[self.greedy])
            catch_up = self._catch_up_share(draft_lag, room, gain) * own
            if self._draft_value(probs, n_l, rate, own, gain) - catch_up > best_v:
                best = RoundPlan(DRAFT, cont.tokens, probs, n_l, cont.match_len, cont.source, depth)
                self.probe_gap = PROBE_MIN
            elif self.since_draft >= self.probe_gap and best.kind != LOOKUP:
                # a probe: only while the draft might still pay, by an upper confidence bound on what it adds
                rounds = self.draft.tokens.n + self.engine.draft[self.greedy].tokens.n
                hope = gain + PROBE_OPTIMISM / (1.0 + rounds) ** 0.5
                if self._draft_value(probs, n_l, rate, own, hope) - \
                        self._catch_up_share(draft_lag, room, hope) * own > best_v:
                    best = RoundPlan(DRAFT, cont.tokens, probs, n_l, cont.match_len, cont.source, depth, probe=True)
                self.probe_gap = min(2 * self.probe_gap, PROBE_MAX)
        return self._decided(best)

    def _draft_value(self, probs: list[float], n_l: int, rate: float, own_rate: float, gain: float) -> float:
        """Expected tokens minus rate x seconds of a drafted round with the draft already caught up: the chain's
        part, plus the `gain` the draft adds when the chain's first token fails (the draft extends only its own
        nodes), minus the draft's forwards (its latency delays this sequence alone) and the rows they add to
        verification (which delay every session of the forward)."""
        rec = self.draft
        rows = rec.rows.get(2.0)
        chain_part, survive = 0.0, 1.0
        for p in probs[:n_l]:
            survive *= p
            chain_part += survive
        miss = 1.0 - (probs[0] if n_l else 0.0)
        first = self.engine.draft_costs.seconds(1)
        draft_s = first + rec.extra_seconds.get(3 * first)
        return 1.0 + chain_part + miss * gain - own_rate * draft_s - rate * (self.t(1 + n_l + rows) + self.overhead(DRAFT))

    def _catch_up_share(self, lag: int, room: int, gain: float) -> float:
        """The seconds of the draft's catch-up (reading the `lag` tokens it missed) one round must bear: the
        catch-up serves every drafted round still to come, about room / (1 + gain) of them."""
        if lag <= 0:
            return 0.0
        dc = self.engine.draft_costs
        extra = max(dc.seconds(lag + 1) - dc.seconds(1), 0.0)
        return extra * (1.0 + gain) / max(room, 1)

    def _decided(self, plan: RoundPlan) -> RoundPlan:
        self.decisions[plan.kind] += 1
        self.engine.decisions[plan.kind] += 1
        self._round_forward_s = self._round_draft_s = 0.0
        self._round_draft_first_s = None
        self.since_draft = 0 if plan.kind == DRAFT else self.since_draft + 1
        return plan

    # ------------------------------------------------------------ after drafting
    def tree_size(self, path_probs: list[float]) -> int:
        """How many of a verification tree's nodes (best first, root first; each node's acceptance probability
        is its path probability) to verify: the prefix with the most expected tokens minus rate x seconds.
        The draft's seconds are spent by now and do not count."""
        if not self.enabled or len(path_probs) <= 1:
            return len(path_probs)
        rate = self.rate()
        best_n, best_v, expected = 1, 1.0 - rate * self.t(1), 1.0
        for n in range(2, len(path_probs) + 1):
            expected += path_probs[n - 1]
            v = expected - rate * self.t(n)
            if v > best_v:
                best_n, best_v = n, v
        return best_n

    # ------------------------------------------------------------ what happened
    def _count_chain(self, plan: RoundPlan, emitted: list[int], judged: int, accepted: int) -> None:
        """The first `judged` tokens of the round's chain were judged against the target's, the first `accepted`
        of them right: into the engine's rates and this sequence's record against them."""
        stats = self.engine.lookup_stats[(plan.source, self.greedy)]
        # what the engine's rates expected of the tokens judged, up to the first wrong one
        expected = 0.0
        for i in range(min(accepted + 1, judged)):
            expected += stats.rate(min(plan.match_len + i, MAX_MATCH))
        self.lookup_expected[plan.source] += expected
        self.lookup_accepted[plan.source] += accepted
        stats.record(plan.match_len, judged, accepted)

    def observe_target(self, rows: int, seconds: float) -> None:
        """A target forward over `rows` rows of this sequence alone took `seconds`."""
        self.engine.target_costs.observe(rows, seconds, self.keys)
        self._round_forward_s += seconds

    def waited(self, seconds: float) -> None:
        """This sequence's round waited `seconds` for a forward (a fused one, timed by its driver)."""
        self._round_forward_s += seconds

    def observe_draft(self, rows: int, seconds: float) -> None:
        """A draft forward over `rows` rows took `seconds`."""
        self.engine.draft_costs.observe(rows, seconds)
        self._round_forward_s += seconds
        self._round_draft_s += seconds
        if self._round_draft_first_s is None:
            self._round_draft_first_s = seconds

    def record_round(self, plan: RoundPlan, emitted: list[int], seconds: float, verified: int = 1,
                     verified_chain: int = 0) -> None:
        """The round planned as `plan` committed `emitted` (the target's tokens), took `seconds` in all and
        verified `verified` rows, `verified_chain` of them along the lookup chain."""
        engine = self.engine
        n = len(emitted)
        if seconds > 0:
            for tokens, secs in ((self.rate_tokens, self.rate_seconds), (engine.rate_tokens, engine.rate_seconds)):
                tokens.add(n)
                secs.add(seconds)
            engine.overhead[plan.kind].add(max(seconds - self._round_forward_s, 0.0))
        chain_accepted = 0
        if plan.kind == PLAIN and plan.chain and emitted:
            # the chain this round declined, judged by the target's own token: a free sample of how the lookup
            # fares on this text, so a sequence whose text does not repeat learns it without verifying rows
            self._count_chain(plan, emitted, 1, int(emitted[0] == plan.chain[0]))
        elif plan.kind != PLAIN and plan.chain:
            for a, b in zip(plan.chain[:verified_chain], emitted):
                if a != b:
                    break
                chain_accepted += 1
            self._count_chain(plan, emitted, verified_chain, chain_accepted)
        if plan.kind == DRAFT:
            extra = max(self._round_draft_s - (self._round_draft_first_s or 0.0), 0.0)
            for rec in (self.draft, engine.draft[self.greedy]):
                rec.extra_seconds.add(extra)
                if chain_accepted == 0:      # the draft had the round to itself: what it added is measurable
                    rec.tokens.add(max(n - 1, 0))
                    rec.rows.add(max(verified - 1 - verified_chain, 0))
