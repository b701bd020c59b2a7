"""Speculation that follows load: how big a tree each round verifies, chosen from what the target measures.

One stream wants the full tree: on a CPU a 16-token tree costs about what a one-token step costs, so every
accepted token is nearly free. Under load the target's fused forward carries every concurrent session's
tree, and its cost grows with the rows: at saturation a tree of 12 costs 12x a step, and the ~1.2 extra
tokens it yields no longer pay for it. vLLM's `num_speculative_tokens_per_batch_size` is a hand-written
table for this; here the router measures both sides, per target replica, and picks the budget whose
predicted tokens per second per sequence is highest:

    rate(b) = (1 + A(b)) / ([b > 1] D(b) + O + C(n x S(b)))

    A(b)   accepted draft tokens per round with a tree of b tokens. Measured from every verified tree: the tree
           is flattened best-first, so the tree a smaller budget b' would have verified is its first b' nodes
           and the path it would have accepted is the accepted path's prefix below index b'; one tree gives
           A for every b' up to the budget it was drafted with.
    S(b)   tokens in such a tree (trees stop early when the draft is unsure), measured the same way.
    C(r)   seconds of the target's fused forward over r rows (the replica reports each call's forward time
           and rows): a least-squares line over per-size averages, from many calls.
    n      sessions per fused forward: the larger of the replica's measured batch size and the router's own
           sessions on that replica.
    D(b)   seconds of a Propose with budget b (the draft's work, batched across sessions, and its call).
    O      the rest of a Verify call: batching, serialization, the network. A median of recent calls, not a
           mean: a call that waited behind another request's Prefill on the replica's model thread (a 200-token
           prompt is ~370 ms of target forward on a 2-core Zen 4) is not a cost of any tree size, and in a
           moving average those waits made O ~65 ms against a typical ~3 ms at 4 streams, which diluted the
           forward's cost and kept choosing trees that lost to plain decoding.

b = 1 is plain decoding (no draft call at all). Speculation is chosen only when it beats plain decoding by
`margin`. A session that has been decoding plainly leaves it only when the time its remaining tokens would save
pays for catching its draft up (`catch_up_pays`): the draft must first read every token since its last Propose
(the whole prompt if it never drafted), which on a busy replica cost 30-100 ms, more than a short tail of
speculation saves. Every setting emits exactly the target's tokens (each round is verified); only the speed
changes. The decision is re-taken each round from the moving averages, so it follows the load as it moves.
"""
from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class LoadPolicyConfig:
    mode: str = "auto"            # auto: follow load; off: always the configured spec (the old behaviour)
    margin: float = 0.05          # speculate only when predicted >= (1 + margin) x plain decoding
    alpha: float = 0.1            # weight of a new sample in the moving averages of costs
    accept_alpha: float = 0.02    # the same for acceptance and tree sizes: one round's accepted count swings
    #                               0..depth, so a 10-round average flipped decisions on noise (and a low one,
    #                               kept while decoding plainly, held the policy there)
    warmup_calls: int = 4         # Verify calls measured on a replica before its policy judges (full spec till then)
    prior_slope: float = 1 / 64   # C(r) per extra row, as a fraction of C(1), until two sizes are measured
    probe_every: int = 200        # rounds of each session between probes of a setting not measured lately (with n
    #                               sessions per forward the replica probes every probe_every x n of its rounds:
    #                               at saturation a probe's drafting, catch-up included, slows every session)
    probe_rounds: int = 8         # rounds a probe lasts (its costs need clean batches: the replica's whole load)
    probe_backoff: int = 4        # each probe of a tree that leaves plain decoding chosen doubles the wait for the
    #                               next, up to 2**probe_backoff x probe_every (a probe costs its sessions' draft
    #                               catch-up and rounds of speculation at a load where it loses); a decision
    #                               to speculate resets it

    @classmethod
    def from_value(cls, value) -> "LoadPolicyConfig":
        if value is None or value == "auto" or value is True:
            return cls()
        if value in ("off", False):
            return cls(mode="off")
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown load_policy field(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
            cfg = cls(**value)
            if cfg.mode not in ("auto", "off"):
                raise ValueError(f"load_policy mode must be auto or off, got {cfg.mode!r}")
            return cfg
        raise ValueError(f"load_policy must be auto, off or an object, got {value!r}")


def budget_ladder(budget: int) -> list[int]:
    """The tree sizes the policy chooses among (besides 1, plain decoding): about x1.5 apart up to `budget`."""
    out, b = [], 2
    while b < budget:
        out.append(b)
        b = max(b + 1, int(round(b * 1.5)))
    out.append(budget)
    return out


class Ema:
    __slots__ = ("value", "n")

    def __init__(self):
        self.value: float | None = None
        self.n = 0

    def add(self, x: float, alpha: float) -> None:
        """The mean of the samples so far until there are 1/alpha of them, then a moving average."""
        self.n += 1
        w = max(alpha, 1.0 / self.n)
        self.value = x if self.value is None else (1 - w) * self.value + w * x


class RunningMedian:
    """The median of the latest `window` samples (robust to the rare sample that includes a wait)."""
    __slots__ = ("samples", "value")

    def __init__(self, window: int = 64):
        self.samples: deque[float] = deque(maxlen=window)
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.samples.append(x)
        self.value = statistics.median(self.samples)


class CostModel:
    """Seconds of a fused forward as a function of its rows: averages per size bucket, interpolated between
    them, and a line through them beyond the sizes measured."""

    def __init__(self, alpha: float, prior_slope: float):
        self.alpha = alpha
        self.prior_slope = prior_slope
        self.buckets: dict[int, tuple[Ema, Ema]] = {}     # bucket -> (rows, seconds)

    @staticmethod
    def bucket(rows: int) -> int:
        return 0 if rows <= 1 else int(round(4 * math.log2(rows)))   # ~19% wide

    def add(self, rows: int, seconds: float) -> None:
        r, s = self.buckets.setdefault(self.bucket(rows), (Ema(), Ema()))
        r.add(rows, self.alpha)
        s.add(seconds, self.alpha)

    def points(self) -> list[tuple[float, float]]:
        return sorted((r.value, s.value) for r, s in self.buckets.values())

    def known(self, rows: float) -> bool:
        return self.bucket(int(rows)) in self.buckets

    def predict(self, rows: float) -> float | None:
        pts = self.points()
        if not pts:
            return None
        if len(pts) == 1 or pts[-1][0] == pts[0][0]:
            x0, y0 = pts[0]
            base = y0 / (1 + self.prior_slope * max(x0 - 1, 0))
            return base * (1 + self.prior_slope * max(rows - 1, 0))
        # inside the measured sizes: between the two neighbouring bucket averages. The cost is not a line on a
        # CPU (default target, Zen 5: 1 / 3 / 6 rows 3.5 / 5.5 / 9.3 ms, steeper beyond): a line fitted to
        # trees of 10-16 rows predicted ~10 ms for one row, made plain decoding look 2-3x dearer than it is,
        # and kept a busy replica speculating at half of plain decoding's throughput.
        if pts[0][0] <= rows <= pts[-1][0]:
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                if x0 <= rows <= x1:
                    return y0 if x1 == x0 else y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
        # outside them: least squares through the bucket averages (each bucket one point)
        n = len(pts)
        mx = sum(x for x, _ in pts) / n
        my = sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = max(sum((x - mx) * (y - my) for x, y in pts) / sxx, 0.0)
        intercept = my - slope * mx
        if intercept <= 0:       # a line through the origin would make one row free: keep the cheapest measured
            intercept = min(y for _, y in pts) * 0.5
        return intercept + slope * rows


@dataclass
class Decision:
    budget: int                    # 1: plain decoding
    rates: dict[int, float] = field(default_factory=dict)   # predicted tokens/s per sequence by budget
    reason: str = ""


class LoadPolicy:
    """The policy of one target replica (the router keeps one per replica it uses)."""

    def __init__(self, budget: int, config: LoadPolicyConfig | None = None, rng: random.Random | None = None):
        self.config = config or LoadPolicyConfig()
        self.full = budget
        self.ladder = budget_ladder(budget)
        a = self.config.alpha
        self.cost = CostModel(a, self.config.prior_slope)
        self.accepted = {b: Ema() for b in self.ladder}      # A(b)
        self.tree = {b: Ema() for b in self.ladder}          # S(b)
        self.draft = {b: Ema() for b in self.ladder}         # D(b)
        self.overhead = RunningMedian()                      # O
        self.catch_up = Ema()            # seconds per token of a Propose that catches a lagging draft up
        self.declined = 0                # switches to speculation declined because the catch-up would not pay
        self.batch = Ema()                                   # sessions per fused forward
        self.calls = 0
        self.rounds = 0
        self.last: Decision = Decision(budget, reason="full spec until measured")
        self._probe_left = 0
        self._next_probe = self.config.probe_every      # the round the next probe may start at
        self._probe_budget: int | None = None
        self._probe_owner = None                  # the session a probe's rounds go to (None: the next to ask)
        self._probe_owner_seen = 0                # the round it last asked at
        self._probe_from: int | None = None       # the decision a probe of a tree interrupted, until judged
        self._probe_streak = 0                    # probes in a row that left that decision standing
        self._rng = rng or random.Random(0)

    # what the router reports ----------------------------------------------------------------
    def observe_verify(self, rows: int, sessions: int, forward_s: float, call_s: float) -> None:
        """One Verify call on this replica: its fused forward's rows, sessions and seconds, and the call's."""
        a = self.config.alpha
        if rows > 0 and forward_s > 0:
            self.cost.add(rows, forward_s)
        if sessions > 0:
            self.batch.add(sessions, a)
        if call_s >= forward_s >= 0:
            self.overhead.add(call_s - forward_s)
        self.calls += 1

    def observe_tree(self, budget: int, tree_size: int, tree_path) -> None:
        """A verified tree drafted with `budget`: its size and its accepted path (tree indices, root first)."""
        a = self.config.accept_alpha
        path = list(tree_path)[1:]
        for b in self.ladder:
            if b > budget:
                break
            acc = 0
            for idx in path:
                if idx >= b:
                    break
                acc += 1
            self.accepted[b].add(acc, a)
            self.tree[b].add(min(tree_size, b), a)

    def observe_propose(self, budget: int, seconds: float) -> None:
        b = self._rung(budget)
        self.draft[b].add(seconds, self.config.alpha)

    def observe_catch_up(self, tokens: int, seconds: float) -> None:
        """A Propose that fed the draft `tokens` tokens it lacked (a session's prefill, or the tokens of plain
        rounds) before drafting."""
        if tokens > 0 and seconds > 0:
            self.catch_up.add(seconds / tokens, self.config.alpha)

    def catch_up_pays(self, decision: Decision, lag: int, remaining: int) -> bool:
        """Whether a session whose draft lags by `lag` tokens, with at most `remaining` tokens left to write,
        should take the speculating `decision`: the seconds its remaining tokens would save against plain
        decoding must exceed the draft's catch-up. Unmeasured (no catch-up seen yet, or no rates): yes, so
        that it gets measured."""
        per_token = self.catch_up.value
        spec, plain = decision.rates.get(decision.budget), decision.rates.get(1)
        if per_token is None or not spec or not plain:
            return True
        saved = remaining * (1.0 / plain - 1.0 / spec)
        if saved > lag * per_token:
            return True
        self.declined += 1
        return False

    def _rung(self, budget: int) -> int:
        return min((b for b in self.ladder if b >= budget), default=self.ladder[-1])

    # the decision ----------------------------------------------------------------------------
    def rate(self, b: int, n: float) -> float | None:
        """Predicted tokens/s of one sequence with budget b at n sessions per forward (None: not measured)."""
        o = self.overhead.value or 0.0
        if b <= 1:
            c = self.cost.predict(n)
            return None if c is None else 1.0 / (o + c)
        acc, size, d = self.accepted[b].value, self.tree[b].value, self._draft_cost(b)
        c = None if size is None else self.cost.predict(n * size)
        if acc is None or c is None or d is None:
            return None
        return (1.0 + acc) / (d + o + c)

    def _draft_cost(self, b: int) -> float | None:
        known = [(k, e.value) for k, e in self.draft.items() if e.value is not None]
        if not known:
            return None
        exact = self.draft[b].value
        if exact is not None:
            return exact
        bigger = [v for k, v in known if k > b]      # an unmeasured rung costs at most the next bigger one's
        return min(bigger) if bigger else max(v for _, v in known)

    def decide(self, sessions_here: int = 1, session=None) -> Decision:
        """The budget for the next round (1: plain). `sessions_here`: the router's own sessions on the replica;
        `session`: whose round it is (a probe's rounds go to one session)."""
        cfg = self.config
        self.rounds += 1
        if cfg.mode == "off":
            return Decision(self.full, reason="load policy off")
        if self._probe_left > 0 and self._probe_takes(session, sessions_here):
            self._probe_left -= 1
            return Decision(self._probe_budget, reason="probe")
        if self.calls < cfg.warmup_calls or self.accepted[self.ladder[0]].value is None:
            self.last = Decision(self.full, reason="full spec until measured")
            return self.last
        n = max(float(sessions_here), self.batch.value or 1.0, 1.0)
        rates = {b: r for b in [1] + self.ladder if (r := self.rate(b, n)) is not None}
        if not rates:
            self.last = Decision(self.full, reason="full spec until measured")
            return self.last
        best = max(rates, key=rates.get)
        plain = rates.get(1)
        if best > 1 and plain is not None and rates[best] < (1 + cfg.margin) * plain:
            best = 1
        if self._probe_from is not None and self._probe_left == 0:     # the first decision after a probe judges it
            self._probe_streak = self._probe_streak + 1 if best == self._probe_from else 0
            self._probe_from = None
        if best > 1:
            self._probe_streak = 0
        self.last = Decision(best, rates, "measured")
        self._maybe_probe(best, n, rates)
        return self.last

    def _probe_takes(self, session, n: int) -> bool:
        """Whether this round is one of the probe's. All of a probe's rounds go to one session: a session that
        decoded plainly pays a catch-up Propose (~1 ms per token it lags, 4 streams on a 2-core Zen 4) in its first
        drafted round, which the draft cost D(b) does not count; spread over n sessions a probe paid n catch-ups
        and, from 8 streams on, measured no steady Propose at all. An owner that stops asking (its request
        ended) hands the probe to the next session. Without a session (a caller that does not say) every round
        takes it."""
        if session is None:
            return True
        if self._probe_owner is None or self.rounds - self._probe_owner_seen > 2 * max(n, 1) + 2:
            self._probe_owner = session
        if session != self._probe_owner:
            return False
        self._probe_owner_seen = self.rounds
        return True

    def _maybe_probe(self, best: int, n: float, rates: dict[int, float]) -> None:
        """Now and then try, for a few rounds, the setting whose cost is least known: plain decoding while
        speculating (its forward over n rows may never have been measured at this load), or, while decoding
        plainly, the tree predicted best (its acceptance, size and draft cost were measured when the load
        was another: the probe refreshes exactly the numbers that would make it win)."""
        cfg = self.config
        if cfg.probe_every <= 0 or self.rounds < self._next_probe:
            return
        wait = cfg.probe_every * max(1, round(n)) * 2 ** min(self._probe_streak, max(cfg.probe_backoff, 0))
        self._next_probe = self.rounds + wait
        if best > 1 and not self.cost.known(n):
            self._probe_budget = 1
        elif best == 1:
            trees = [b for b in rates if b > 1]
            self._probe_budget = max(trees, key=rates.get) if trees else self.ladder[0]
            self._probe_from = 1
        else:
            return
        self._probe_left = cfg.probe_rounds
        self._probe_owner = None

    def snapshot(self) -> dict:
        return {"budget": self.last.budget, "reason": self.last.reason, "probe_streak": self._probe_streak,
                "rates": {str(k): round(v, 2) for k, v in self.last.rates.items()},
                "batch": None if self.batch.value is None else round(self.batch.value, 2),
                "overhead_ms": None if self.overhead.value is None else round(1000 * self.overhead.value, 2),
                "cost_ms": {str(round(r)): round(1000 * s, 2) for r, s in self.cost.points()},
                "accepted": {str(b): round(e.value, 3) for b, e in self.accepted.items() if e.value is not None},
                "draft_ms": {str(b): round(1000 * e.value, 2) for b, e in self.draft.items() if e.value is not None},
                "catch_up_ms_per_token": None if self.catch_up.value is None else round(1000 * self.catch_up.value, 3),
                "switches_declined": self.declined}


def spec_for_budget(spec, budget: int):
    """The speculation settings of a round with a tree of `budget` tokens: no deeper or wider than the tree."""
    from dataclasses import replace

    if budget >= spec.budget:
        return spec
    b = max(2, budget)
    return replace(spec, budget=b, max_depth=min(spec.max_depth, b - 1), max_width=min(spec.max_width, b),
                   lookup=min(spec.lookup, b - 1))
