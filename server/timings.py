"""Durations counted in plain ints, for the relay's hot paths.

A prometheus-client ``Histogram.observe`` takes a lock and walks its buckets through several
method calls; on paths that run per update or per price flush that cost shows in the fan-out
benchmark. :class:`Timings` keeps the same buckets as a list of ints and a float sum; the
metrics collector (:mod:`foliosync.server.metrics`) exports it as a histogram at scrape time.
Everything runs in the relay's event loop, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

__all__ = ["DEFAULT_BUCKETS", "Timings"]

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds in seconds, from half a millisecond (an update stored in a WAL group commit) to
ten seconds (a price that waited out a long push window)."""


class Timings:
    """Observed durations by bucket: ``counts[i]`` holds those at most ``bounds[i]`` and above
    ``bounds[i - 1]``; the last count holds those above every bound."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        ordered = tuple(float(b) for b in bounds)
        if not ordered or list(ordered) != sorted(set(ordered)):
            raise ValueError("bucket bounds must be distinct and increasing")
        self.bounds = ordered
        self.counts = [0] * (len(ordered) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count at most le)`` pairs as Prometheus wants them, ``+Inf`` last."""
        pairs: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs
