"""Hybrid logical clock stamps for "the later edit wins".

pycrdt resolves concurrent writes to one map key by client id, not by time, so an offline
device's older correction could beat a newer one. Values that must resolve by time therefore carry
a stamp, and readers pick the highest. A stamp is fixed-width text (sortable as a string, and safe
from pycrdt's float64 numbers): 13 hex digits of milliseconds since the epoch and 4 of a counter.
Stamps from one clock strictly increase even if the wall clock steps back, and :meth:`after`
guarantees an edit made after seeing a value gets a higher stamp than that value.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["HybridClock", "stamp_millis", "wall_ms"]

_MS_DIGITS = 13
_COUNTER_DIGITS = 4
_COUNTER_MAX = 16**_COUNTER_DIGITS - 1


def wall_ms() -> int:
    """Milliseconds since the epoch by the wall clock: the time unit of stamps, ticks and
    watermarks everywhere in foliosync."""
    return time.time_ns() // 1_000_000


def _format(ms: int, counter: int) -> str:
    return f"{ms:0{_MS_DIGITS}x}{counter:0{_COUNTER_DIGITS}x}"


def _parse(stamp: str) -> tuple[int, int]:
    return int(stamp[:_MS_DIGITS], 16), int(stamp[_MS_DIGITS:], 16)


def stamp_millis(stamp: str) -> int:
    """Milliseconds since the epoch of a stamp."""
    return _parse(stamp)[0]


class HybridClock:
    """Issues strictly increasing stamps close to the wall clock."""

    def __init__(self, wall_ms: Callable[[], int] = wall_ms) -> None:
        self._wall_ms = wall_ms
        self._last = (0, 0)

    def now(self) -> str:
        return self.after(None)

    def observe(self, seen: str) -> None:
        """Remember a stamp read from a document: every stamp issued later will be higher.

        This is the receive rule of a hybrid logical clock. Without it, a device whose wall clock
        lags would stamp an edit made after reading a value *below* that value, and the edit it
        just made would lose to what it saw.
        """
        try:
            parsed = _parse(seen)
        except (TypeError, ValueError):
            return
        if parsed > self._last:
            self._last = parsed

    def after(self, seen: str | None) -> str:
        """A new stamp, higher than every stamp issued before and than ``seen``."""
        floor = max(self._last, _parse(seen)) if seen else self._last
        wall = self._wall_ms()
        if wall > floor[0]:
            current = (wall, 0)
        elif floor[1] < _COUNTER_MAX:
            current = (floor[0], floor[1] + 1)
        else:
            current = (floor[0] + 1, 0)
        self._last = current
        return _format(*current)
