"""What a forward costs here, learned from the forwards this process runs.

`ForwardCosts.seconds(n, keys)` predicts the wall time of a model forward over n new rows (one decoding step: 1;
a verification tree: its nodes; several sessions fused: all their rows) that attend to about `keys` cached
tokens each. Every row reads the whole context, so on a CPU a row of a 1,500-token summary costs two to three
times one of a 150-token chat: one curve over rows alone, learned on short contexts, would price a long
context's extra rows as nearly free. So each range of context lengths (a doubling, from CONTEXT_BUCKET up) has
its own curve, `RowCosts`, learned from the forwards run at those lengths; a range not yet measured borrows
the curve of the nearest measured one.

A `RowCosts` curve starts from a seed (a table measured once on this CPU and remembered, or a default shape)
and every timed forward corrects it:

    seconds(n) = seed(n) x ratio(n)

- At sizes measured at least three times lately, ratio(n) is the median of their measured / seed,
  interpolated between such sizes: it corrects the seed where the planner actually verifies.
- Elsewhere it is `scale`, the median of measured / seed over the latest forwards of every size: it follows
  the machine's speed as it drifts (these VMs move 15-25% within minutes) and corrects a stale seed at once.
- ratio(n) stays within [scale / 2, 2 x scale], and samples grow stale after `memory` forwards: a size
  measured during a burst of load (a neighbour stealing the CPU) and not chosen since goes back to the seed's
  shape, so the planner tries it again instead of avoiding it for good.
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections import deque

# the shape assumed when no table was measured: every extra row costs this fraction of a one-row forward
# (on 2-core CPUs measured 0.24 (Zen 3, GGUF blocks) to 0.35 (Zen 4); on GPUs far less)
DEFAULT_ROW_SLOPE = 0.3
SHAPE_BOUNDS = (0.5, 2.0)
MIN_SHAPE_SAMPLES = 3


CONTEXT_BUCKET = 256     # contexts shorter than this share one curve; above, one curve per doubling
MIN_CURVE_FORWARDS = 8   # forwards measured in a context range before its own curve is trusted


def context_bucket(keys: int) -> int:
    """0 for contexts under CONTEXT_BUCKET tokens, then one more per doubling."""
    b = 0
    while keys >= CONTEXT_BUCKET << b:
        b += 1
    return b


class ForwardCosts:
    """Seconds of a forward over n rows attending to `keys` cached tokens: one RowCosts curve per range of
    context lengths (context_bucket), all started from the same seed."""

    def __init__(self, seed: tuple[list[int], list[float]] | None = None, first: float = 0.01, **curve):
        self._make = lambda: RowCosts(seed, first, **curve)
        self._curves: dict[int, RowCosts] = {0: self._make()}
        self._last = 0
        self.observed = 0

    def _curve(self, keys: int) -> "RowCosts":
        """The curve of `keys`'s range, or, until that range has MIN_CURVE_FORWARDS, the nearest one that has
        (the longer of two equally near: it overestimates rather than underestimates a row)."""
        b = context_bucket(keys)
        own = self._curves.get(b)
        if own is not None and own.observed >= MIN_CURVE_FORWARDS:
            return own
        trained = [c for c in self._curves if self._curves[c].observed >= MIN_CURVE_FORWARDS]
        if not trained:
            return own if own is not None else self._curves[0]
        return self._curves[min(trained, key=lambda c: (abs(c - b), -c))]

    def observe(self, n: int, seconds: float, keys: int = 0) -> None:
        """A forward over n rows, attending to about `keys` cached tokens each, took `seconds`."""
        b = context_bucket(keys)
        if b not in self._curves:
            self._curves[b] = self._make()
        self._curves[b].observe(n, seconds)
        self._last = b
        self.observed += 1

    def seconds(self, n: int, keys: int = 0) -> float:
        return self._curve(keys).seconds(n)

    def seed(self, n: int) -> float:
        return self._curves[0].seed(n)

    def table(self, sizes=(1, 2, 4, 8, 16, 32), keys: int | None = None) -> dict[int, float]:
        """Predicted seconds at a few sizes (for reports), at `keys` (default: the context last measured)."""
        curve = self._curve(CONTEXT_BUCKET << self._last >> 1 if keys is None else keys)
        return curve.table(sizes)


class RowCosts:
    """Seconds of a forward over n rows at one range of context lengths: a seed curve scaled by what was
    measured."""

    def __init__(self, seed: tuple[list[int], list[float]] | None = None, first: float = 0.01,
                 window: int = 64, size_window: int = 16, memory: int = 2000):
        if seed is not None:
            sizes, seconds = list(seed[0]), list(seed[1])
            if len(sizes) != len(seconds) or not sizes or sorted(sizes) != sizes or min(seconds) <= 0:
                raise ValueError("a cost seed is increasing sizes with positive seconds")
            for i in range(1, len(seconds)):     # more rows never cost less: a dip is timing noise
                seconds[i] = max(seconds[i], seconds[i - 1])
            self._sizes, self._seconds = sizes, seconds
        else:
            self._sizes, self._seconds = [1, 64], [first, first * (1 + DEFAULT_ROW_SLOPE * 63)]
        self.memory = memory
        self._ratios: deque[float] = deque(maxlen=window)     # measured / seed, every size
        self._scale = 1.0
        self._by_size: dict[int, deque[tuple[int, float]]] = {}  # size -> (when, measured / seed)
        self._size_window = size_window
        self._known: list[tuple[int, float]] | None = None    # (size, ratio) where measured enough: a cache
        self.observed = 0

    def seed(self, n: int) -> float:
        """The seed curve: linear between its sizes, extended with its last slope beyond them."""
        sizes, seconds = self._sizes, self._seconds
        if n <= sizes[0]:
            return seconds[0]
        if len(sizes) == 1:
            return seconds[0] * (1 + DEFAULT_ROW_SLOPE * (n - sizes[0]))
        i = bisect.bisect_left(sizes, n)
        if i < len(sizes):
            a, b = sizes[i - 1], sizes[i]
            return seconds[i - 1] + (seconds[i] - seconds[i - 1]) * (n - a) / (b - a)
        a, b = sizes[-2], sizes[-1]
        return seconds[-1] + (seconds[-1] - seconds[-2]) * (n - b) / (b - a)

    def observe(self, n: int, seconds: float) -> None:
        """A forward over n rows took `seconds`."""
        if n < 1 or not seconds > 0 or not math.isfinite(seconds):
            return
        ratio = seconds / self.seed(n)
        self._ratios.append(ratio)
        self._scale = statistics.median(self._ratios)
        self.observed += 1
        seen = self._by_size.get(n)
        if seen is None:
            seen = self._by_size[n] = deque(maxlen=self._size_window)
        seen.append((self.observed, ratio))
        self._known = None

    @property
    def scale(self) -> float:
        return self._scale

    def _measured(self) -> list[tuple[int, float]]:
        """(size, ratio) where measured often enough lately (a cache, refreshed by each observation)."""
        if self._known is None:
            fresh = self.observed - self.memory
            lo, hi = SHAPE_BOUNDS[0] * self._scale, SHAPE_BOUNDS[1] * self._scale
            known = []
            for size, samples in self._by_size.items():
                recent = [r for when, r in samples if when > fresh]
                if len(recent) >= MIN_SHAPE_SAMPLES:
                    known.append((size, min(max(statistics.median(recent), lo), hi)))
            self._known = sorted(known)
        return self._known

    def ratio(self, n: int) -> float:
        """measured / seed near n."""
        known = self._measured()
        if not known:
            return self._scale
        sizes = [s for s, _ in known]
        i = bisect.bisect_left(sizes, n)
        if i < len(sizes) and sizes[i] == n:
            return known[i][1]
        if i == 0:
            return known[0][1]
        if i == len(sizes):
            return known[-1][1]
        (a, ra), (b, rb) = known[i - 1], known[i]
        w = (n - a) / (b - a)
        return ra * (1 - w) + rb * w

    def seconds(self, n: int) -> float:
        return self.seed(n) * self.ratio(n)

    def table(self, sizes=(1, 2, 4, 8, 16, 32)) -> dict[int, float]:
        """Predicted seconds at a few sizes (for reports)."""
        return {n: round(self.seconds(n), 6) for n in sizes}
