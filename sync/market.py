"""When an exchange's regular session is open.

Freshness and refresh decisions hinge on one question: is the market trading right now, and if
not, since when and until when? A price unchanged since Friday's close is perfectly current on
Saturday, and polling every minute on a holiday only drains a battery. Only the regular session
is modelled: the price an app shows as "the" price, and the closing price, come from it; pre-market
and after-hours quotes are thin and are not what a portfolio is valued at.

An :class:`ExchangeCalendar` needs one thing from a concrete exchange, its ``session`` for a
date; everything else (``is_open``, ``next_open`` ...) is derived from it, so a
second exchange is one small subclass. Every method that takes a datetime refuses a naive one: a
wall-clock time without a zone is ambiguous by hours, which is exactly the error a market calendar
exists to prevent. Times returned are in the exchange's own zone.

The NYSE calendar (:data:`NYSE`):

* regular session 09:30-16:00 America/New_York on weekdays that are not exchange holidays;
* full-day closures come from the ``holidays`` package (NYSE rule 51, observed days, one-off
  closures such as days of mourning), united with :data:`ONE_OFF_CLOSURES`, a table kept here
  because the package is required only from 0.60 on, and a release cannot list a closure
  announced after it (the 2025-01-09 day of mourning was announced at the turn of the year);
  a day in both sources is simply closed once;
* early closes at 13:00 are derived from their rules rather than from the package, because they
  are part of the session hours this module owns: the day after Thanksgiving, December 24 and
  July 3, each when it is a trading day. That is the whole rule: when July 4 falls on a Saturday
  the exchange closes on Friday July 3 and does not shorten Thursday July 2 (2015, 2020, 2026);
  when it falls on a Sunday or a Monday, July 3 is a weekend day and nothing is shortened.
  December 24 behaves the same way around Christmas;
* modelled from 2004 on: before that the exchange had irregular early closes (e.g. 2003-12-26)
  that no rule captures, and a wrong answer is worse than an error. Future one-off closures cannot
  be known in advance; ``NYSECalendar(extra_closures=...)`` lets an app add one the day it is
  announced, without waiting for a release.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

import holidays

from foliosync.sync.errors import ConfigError, ValidationError

__all__ = [
    "NYSE",
    "NYSE_TIMEZONE",
    "ONE_OFF_CLOSURES",
    "ExchangeCalendar",
    "NYSECalendar",
    "Session",
    "require_aware",
]

NYSE_TIMEZONE = ZoneInfo("America/New_York")

#: Unscheduled full-day NYSE closures, kept even where ``holidays`` lists them too (see above).
ONE_OFF_CLOSURES: frozenset[date] = frozenset(
    {
        date(2004, 6, 11),  # national day of mourning, President Reagan
        date(2007, 1, 2),  # national day of mourning, President Ford
        date(2012, 10, 29),  # Hurricane Sandy
        date(2012, 10, 30),  # Hurricane Sandy
        date(2018, 12, 5),  # national day of mourning, President George H. W. Bush
        date(2025, 1, 9),  # national day of mourning, President Carter
    }
)

# Longer than any closure since the exchange adopted today's rules (the longest, in 2001, kept it
# shut for four weekdays); a calendar without a session in this span is misconfigured.
_MAX_GAP_DAYS = 31
_ONE_DAY = timedelta(days=1)


def require_aware(t: datetime, what: str = "time") -> datetime:
    """Return ``t`` if it carries a UTC offset; raise :class:`ValidationError` otherwise.

    Shared by the freshness and refresh modules so that every entry point rejects naive
    datetimes with the same message.
    """
    if not isinstance(t, datetime):
        raise ValidationError(f"{what} must be a datetime, not {type(t).__name__}")
    if t.tzinfo is None or t.tzinfo.utcoffset(t) is None:
        raise ValidationError(
            f"{what} {t.isoformat()} has no time zone; pass an aware datetime "
            "(e.g. datetime.now(timezone.utc))"
        )
    return t


@dataclass(frozen=True, slots=True)
class Session:
    """One regular trading session: open from ``open`` (inclusive) to ``close`` (exclusive).

    Half-open, so that the closing instant itself is "closed": the closing auction's price is
    stamped at the close and is the session's last word, not a live quote.
    """

    open: datetime
    close: datetime

    def __post_init__(self) -> None:
        require_aware(self.open, "session open")
        require_aware(self.close, "session close")
        if not self.open < self.close:
            raise ValidationError(f"session opens at {self.open} but closes at {self.close}")

    @property
    def duration(self) -> timedelta:
        return self.close - self.open

    def contains(self, t: datetime) -> bool:
        return self.open <= require_aware(t) < self.close


class ExchangeCalendar(ABC):
    """An exchange's trading calendar, derived from one method: :meth:`session`.

    Subclasses set ``name``, ``timezone``, ``first_day`` and ``last_day`` (the span of dates
    they model) and implement :meth:`session`; it should be cheap, since :meth:`is_open` runs on
    every price tick.
    """

    name: str
    timezone: tzinfo
    first_day: date
    last_day: date

    @abstractmethod
    def session(self, d: date) -> Session | None:
        """The regular session on ``d`` (a date in the exchange's zone), or None if closed."""

    def is_trading_day(self, d: date) -> bool:
        return self.session(d) is not None

    def local_date(self, t: datetime) -> date:
        """The exchange's calendar date at instant ``t``."""
        return self._local(t).date()

    def is_open(self, t: datetime) -> bool:
        local = self._local(t)
        s = self.session(local.date())
        return s is not None and s.open <= local < s.close

    def session_at(self, t: datetime) -> Session | None:
        """The session in progress at ``t``, or None while the market is closed."""
        local = self._local(t)
        s = self.session(local.date())
        return s if s is not None and s.open <= local < s.close else None

    def next_session(self, t: datetime) -> Session:
        """The first session that opens strictly after ``t``.

        Strictly: while a session is in progress, the next one is tomorrow's, not the current.
        """
        local = self._local(t)
        for d in self._days_from(local.date(), +1):
            s = self.session(d)
            if s is not None and s.open > local:
                return s
        raise self._no_session(t)

    def last_session(self, t: datetime) -> Session:
        """The most recent session that had closed at or before ``t``."""
        local = self._local(t)
        for d in self._days_from(local.date(), -1):
            s = self.session(d)
            if s is not None and s.close <= local:
                return s
        raise self._no_session(t)

    def next_open(self, t: datetime) -> datetime:
        """The next opening after ``t``; while open, that is the next session's opening."""
        return self.next_session(t).open

    def next_close(self, t: datetime) -> datetime:
        """The close of the session in progress, or of the next session while closed."""
        current = self.session_at(t)
        return current.close if current is not None else self.next_session(t).close

    def last_close(self, t: datetime) -> datetime:
        """The most recent close at or before ``t`` (``t`` itself at the closing instant)."""
        return self.last_session(t).close

    def open_time_between(self, start: datetime, end: datetime) -> timedelta:
        """How long the market was open between two instants (zero if ``end <= start``).

        This is how far a price can fall behind: nothing trades while the exchange is shut.
        The cost is one :meth:`session` call per calendar day in the span.
        """
        start, end = self._local(start), self._local(end)
        total = timedelta()
        if end <= start:
            return total
        d, last = start.date(), end.date()
        while d <= last:
            s = self.session(d)
            if s is not None:
                overlap = min(end, s.close) - max(start, s.open)
                if overlap > timedelta():
                    total += overlap
            d += _ONE_DAY
        return total

    def _local(self, t: datetime) -> datetime:
        return require_aware(t).astimezone(self.timezone)

    @staticmethod
    def _days_from(d: date, step: int) -> Iterable[date]:
        # One day more than the longest gap: the starting day may be a session already past.
        for _ in range(_MAX_GAP_DAYS + 2):
            yield d
            d += step * _ONE_DAY

    def _no_session(self, t: datetime) -> ConfigError:
        return ConfigError(
            f"{self.name} calendar has no session within {_MAX_GAP_DAYS} days of {t.isoformat()}"
        )

    def _check_date(self, d: date) -> None:
        # datetime is a subclass of date; taking its date part silently would ignore its zone.
        if isinstance(d, datetime) or not isinstance(d, date):
            raise ValidationError(
                f"expected a date, got {type(d).__name__}; use local_date(t) for an instant"
            )
        if not self.first_day <= d <= self.last_day:
            raise ValidationError(
                f"{self.name} sessions are modelled from {self.first_day} to {self.last_day}; "
                f"{d} is outside that span"
            )


@functools.lru_cache(maxsize=128)
def _nyse_package_closures(year: int) -> frozenset[date]:
    return frozenset(holidays.financial_holidays("NYSE", years=year).keys())


def _is_nyse_early_close(d: date) -> bool:
    """Whether ``d``, a trading day, closes at 13:00 (see the module docstring for the rule)."""
    if d.month == 7:
        return d.day == 3
    if d.month == 12:
        return d.day == 24
    # Thanksgiving is the fourth Thursday of November (22nd-28th), so the Friday after falls on
    # the 23rd-29th.
    return d.month == 11 and d.weekday() == 4 and 23 <= d.day <= 29


class NYSECalendar(ExchangeCalendar):
    """The New York Stock Exchange's regular sessions (see the module docstring)."""

    name = "NYSE"
    timezone = NYSE_TIMEZONE
    first_day = date(2004, 1, 1)
    last_day = date(2099, 12, 31)
    regular_open = time(9, 30)
    regular_close = time(16, 0)
    early_close = time(13, 0)

    def __init__(self, extra_closures: Iterable[date] = ()) -> None:
        extra = frozenset(extra_closures)
        for d in extra:
            if isinstance(d, datetime) or not isinstance(d, date):
                raise ConfigError(f"extra closure {d!r} is not a date")
        self._closures = ONE_OFF_CLOSURES | extra
        # Per instance, so that two calendars with different extra closures never share answers.
        self._cached_session = functools.lru_cache(maxsize=8192)(self._build_session)

    def session(self, d: date) -> Session | None:
        self._check_date(d)
        return self._cached_session(d)

    def is_early_close(self, d: date) -> bool:
        s = self.session(d)
        return s is not None and s.close.time() == self.early_close

    def _build_session(self, d: date) -> Session | None:
        if d.weekday() >= 5 or d in self._closures or d in _nyse_package_closures(d.year):
            return None
        close = self.early_close if _is_nyse_early_close(d) else self.regular_close
        return Session(
            open=datetime.combine(d, self.regular_open, tzinfo=self.timezone),
            close=datetime.combine(d, close, tzinfo=self.timezone),
        )


#: The calendar every market-aware function defaults to.
NYSE = NYSECalendar()
