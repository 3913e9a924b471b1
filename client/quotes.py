"""The last known price of each symbol on this device, kept in the replica file.

An app started offline shows the last prices it saw, with their age and freshness level, instead
of nothing. Prices are not CRDT data (they churn and have one source of truth, the relay); they
live in their own table of the replica and are overwritten, newest wins.

Each quote also keeps the last price of the previous session (``previous_close``), recorded when
the first price of a new session arrives, so that an app can show the day's change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from foliosync.sync.freshness import Freshness, format_duration, price_freshness
from foliosync.sync.market import NYSE, ExchangeCalendar
from foliosync.sync.prices import PricePoint
from foliosync.sync.validation import decimal_to_str

__all__ = ["Quote", "QuoteBook"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Quote:
    symbol: str
    price: Decimal
    time_ms: int
    seq: int
    previous_close: Decimal | None

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.time_ms / 1000, tz=UTC)

    @property
    def change(self) -> Decimal | None:
        """Change against the previous session's last price, when known."""
        return None if self.previous_close is None else self.price - self.previous_close

    def age(self, now: datetime | None = None) -> timedelta:
        """Wall-clock time since the price was taken (zero for a time ahead of ``now``).

        This is the age a person reads ("12 s ago"); the freshness level rests on the market
        time behind the price instead, so that a closing price stays current over a weekend.
        """
        return max((now or datetime.now(tz=UTC)) - self.time, timedelta())

    def describe_age(self, now: datetime | None = None) -> str:
        """How old the price is, for people: "just now", "12 s ago", "3 h 5 min ago"."""
        age = self.age(now)
        return "just now" if age < timedelta(seconds=1) else f"{format_duration(age)} ago"

    def freshness(
        self, now: datetime | None = None, calendar: ExchangeCalendar = NYSE
    ) -> Freshness:
        """Market-aware: a closing price stays current until the next open."""
        return price_freshness(self.time, now or datetime.now(tz=UTC), calendar)

    def to_json(self, now: datetime | None = None) -> dict[str, object]:
        now = now or datetime.now(tz=UTC)
        freshness = self.freshness(now)
        change = self.change
        return {
            "symbol": self.symbol,
            "price": decimal_to_str(self.price),
            "time": self.time.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "change": None if change is None else decimal_to_str(change),
            "age_seconds": int(self.age(now).total_seconds()),
            "age": self.describe_age(now),
            "freshness": freshness.level.value,
            "freshness_reason": freshness.reason,
        }


class QuoteBook:
    """In-memory quotes backed by the replica's ``quotes`` table (see :mod:`.store`)."""

    def __init__(self, rows: Iterable[Quote], calendar: ExchangeCalendar = NYSE) -> None:
        self._quotes = {q.symbol: q for q in rows}
        self._calendar = calendar
        self._listeners: list[Callable[[list[Quote]], None]] = []

    def get(self, symbol: str) -> Quote | None:
        return self._quotes.get(symbol)

    def all(self) -> dict[str, Quote]:
        return dict(self._quotes)

    def merge(self, points: Iterable[PricePoint], *, snapshot: bool = False) -> list[Quote]:
        """Fold relay prices in; returns the quotes that changed (older prices are ignored)."""
        changed: list[Quote] = []
        for point in points:
            current = self._quotes.get(point.symbol)
            if current is not None and point.time_ms < current.time_ms:
                continue
            if (
                current is not None
                and not snapshot
                and point.time_ms == current.time_ms
                and point.price == current.price
            ):
                continue
            previous_close = current.previous_close if current is not None else None
            if current is not None and self._new_session(current.time_ms, point.time_ms):
                previous_close = current.price
            quote = Quote(point.symbol, point.price, point.time_ms, point.seq, previous_close)
            self._quotes[point.symbol] = quote
            changed.append(quote)
        return changed

    def _new_session(self, before_ms: int, after_ms: int) -> bool:
        """Whether a session opened between the two times (the earlier price was a close)."""
        before = datetime.fromtimestamp(before_ms / 1000, tz=UTC)
        after = datetime.fromtimestamp(after_ms / 1000, tz=UTC)
        try:
            return self._calendar.next_open(before) <= after
        except Exception:  # a calendar outside its years: no previous close rather than a crash
            return False

    def subscribe(self, listener: Callable[[list[Quote]], None]) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    def notify(self, quotes: list[Quote]) -> None:
        for listener in list(self._listeners):
            try:
                listener(quotes)
            except Exception:
                log.exception("price listener failed")
