"""What the desktop app shows, as plain values: badges, money, the market line, status lines.

Kept free of Qt so that every word and colour the window shows can be tested on its own, and so
that the levels come from one place: :mod:`foliosync.sync.freshness` cuts them (market-aware for
prices) and :mod:`foliosync.sync.market` knows when the exchange opens. Nothing here decides a
threshold; it only names and colours what those modules decided.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from foliosync.client.quotes import Quote
from foliosync.sync.errors import InvalidNumber
from foliosync.sync.freshness import Freshness, FreshnessLevel
from foliosync.sync.market import NYSE, ExchangeCalendar
from foliosync.sync.model import Position
from foliosync.sync.validation import decimal_to_str

__all__ = [
    "LEVEL_COLOURS",
    "Badge",
    "Holding",
    "Notice",
    "document_badge",
    "format_change",
    "format_money",
    "holdings",
    "market_line",
    "pending_line",
    "plain_number",
    "price_badge",
]

# Green to red as the view ages; readable as text colour on a light background and as a badge fill.
LEVEL_COLOURS: Mapping[FreshnessLevel, str] = {
    FreshnessLevel.LIVE: "#1a7f37",
    FreshnessLevel.FRESH: "#4d8f00",
    FreshnessLevel.STALE: "#b35900",
    FreshnessLevel.OUTDATED: "#c62828",
}


_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def plain_number(text: str, what: str) -> str:
    """Typed text that reads as an exact decimal ("187.25", "-10"), else InvalidNumber.

    The library takes any decimal text, "1e3" included; a person who types that into a price
    box most likely meant something else, so the window asks for the plain form.
    """
    typed = text.strip()
    if not _PLAIN_NUMBER.match(typed):
        raise InvalidNumber(f"{what} {typed!r} is not a plain decimal number (like 187.25)")
    return typed


@dataclass(frozen=True, slots=True)
class Badge:
    """A freshness badge: the level's word, its colour, and the detail behind it."""

    level: FreshnessLevel
    text: str  # "live", "fresh", "stale", "outdated"
    colour: str
    detail: str  # the reason, e.g. "updated 12 s ago" or "closing price, market closed until ..."
    updated: str  # the time of the last update, local to the exchange, or "never"


@dataclass(frozen=True, slots=True)
class Notice:
    """Something the user must be told once: a change refused and rolled back, a share revoked.

    The engine does not raise these events yet; :meth:`MainWindow.show_notice` is where they
    will arrive, so that only the subscription is left to add.
    """

    kind: str  # "refused", "revoked", "error"
    text: str


@dataclass(frozen=True, slots=True)
class Holding:
    """One open position of a portfolio, valued at the last known price (None: no price)."""

    symbol: str
    quantity: Decimal
    average_cost: Decimal
    price: Decimal | None
    value: Decimal | None
    gain: Decimal | None  # unrealized: value less cost basis
    realized: Decimal


def _badge(freshness: Freshness, updated: str) -> Badge:
    level = freshness.level
    return Badge(level, level.value, LEVEL_COLOURS[level], freshness.reason, updated)


def _clock_time(t: datetime, calendar: ExchangeCalendar, now: datetime) -> str:
    local = t.astimezone(calendar.timezone)
    same_day = local.date() == now.astimezone(calendar.timezone).date()
    return f"{local:%H:%M:%S}" if same_day else f"{local:%a %d %b %H:%M}"


def price_badge(quote: Quote, now: datetime, calendar: ExchangeCalendar = NYSE) -> Badge:
    """A price's badge at ``now``: market-aware, so a Friday close is still current on Sunday."""
    return _badge(quote.freshness(now, calendar), _clock_time(quote.time, calendar, now))


def document_badge(
    freshness: Freshness,
    last_update: datetime | None,
    now: datetime,
    calendar: ExchangeCalendar = NYSE,
) -> Badge:
    """A document's badge: how recently this device was in sync with the relay."""
    updated = "never" if last_update is None else _clock_time(last_update, calendar, now)
    return _badge(freshness, updated)


def market_line(now: datetime, calendar: ExchangeCalendar = NYSE) -> str:
    """ "NYSE open · closes 16:00 EST" or "NYSE closed · opens Mon 30 Nov 09:30 EST"."""
    zone = calendar.timezone
    if calendar.is_open(now):
        close = calendar.next_close(now).astimezone(zone)
        return f"{calendar.name} open · closes {close:%H:%M %Z}"
    opens = calendar.next_open(now).astimezone(zone)
    return f"{calendar.name} closed · opens {opens:%a %d %b %H:%M %Z}"


def pending_line(pending: int) -> str:
    """ "3 changes waiting to sync", or "all changes synced"."""
    if pending <= 0:
        return "all changes synced"
    return f"{pending} change{'' if pending == 1 else 's'} waiting to sync"


def format_money(value: Decimal | None, places: int = 2) -> str:
    """Exact decimal text with thousands separators, at least ``places`` decimals ("-" if None).

    Never rounded: a price of 187.2575 shows all its digits, since a value the user typed must
    read back as typed.
    """
    if value is None:
        return "-"
    text = decimal_to_str(value)
    sign = "-" if text.startswith("-") else ""
    whole, _, fraction = text.lstrip("-").partition(".")
    fraction = fraction.ljust(places, "0")
    return f"{sign}{int(whole):,}.{fraction}" if fraction else f"{sign}{int(whole):,}"


def format_change(quote: Quote | None) -> str:
    """The change since the previous close, "+1.25 (+0.67%)", or "" while not known."""
    if quote is None or quote.previous_close is None:
        return ""
    change = quote.price - quote.previous_close
    text = ("+" if change > 0 else "") + format_money(change)
    if quote.previous_close:
        percent = (change / quote.previous_close * 100).quantize(Decimal("0.01"))
        text += f" ({'+' if percent > 0 else ''}{percent}%)"
    return text


def holdings(positions: Mapping[str, Position], quotes: Mapping[str, Quote]) -> list[Holding]:
    """The open positions, by symbol, valued at ``quotes``; closed positions are left out."""
    rows: list[Holding] = []
    for symbol in sorted(positions):
        position = positions[symbol]
        if position.quantity == 0:
            continue
        quote = quotes.get(symbol)
        price = None if quote is None else quote.price
        value = None if price is None else position.quantity * price
        gain = None if value is None else value - position.cost_basis
        rows.append(
            Holding(
                symbol,
                position.quantity,
                position.average_cost,
                price,
                value,
                gain,
                position.realized,
            )
        )
    return rows
