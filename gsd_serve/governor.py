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
    round_rate: moving average of tokens per second of speculative rounds (draft + verify).
    A speculative round whose average rate falls below margin / step_seconds sends the sequence back to
    plain steps for `backoff` steps; the back-off doubles (up to max_backoff) while speculation keeps
    losing and resets once it wins again, so a sequence where it never pays spends ~1/max_backoff of its
    rounds probing.
    """

    margin: float = 1.0
    min_backoff: int = 4
    max_backoff: int = 64
    alpha: float = 0.5
    step_seconds: float | None = None
    round_rate: float | None = None
    plain_steps: int = 0
    _plain_left: int = field(default=0, repr=False)
    _backoff: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_backoff <= self.max_backoff:
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

    def record_round(self, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-9)
        self.round_rate = rate if self.round_rate is None else (1 - self.alpha) * self.round_rate + self.alpha * rate
        if self.step_seconds is not None and self.round_rate * self.step_seconds < self.margin:
            self._plain_left = self._backoff
            self._backoff = min(2 * self._backoff, self.max_backoff)
        else:
            self._backoff = self.min_backoff
