"""How current a price or a document is, as one of four levels an app can show at a glance.

Every price and every synced document carries a :class:`Freshness`: a level, the age behind it
and a short reason a person can read. The levels are cut by :class:`FreshnessThresholds`, each
inclusive: an age of exactly one minute is still LIVE under the defaults.

Prices are aged in *market time*
================================

A price's age is the time the exchange was open since the price was taken
(:meth:`ExchangeCalendar.open_time_between`), not the wall-clock time since. Nothing trades while
the exchange is shut, so a price cannot fall behind then:

* a Friday 15:59:30 price seen on Saturday is 30 s old (LIVE, "closing price, market closed until
  Mon ... 09:30"), because it is the latest price that exists;
* a Thursday price seen on Saturday has all of Friday's session behind it: OUTDATED;
* on Monday at 09:32 the Friday closing price is 2 min old: only two minutes of trading happened
  that it does not reflect. The rule deliberately has no special case for the opening: one
  rule, applied everywhere, is one rule an app and its users can predict.

A price taken after the close (an after-hours quote) is as current as the closing price. A price
time ahead of ``now`` (clock skew between a data feed and the device) counts as age zero. Prices
older than :data:`PRICE_LOOKBACK` in wall time are OUTDATED without consulting the calendar, and
their age is the wall-clock age; past a month the distinction has stopped mattering.

Documents are aged in wall time
===============================

A document's age is the time since the client last confirmed it in sync with the relay: other
devices edit around the clock, whatever the exchange does. Its level says how recent our view of
other devices' edits is; ``pending`` says how many of our own edits the others have not seen yet.
The two are kept apart because they call for different actions (reconnect vs. wait).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from foliosync.sync.errors import ConfigError, ValidationError
from foliosync.sync.market import NYSE, ExchangeCalendar, require_aware

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PRICE_LOOKBACK",
    "Freshness",
    "FreshnessLevel",
    "FreshnessThresholds",
    "document_freshness",
    "format_duration",
    "price_freshness",
]

PRICE_LOOKBACK = timedelta(days=31)
_ZERO = timedelta()


class FreshnessLevel(StrEnum):
    LIVE = "live"
    FRESH = "fresh"
    STALE = "stale"
    OUTDATED = "outdated"


@dataclass(frozen=True, slots=True)
class FreshnessThresholds:
    """The oldest age, inclusive, that still earns each level; older than ``stale`` is OUTDATED."""

    live: timedelta = timedelta(minutes=1)
    fresh: timedelta = timedelta(minutes=5)
    stale: timedelta = timedelta(minutes=15)

    def __post_init__(self) -> None:
        for name in ("live", "fresh", "stale"):
            value = getattr(self, name)
            if not isinstance(value, timedelta):
                raise ConfigError(f"freshness threshold {name} must be a timedelta, not {value!r}")
            if value <= _ZERO:
                raise ConfigError(f"freshness threshold {name} must be positive, not {value}")
        if not self.live < self.fresh < self.stale:
            raise ConfigError(
                "freshness thresholds must increase (live < fresh < stale), got "
                f"live={self.live}, fresh={self.fresh}, stale={self.stale}"
            )

    def level_for(self, age: timedelta) -> FreshnessLevel:
        if age <= self.live:
            return FreshnessLevel.LIVE
        if age <= self.fresh:
            return FreshnessLevel.FRESH
        if age <= self.stale:
            return FreshnessLevel.STALE
        return FreshnessLevel.OUTDATED


DEFAULT_THRESHOLDS = FreshnessThresholds()


@dataclass(frozen=True, slots=True)
class Freshness:
    """A level with what it rests on.

    ``age`` is None only for a document that was never synced: there is no age to give, and a
    made-up one (zero, or "infinite") would read as a fact.
    """

    level: FreshnessLevel
    age: timedelta | None
    reason: str
    pending: int = 0

    def describe(self) -> str:
        """One line for a status bar, e.g. "fresh — synced 2 min ago, 3 changes not yet synced"."""
        text = f"{self.level.value} — {self.reason}"
        if self.pending:
            noun = "change" if self.pending == 1 else "changes"
            text += f", {self.pending} {noun} not yet synced"
        return text


def format_duration(span: timedelta) -> str:
    """A duration rounded down to the unit a person cares about: "45 s", "3 min", "2 h 5 min"."""
    seconds = max(int(span.total_seconds()), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _ago(age: timedelta) -> str:
    return "just now" if age < timedelta(seconds=1) else f"{format_duration(age)} ago"


def _format_local(t: datetime) -> str:
    return f"{t:%a %Y-%m-%d %H:%M %Z}"


def price_freshness(
    price_time: datetime,
    now: datetime,
    calendar: ExchangeCalendar = NYSE,
    thresholds: FreshnessThresholds = DEFAULT_THRESHOLDS,
) -> Freshness:
    """The freshness of a price taken at ``price_time``, seen at ``now`` (see the module rule)."""
    require_aware(price_time, "price time")
    require_aware(now, "now")
    wall_age = max(now - price_time, _ZERO)
    if wall_age > PRICE_LOOKBACK:
        when = calendar.local_date(price_time)
        return Freshness(FreshnessLevel.OUTDATED, wall_age, f"price from {when.isoformat()}")

    age = calendar.open_time_between(price_time, now)
    level = thresholds.level_for(age)
    current = calendar.session_at(now)
    if current is not None:
        if price_time >= current.open:
            reason = f"updated {_ago(age)}"
        else:
            reason = f"price from before today's open, {format_duration(age)} of trading since"
        return Freshness(level, age, reason)

    until = f"market closed until {_format_local(calendar.next_open(now))}"
    last = calendar.last_session(now)
    if price_time >= last.close:
        reason = f"closing price, {until}"
    elif price_time >= last.open:
        reason = f"last price {format_duration(age)} before the close, {until}"
    else:
        reason = f"{format_duration(age)} of trading since this price, {until}"
    return Freshness(level, age, reason)


def document_freshness(
    last_synced_at: datetime | None,
    now: datetime,
    pending: int,
    thresholds: FreshnessThresholds = DEFAULT_THRESHOLDS,
) -> Freshness:
    """The freshness of a document last confirmed in sync with the relay at ``last_synced_at``."""
    require_aware(now, "now")
    if isinstance(pending, bool) or not isinstance(pending, int) or pending < 0:
        raise ValidationError(f"pending must be a count of changes (an int >= 0), not {pending!r}")
    if last_synced_at is None:
        return Freshness(FreshnessLevel.OUTDATED, None, "never synced", pending)
    require_aware(last_synced_at, "last synced time")
    age = max(now - last_synced_at, _ZERO)
    return Freshness(thresholds.level_for(age), age, f"synced {_ago(age)}", pending)
