"""What a forward costs here, learned from the forwards this process runs.

`ForwardCosts.seconds(n)` predicts the wall time of a model forward over n new rows (one decoding step: 1;
a verification tree: its nodes; several sessions fused: all their rows). It starts from a seed curve (a
table measured once on this CPU and remembered, or a default shape) and is corrected by every forward
that is timed: the median of the latest times at each observed size, divided by the seed at that size,
scales the seed near there. A stale table (measured on a busy machine, another thread count, a CPU that
has since slowed) is thus corrected by the first few forwards instead of steering every later round.
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections import deque

# the shape assumed when no table was measured: every extra row costs this fraction of a one-row forward
# (on 2-core CPUs measured 0.24 (Zen 3, GGUF blocks) to 0.35 (Zen 4); on GPUs far less)
DEFAULT_ROW_SLOPE = 0.3


class ForwardCosts:
    """Seconds of a forward over n rows: a seed curve scaled by what was measured at nearby sizes."""

    def __init__(self, seed: tuple[list[int], list[float]] | None = None, first: float = 0.01,
                 window: int = 24):
        if seed is not None:
            sizes, seconds = list(seed[0]), list(seed[1])
            if len(sizes) != len(seconds) or not sizes or sorted(sizes) != sizes or min(seconds) <= 0:
                raise ValueError("a cost seed is increasing sizes with positive seconds")
            for i in range(1, len(seconds)):     # more rows never cost less: a dip is timing noise
                seconds[i] = max(seconds[i], seconds[i - 1])
            self._sizes, self._seconds = sizes, seconds
        else:
            self._sizes, self._seconds = [1, 64], [first, first * (1 + DEFAULT_ROW_SLOPE * 63)]
        self.window = window
        self._seen: dict[int, deque[float]] = {}
        self._ratio: dict[int, float] = {}       # median measured / seed, per observed size
        self._keys: list[int] = []               # observed sizes, sorted
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
        seen = self._seen.get(n)
        if seen is None:
            seen = self._seen[n] = deque(maxlen=self.window)
            bisect.insort(self._keys, n)
        seen.append(seconds)
        self._ratio[n] = statistics.median(seen) / self.seed(n)
        self.observed += 1

    def ratio(self, n: int) -> float:
        """measured / seed near n: interpolated (in n) between the nearest observed sizes, the nearest one's
        beyond them, 1 where nothing was observed."""
        keys = self._keys
        if not keys:
            return 1.0
        i = bisect.bisect_left(keys, n)
        if i < len(keys) and keys[i] == n:
            return self._ratio[n]
        if i == 0:
            return self._ratio[keys[0]]
        if i == len(keys):
            return self._ratio[keys[-1]]
        a, b = keys[i - 1], keys[i]
        w = (n - a) / (b - a)
        return self._ratio[a] * (1 - w) + self._ratio[b] * w

    def seconds(self, n: int) -> float:
        return self.seed(n) * self.ratio(n)

    def table(self, sizes=(1, 2, 4, 8, 16, 32)) -> dict[int, float]:
        """Predicted seconds at a few sizes (for reports)."""
        return {n: round(self.seconds(n), 6) for n in sizes}
