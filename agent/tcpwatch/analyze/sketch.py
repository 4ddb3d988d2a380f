"""Bounded aggregates for streaming analysis: memory does not grow with the log's length.

`Durations` is a log-linear histogram (HDR-style): each power of two is cut into SUB = 32
equal sub-buckets, so a quantile is the midpoint of the bucket holding it and is off by at
most 1/(2*SUB) = 1.6 % of the true value (count and max are exact). It holds
at most SUB counters per power of two actually seen (1 us .. 1 day is 37 of them).

>>> d = Durations()
>>> for x in (0.001, 0.002, 0.003, 0.004, 10.0): d.add(x)
>>> round(d.quantile(0.5), 4), d.max, d.n
(0.003, 10.0, 5)

`Timeline` keeps the largest number of sockets in CLOSE_WAIT per time bin (counting the level
carried into the bin), with at most
MAX_BINS bins: when the log runs past them, neighbouring bins merge and the bin width doubles.

>>> t = Timeline(start=100.0)
>>> t.set(100.5, 1); t.set(101.2, 2); t.set(103.0, 0); t.finish(104.0)
>>> t.bin_s, t.bins
(1.0, [1, 2, 2, 2, 0])
"""

from __future__ import annotations

import math

SUB = 32
MAX_BINS = 512


def bucket(x: float) -> int | None:
    """The Durations bucket of x > 0 (None for 0): bucket(1.0) == 32, bucket(0.75) == 16."""
    if x <= 0:
        return None
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= m < 1
    return e * SUB + int((m - 0.5) * 2 * SUB)


class Durations:
    """Seconds -> counts in log-linear buckets; exact count and max."""

    __slots__ = ("counts", "n", "max", "zeros")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.max = 0.0
        self.zeros = 0  # durations of 0 (below the clock's resolution)

    def add(self, x: float) -> None:
        """Count x (seconds)."""
        self.n += 1
        if x > self.max:
            self.max = x
        if x <= 0:
            self.zeros += 1
            return
        m, e = math.frexp(x)  # as bucket(x), inlined: called once per socket
        key = e * SUB + int((m - 0.5) * 2 * SUB)
        self.counts[key] = self.counts.get(key, 0) + 1

    def merge(self, other: Durations) -> None:
        """Add another sketch's counts (same bucket layout, so nothing is lost)."""
        counts = self.counts
        for key, c in other.counts.items():
            counts[key] = counts.get(key, 0) + c
        self.n += other.n
        self.zeros += other.zeros
        self.max = max(self.max, other.max)

    @staticmethod
    def bounds(key: int) -> tuple[float, float]:
        """[low, high) of a bucket: bounds(0) == (0.5, 0.515625)."""
        e, s = divmod(key, SUB)
        width = math.ldexp(1.0, e) / (2 * SUB)
        low = math.ldexp(0.5, e) + s * width
        return low, low + width

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1), None when empty; within 1.6 % of the exact value."""
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = self.zeros
        if seen >= rank:
            return 0.0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                low, high = self.bounds(key)
                return min((low + high) / 2, self.max)
        return self.max

    def log2_buckets(self) -> list[tuple[float, float, int]]:
        """(low, high, count) per power of two of seconds, from the lowest to the highest
        non-empty one (empty ones in between included); 0 durations count in the first."""
        by_exp: dict[int, int] = {}
        for key, count in self.counts.items():
            e = key // SUB
            by_exp[e] = by_exp.get(e, 0) + count
        if not by_exp:
            return [(0.0, 0.0, self.zeros)] if self.zeros else []
        lo, hi = min(by_exp), max(by_exp)
        out = [
            (math.ldexp(0.5, e), math.ldexp(1.0, e), by_exp.get(e, 0)) for e in range(lo, hi + 1)
        ]
        if self.zeros:
            low, high, count = out[0]
            out[0] = (0.0, high, count + self.zeros)
        return out


class Timeline:
    """Max level (sockets in CLOSE_WAIT) per bin from `start`; set() as the level changes."""

    __slots__ = ("start", "bin_s", "bins", "level")

    def __init__(self, start: float, bin_s: float = 1.0, level: int = 0) -> None:
        self.start = start
        self.bin_s = bin_s
        self.bins: list[int] = [level]
        self.level = level

    def _index(self, t: float) -> int:
        i = int((t - self.start) // self.bin_s)
        while i >= MAX_BINS:
            self._halve()
            i = int((t - self.start) // self.bin_s)
        return max(i, 0)

    def _halve(self) -> None:
        b = self.bins
        self.bins = [max(b[i : i + 2]) for i in range(0, len(b), 2)]
        self.bin_s *= 2

    def set(self, t: float, level: int) -> None:
        """The level is `level` from time t on (slightly out-of-order times are fine;
        times before `start` only set the level carried into the first bin)."""
        bins = self.bins
        i = int((t - self.start) // self.bin_s)
        if i == len(bins) - 1:  # the usual case: still in the last bin
            if level > bins[i]:
                bins[i] = level
            self.level = level
            return
        if i < 0:  # before the window
            self.level = level
            if len(bins) == 1 and bins[0] < level:
                bins[0] = level  # carried into the first bin
            return
        i = self._index(t)
        bins = self.bins
        if i >= len(bins):
            bins.extend([self.level] * (i + 1 - len(bins)))
        if level > bins[i]:
            bins[i] = level
        self.level = level

    def finish(self, t: float) -> None:
        """Extend the timeline to time t at the current level."""
        i = self._index(t)
        if i >= len(self.bins):
            self.bins.extend([self.level] * (i + 1 - len(self.bins)))
