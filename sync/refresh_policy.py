"""How often to refresh market data: one policy, written as data.

Two figures come out of the same :class:`RefreshPolicy`:

* :meth:`~RefreshPolicy.poll_interval` — for a client that has to poll over HTTP (no relay, or a
  data kind the relay does not push). Polling costs requests and battery, so it follows the
  market: fast while prices move, slow while the exchange is shut.
* :meth:`~RefreshPolicy.push_window` — how often the relay may send one subscriber the newest
  value of one item. A window only caps the rate (newer values replace unsent older ones), it never
  causes traffic, so the same figures suit every kind of data.

Each figure comes from a table of :class:`RefreshRule` rows, tried in order, first match wins; a
condition left as None matches anything. Keeping the rules as data means a product can ship its
own tables (a "battery saver" mode, a premium tier) without new code, and the table is readable as
the specification it is. A table is checked when the policy is built: every data kind needs a
fallback row (one with no conditions), and a row that an earlier row always wins over is
rejected, since it is certainly a mistake in the ordering.

Default poll table, for the current price: 30 s in a volatile session; 1 min on an event day
(earnings are mostly released before the open or after the close, so this row also beats the
closed-market one); 15 min while the market is closed; 1 min otherwise. Intraday bars 15 min, news
5 min, indicators 1 h. Default push table: 250 ms in a volatile session, 1 s in session, 5 s while
closed.

Volatility (:func:`is_volatile`) is the high-low range of recent prices relative to the latest
one. A range needs no distribution assumption and works from a handful of ticks, where a standard
deviation of returns would be noise; it is also how traders read "moving a lot" off a chart.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum

from foliosync.sync.errors import ConfigError, InvalidNumber, ValidationError
from foliosync.sync.market import NYSE, ExchangeCalendar

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_POLL_RULES",
    "DEFAULT_PUSH_RULES",
    "DEFAULT_VOLATILITY_THRESHOLD",
    "DataKind",
    "RefreshContext",
    "RefreshPolicy",
    "RefreshRule",
    "context_for",
    "is_volatile",
]

#: A 1 % high-low range over the recent window counts as volatile.
DEFAULT_VOLATILITY_THRESHOLD = Decimal("0.01")


class DataKind(StrEnum):
    CURRENT_PRICE = "current_price"
    INTRADAY_BARS = "intraday_bars"
    NEWS = "news"
    INDICATORS = "indicators"


@dataclass(frozen=True, slots=True)
class RefreshContext:
    """What the policy may depend on; ``event_day`` is e.g. an earnings day of the symbol."""

    market_open: bool
    volatile: bool = False
    event_day: bool = False


@dataclass(frozen=True, slots=True)
class RefreshRule:
    """One table row: ``interval`` applies when every condition that is not None holds."""

    kind: DataKind | None
    interval: timedelta
    market_open: bool | None = None
    volatile: bool | None = None
    event_day: bool | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and not isinstance(self.kind, DataKind):
            raise ConfigError(f"refresh rule kind must be a DataKind or None, not {self.kind!r}")
        if not isinstance(self.interval, timedelta) or self.interval <= timedelta():
            raise ConfigError(f"refresh rule interval must be a positive timedelta: {self!r}")
        for value in self._conditions():
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"refresh rule conditions must be bool or None: {self!r}")

    def matches(self, kind: DataKind, ctx: RefreshContext) -> bool:
        return (
            (self.kind is None or self.kind is kind)
            and (self.market_open is None or self.market_open == ctx.market_open)
            and (self.volatile is None or self.volatile == ctx.volatile)
            and (self.event_day is None or self.event_day == ctx.event_day)
        )

    def is_fallback_for(self, kind: DataKind) -> bool:
        """Whether this row matches every context for ``kind``."""
        return (self.kind is None or self.kind is kind) and all(
            value is None for value in self._conditions()
        )

    def covers(self, other: RefreshRule) -> bool:
        """Whether this row matches every case ``other`` matches (so ``other`` after it is dead)."""
        if self.kind is not None and self.kind is not other.kind:
            return False
        return all(
            mine is None or mine == theirs
            for mine, theirs in zip(self._conditions(), other._conditions(), strict=True)
        )

    def _conditions(self) -> tuple[bool | None, bool | None, bool | None]:
        return (self.market_open, self.volatile, self.event_day)


_S = timedelta(seconds=1)
_MIN = timedelta(minutes=1)

DEFAULT_POLL_RULES: tuple[RefreshRule, ...] = (
    RefreshRule(DataKind.CURRENT_PRICE, 30 * _S, market_open=True, volatile=True),
    RefreshRule(DataKind.CURRENT_PRICE, _MIN, event_day=True),
    RefreshRule(DataKind.CURRENT_PRICE, 15 * _MIN, market_open=False),
    RefreshRule(DataKind.CURRENT_PRICE, _MIN),
    RefreshRule(DataKind.INTRADAY_BARS, 15 * _MIN),
    RefreshRule(DataKind.NEWS, 5 * _MIN),
    RefreshRule(DataKind.INDICATORS, 60 * _MIN),
)

DEFAULT_PUSH_RULES: tuple[RefreshRule, ...] = (
    RefreshRule(None, timedelta(milliseconds=250), market_open=True, volatile=True),
    RefreshRule(None, _S, market_open=True),
    RefreshRule(None, 5 * _S),
)


def _check_table(name: str, rules: object) -> tuple[RefreshRule, ...]:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise ConfigError(f"{name} must be a sequence of RefreshRule rows")
    table = tuple(rules)
    for index, rule in enumerate(table):
        if not isinstance(rule, RefreshRule):
            raise ConfigError(f"{name}[{index}] is not a RefreshRule: {rule!r}")
        for earlier_index, earlier in enumerate(table[:index]):
            if earlier.covers(rule):
                raise ConfigError(
                    f"{name}[{index}] can never apply: {name}[{earlier_index}] matches first"
                )
    for kind in DataKind:
        if not any(rule.is_fallback_for(kind) for rule in table):
            raise ConfigError(f"{name} has no fallback rule (one without conditions) for {kind}")
    return table


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """The poll and push tables; built once, validated on construction (ConfigError)."""

    poll_rules: tuple[RefreshRule, ...] = DEFAULT_POLL_RULES
    push_rules: tuple[RefreshRule, ...] = DEFAULT_PUSH_RULES

    def __post_init__(self) -> None:
        object.__setattr__(self, "poll_rules", _check_table("poll_rules", self.poll_rules))
        object.__setattr__(self, "push_rules", _check_table("push_rules", self.push_rules))

    def poll_interval(self, kind: DataKind, ctx: RefreshContext) -> timedelta:
        """How long a polling client should wait before fetching ``kind`` again."""
        return _first_match(self.poll_rules, kind, ctx)

    def push_window(self, kind: DataKind, ctx: RefreshContext) -> timedelta:
        """The shortest spacing between two pushes of one item to one subscriber."""
        return _first_match(self.push_rules, kind, ctx)


def _first_match(rules: tuple[RefreshRule, ...], kind: DataKind, ctx: RefreshContext) -> timedelta:
    if not isinstance(kind, DataKind):
        raise ValidationError(f"unknown data kind {kind!r}")
    if not isinstance(ctx, RefreshContext):
        raise ValidationError(f"expected a RefreshContext, not {type(ctx).__name__}")
    for rule in rules:
        if rule.matches(kind, ctx):
            return rule.interval
    raise AssertionError("unreachable: validated tables have a fallback for every kind")


DEFAULT_POLICY = RefreshPolicy()


def _as_decimal(value: Decimal | float, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (Decimal, float, int)):
        raise InvalidNumber(f"{what} must be a number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidNumber(f"{what} must be finite, not {value!r}")
    number = Decimal(value)
    if not number.is_finite():
        raise InvalidNumber(f"{what} must be finite, not {value!r}")
    return number


def is_volatile(
    recent_prices: Sequence[Decimal | float],
    threshold: Decimal | float = DEFAULT_VOLATILITY_THRESHOLD,
) -> bool:
    """Whether ``(max - min) / latest`` of the prices (oldest first) exceeds ``threshold``.

    Fewer than two prices say nothing about movement: not volatile.
    """
    try:
        limit = _as_decimal(threshold, "volatility threshold")
    except InvalidNumber as exc:
        raise ConfigError(str(exc)) from exc
    if limit <= 0:
        raise ConfigError(f"volatility threshold must be positive, not {threshold!r}")
    prices = [_as_decimal(p, "price") for p in recent_prices]
    for price in prices:
        if price <= 0:
            raise InvalidNumber(f"price must be positive, not {price}")
    if len(prices) < 2:
        return False
    return (max(prices) - min(prices)) / prices[-1] > limit


def context_for(
    symbol_prices: Sequence[Decimal | float],
    t: datetime,
    calendar: ExchangeCalendar = NYSE,
    event_days: Collection[date] = frozenset(),
    volatility_threshold: Decimal | float = DEFAULT_VOLATILITY_THRESHOLD,
) -> RefreshContext:
    """The context at ``t`` for a symbol with these recent prices (oldest first).

    ``event_days`` are dates in the exchange's zone (earnings, index rebalances ...).
    """
    return RefreshContext(
        market_open=calendar.is_open(t),
        volatile=is_volatile(symbol_prices, volatility_threshold),
        event_day=calendar.local_date(t) in event_days,
    )
