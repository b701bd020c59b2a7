"""Adaptive speculation: take plain decoding steps while speculative rounds do not pay.

Whether speculation pays depends on things known only at run time: the machine (a verification of ~6
tokens cost 1.0x a decoding step on one 2-core CPU and 1.26x on another), the temperature (acceptance
falls as it rises) and the text itself. A sequence's governor measures both rates on the sequence as it
runs and picks the faster. It never changes the output: a plain step and a speculative round emit the
same tokens under greedy decoding and, because sampling noise depends only on (seed, position), the same
tokens for the same seed under sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeculationGovernor:
    """Decides, round by round, whether one sequence speculates or takes a plain step.

    step_seconds: moving average of a plain step's wall time (None: not measured yet; the first round
    is then a plain step, which measures it and yields a token like any other).
    round_tokens / round_seconds: moving averages of what a speculative round (draft + verify) emits and
    costs; their ratio is the speculative rate. A ratio of averages, not an average of per-round rates:
    tokens per round vary 1..7 from round to round, and averaging per-round rates with a short memory
    backed off on single unlucky rounds (measured: 1.51x instead of gsd's 1.65x ar at T=0).
    After min_rounds speculative rounds (at the start, and again after every back-off: a single probe
    round says little), when the speculative rate falls below margin / step_seconds the sequence takes
    `backoff` plain steps; the back-off doubles (up to max_backoff) while speculation keeps losing and
    resets once it wins again, so a sequence where it never pays probes with min_rounds speculative
    rounds per max_backoff plain steps. The margin below 1 keeps a sequence near break-even (where
    either choice costs the same) speculating.
    """

    margin: float = 0.95
    min_rounds: int = 6       # speculative rounds measured (at the start, and after each back-off) before judging
    min_backoff: int = 4
    max_backoff: int = 64
    alpha: float = 0.2
    step_seconds: float | None = None
    round_tokens: float | None = None
    round_seconds: float | None = None
    plain_steps: int = 0
    _plain_left: int = field(default=0, repr=False)
    _backoff: int = field(default=0, repr=False)
    _rounds_since: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.min_rounds < 1 or not 1 <= self.min_backoff <= self.max_backoff:
            raise ValueError("need 1 <= min_backoff <= max_backoff")
        if not 0.0 < self.alpha <= 1.0 or self.margin <= 0:
            raise ValueError("need 0 < alpha <= 1 and margin > 0")
        self._backoff = self.min_backoff

    def speculate(self) -> bool:
        return self.step_seconds is not None and self._plain_left == 0

    def record_step(self, seconds: float) -> None:
        self.plain_steps += 1
        self.step_seconds = seconds if self.step_seconds is None else \
            (1 - self.alpha) * self.step_seconds + self.alpha * seconds
        if self._plain_left:
            self._plain_left -= 1

    @property
    def round_rate(self) -> float | None:
        return None if self.round_tokens is None else self.round_tokens / max(self.round_seconds, 1e-9)

    def record_round(self, tokens: int, seconds: float) -> None:
        if self.round_tokens is None:
            self.round_tokens, self.round_seconds = float(tokens), seconds
        else:
            self.round_tokens = (1 - self.alpha) * self.round_tokens + self.alpha * tokens
            self.round_seconds = (1 - self.alpha) * self.round_seconds + self.alpha * seconds
        self._rounds_since += 1
        if self._rounds_since < self.min_rounds:
            return   # one round says little: emitted tokens vary 1..7 from round to round
        if self.step_seconds is not None and self.round_rate * self.step_seconds < self.margin:
            self._rounds_since = 0
            self._plain_left = self._backoff
            self._backoff = min(2 * self._backoff, self.max_backoff)
        else:
            self._backoff = self.min_backoff
