"""Prices, pure: checking ticks, keeping the latest price of each symbol, and conflating.

Price ticks are high-churn data and never enter a CRDT document (tombstones would grow without
bound). The relay keeps one :class:`PriceBook`: the latest price of each symbol, a sequence number
per symbol (so that a client can tell it missed one) and a global cursor (so that an HTTP client
asks "what changed since" instead of reloading everything). A :class:`TickConflator` holds the
newest price of each symbol until the symbol's delivery window has passed: while a window is open,
a newer price replaces the older one instead of queueing behind it. Push windows depend on the
symbol and the market, not on who listens, so the relay keeps one conflator for all its
subscribers and hands each released price to every follower at once. A subscriber whose socket is
busy keeps what it was handed in :class:`LatestPrices`, the newest per symbol: a slow reader gets
fewer, newer prices and the relay's memory per subscriber is bounded by the symbols it follows.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

from foliosync.sync.errors import TickRejected, ValidationError
from foliosync.sync.protocol.frames import pack_price_tick
from foliosync.sync.validation import decimal_to_str, normalize_symbol

__all__ = [
    "MAX_FUTURE_MS",
    "LatestPrices",
    "PriceBook",
    "PricePoint",
    "SequenceTracker",
    "Tick",
    "TickConflator",
    "TickRejected",
    "check_tick",
    "check_ticks",
]

MAX_FUTURE_MS = 60_000
"""A tick stamped further than this in the future is refused: a clock that is off, not a price."""
_MAX_PRICE = Decimal("1e12")
_MAX_TEXT = 40  # the longest decimal text a price frame carries
_TICK_FIELDS = frozenset({"symbol", "price", "timestamp", "time_ms", "size"})
_PLAIN = re.compile(r"^\d{1,13}(?:\.\d{1,10})?$")


_NEVER = 1 << 62


@dataclass(frozen=True, slots=True)
class Tick:
    """A price as a source reports it."""

    symbol: str
    price: Decimal
    time_ms: int
    size: Decimal | None = None


@dataclass(frozen=True, slots=True)
class PricePoint:
    """A price as the relay delivers it: a tick with its sequence number for that symbol."""

    symbol: str
    price: Decimal
    time_ms: int
    seq: int
    size: Decimal | None = None
    packed: bytes = field(default=b"", compare=False, repr=False)
    """The tick's wire form, packed once by the book and sent as is to every subscriber."""

    def wire_bytes(self) -> bytes:
        return self.packed or pack_price_tick(self.to_wire())

    def to_wire(self) -> tuple[str, str, int, int, str | None]:
        size = decimal_to_str(self.size) if self.size is not None else None
        return (self.symbol, decimal_to_str(self.price), self.time_ms, self.seq, size)

    @classmethod
    def from_wire(cls, item: Sequence[object]) -> PricePoint:
        """From ``[symbol, price, time_ms, seq, size]``; ValidationError if it is not one."""
        try:
            symbol, price, time_ms, seq, size = item
            assert isinstance(time_ms, int) and isinstance(seq, int)
            return cls(
                normalize_symbol(symbol),
                _positive(price, "price"),
                time_ms,
                seq,
                None if size is None else _non_negative(size, "size"),
            )
        except (ValueError, TypeError, AssertionError) as exc:
            raise ValidationError(f"not a price tick: {item!r:.80}") from exc

    def to_json(self) -> dict[str, object]:
        return {
            "symbol": self.symbol,
            "price": decimal_to_str(self.price),
            "time_ms": self.time_ms,
            "seq": self.seq,
            "size": decimal_to_str(self.size) if self.size is not None else None,
        }


def _decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool):
        raise TickRejected(f"{what} is not a number")
    if isinstance(value, float):
        value = repr(value)  # JSON numbers: the shortest text that reads back as this float
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or len(value) > 40:
        raise TickRejected(f"{what} is not a number")
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        raise TickRejected(f"{what} {value!r} is not a number") from None
    if not number.is_finite():
        raise TickRejected(f"{what} must be finite")
    if number >= _MAX_PRICE:
        raise TickRejected(f"{what} {value} is implausibly large")
    exponent = number.normalize().as_tuple().exponent
    if isinstance(exponent, int) and (
        exponent < -_MAX_TEXT or len(decimal_to_str(number)) > _MAX_TEXT
    ):
        # 1e-999999 is finite and small, but its decimal text is a million digits long: more
        # than the price frames carry (the relay could not send it to any subscriber).
        raise TickRejected(f"{what} {value} has too many digits")
    return number


def _positive(value: object, what: str) -> Decimal:
    number = _decimal(value, what)
    if number <= 0:
        raise TickRejected(f"{what} must be positive, got {value}")
    return number


def _non_negative(value: object, what: str) -> Decimal:
    number = _decimal(value, what)
    if number < 0:
        raise TickRejected(f"{what} cannot be negative, got {value}")
    return number


def _time_ms(value: object, *, allow_text: bool = True) -> int:
    """Epoch milliseconds from a number of them, or (``allow_text``) an ISO 8601 date and time.

    Publishers often hold times as text (a JSON dashboard, a CSV export); asking them to convert
    to epoch milliseconds first invites off-by-a-timezone errors. So a text time is taken, but
    only with its zone (``Z`` or an offset): a naive one would be read in whatever zone the relay
    runs in, which is the same off-by-hours error made silently.
    """
    if isinstance(value, str) and allow_text:
        return _iso_time_ms(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TickRejected(
            f"timestamp must be epoch milliseconds{_OR_ISO if allow_text else ''}, "
            f"got {value!r:.40}"
        )
    if value != value or value < 0 or value > _MAX_TIME_MS:  # NaN, or outside 1970..9999
        raise TickRejected("timestamp is out of range")
    return int(value)


_OR_ISO = " or an ISO 8601 date and time with a zone, like 2026-11-24T15:00:00Z"
_MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_ISO_SHAPE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso_time_ms(text: str) -> int:
    stripped = text.strip()
    if len(stripped) > 40 or not _ISO_SHAPE.match(stripped):
        raise TickRejected(f"timestamp {text!r:.48} is not epoch milliseconds{_OR_ISO}")
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise TickRejected(
            f"timestamp {stripped!r} is not a valid ISO 8601 date and time"
        ) from None
    if moment.utcoffset() is None:
        raise TickRejected(
            f"timestamp {stripped!r} has no time zone: add Z for UTC or an offset such as +01:00"
        )
    time_ms = (moment - _EPOCH) // timedelta(milliseconds=1)
    if time_ms < 0:
        raise TickRejected("timestamp is out of range")
    return time_ms


def check_tick(raw: object, now_ms: int, *, max_future_ms: int = MAX_FUTURE_MS) -> Tick:
    """A tick from a publisher, checked: a mapping (``symbol``, ``price``, ``timestamp`` or
    ``time_ms``, optional ``size``) or a sequence ``[symbol, price, timestamp, size?]``.

    A ``timestamp`` is epoch milliseconds or ISO 8601 text with its zone
    (``2026-11-24T15:00:00Z``, ``2026-11-24T10:00:00-05:00``); ``time_ms`` is milliseconds only.

    Raises :class:`TickRejected` with the reason; unknown fields are refused, not ignored, so that a
    publisher's typo (``prcie``) is not silently a tick without a price.
    """
    if isinstance(raw, Mapping):
        unknown = set(raw) - _TICK_FIELDS
        if unknown:
            raise TickRejected(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        if "timestamp" in raw and "time_ms" in raw:
            raise TickRejected("give timestamp or time_ms, not both")
        symbol, price = raw.get("symbol"), raw.get("price")
        time_value = raw.get("timestamp", raw.get("time_ms"))
        time_text = "time_ms" not in raw  # time_ms says what it holds: a number
        size = raw.get("size")
    elif isinstance(raw, list | tuple) and 3 <= len(raw) <= 4:
        symbol, price, time_value = raw[0], raw[1], raw[2]
        size = raw[3] if len(raw) == 4 else None
        time_text = True
    else:
        raise TickRejected("a tick is {symbol, price, timestamp[, size]} or [symbol, price, ms]")
    if symbol is None or price is None or time_value is None:
        raise TickRejected("a tick needs symbol, price and timestamp")
    try:
        canonical = normalize_symbol(symbol)
    except ValidationError as exc:
        raise TickRejected(str(exc)) from None
    time_ms = _time_ms(time_value, allow_text=time_text)
    if time_ms > now_ms + max_future_ms:
        raise TickRejected(f"timestamp is {(time_ms - now_ms) // 1000} s in the future")
    return Tick(
        canonical,
        _positive(price, "price"),
        time_ms,
        None if size is None else _non_negative(size, "size"),
    )


def check_ticks(
    raws: Iterable[object], now_ms: int, *, max_future_ms: int = MAX_FUTURE_MS
) -> tuple[list[Tick], list[tuple[int, str]]]:
    """The good ticks of a batch, and ``(index, reason)`` for each bad one."""
    good: list[Tick] = []
    bad: list[tuple[int, str]] = []
    for index, raw in enumerate(raws):
        try:
            good.append(check_tick(raw, now_ms, max_future_ms=max_future_ms))
        except TickRejected as exc:
            bad.append((index, str(exc)))
    return good, bad


@dataclass(slots=True)
class _Symbol:
    point: PricePoint
    cursor: int
    recent: deque[Decimal] = field(default_factory=lambda: deque(maxlen=32))


class PriceBook:
    """The latest price of every symbol, with sequence numbers and a change cursor."""

    def __init__(self) -> None:
        self._symbols: dict[str, _Symbol] = {}
        self._cursor = 0

    @property
    def cursor(self) -> int:
        """Grows by one with every accepted tick; ``changed_since(c)`` answers relative to it."""
        return self._cursor

    def __len__(self) -> int:
        return len(self._symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._symbols

    def apply(self, tick: Tick) -> PricePoint | None:
        """Record a tick; None if it is older than the price already known (out of order)."""
        current = self._symbols.get(tick.symbol)
        if current is not None and tick.time_ms < current.point.time_ms:
            return None
        self._cursor += 1
        seq = current.point.seq + 1 if current is not None else 1
        point = PricePoint(tick.symbol, tick.price, tick.time_ms, seq, tick.size)
        point = replace(point, packed=pack_price_tick(point.to_wire()))
        if current is None:
            current = self._symbols[tick.symbol] = _Symbol(point, self._cursor)
        else:
            current.point, current.cursor = point, self._cursor
        current.recent.append(tick.price)
        return point

    def latest(self, symbol: str) -> PricePoint | None:
        entry = self._symbols.get(symbol)
        return entry.point if entry is not None else None

    def snapshot(self, symbols: Iterable[str]) -> list[PricePoint]:
        """The latest price of each of ``symbols`` that has one."""
        return [e.point for s in symbols if (e := self._symbols.get(s)) is not None]

    def changed_since(
        self, cursor: int, symbols: Iterable[str] | None = None
    ) -> tuple[list[PricePoint], int]:
        """Prices that changed after ``cursor`` (of ``symbols``, or all), and the new cursor."""
        if symbols is None:
            entries: Iterable[_Symbol] = self._symbols.values()
        else:
            entries = [e for s in symbols if (e := self._symbols.get(s)) is not None]
        changed = [e.point for e in entries if e.cursor > cursor]
        changed.sort(key=lambda p: p.symbol)
        return changed, self._cursor

    def resume_cursor(self, delivered: Mapping[str, int], symbols: Iterable[str]) -> int:
        """The cursor from which a follower of ``symbols`` resumes without missing a price.

        ``delivered`` holds the sequence number of the last price it got of each symbol. A
        follower is handed conflated prices, so it may lag the book on some symbols: the cursor
        is then just before the oldest change it lacks, and ``changed_since`` of it brings every
        price it does not have yet (and perhaps a few it has, which repeat harmlessly).
        """
        cursor = self._cursor
        for symbol in symbols:
            entry = self._symbols.get(symbol)
            if entry is not None and entry.point.seq > delivered.get(symbol, 0):
                cursor = min(cursor, entry.cursor - 1)
        return cursor

    def recent_prices(self, symbol: str) -> list[Decimal]:
        entry = self._symbols.get(symbol)
        return list(entry.recent) if entry is not None else []

    def symbols(self) -> list[str]:
        return sorted(self._symbols)


class TickConflator:
    """Pending prices: the newest per symbol, released at most once per window.

    ``window_ms(symbol)`` gives the push window of a symbol (from the smart-refresh policy). A
    price offered inside the window of the symbol's last release waits, and a newer one replaces
    it; :meth:`due` hands out what may go now. Memory is one entry per symbol, whatever the tick
    rate.
    """

    __slots__ = ("_last_sent", "_pending", "_window_ms", "conflated", "next_due_ms")

    def __init__(self, window_ms: Callable[[str], int]) -> None:
        self._window_ms = window_ms
        self._pending: dict[str, PricePoint] = {}
        self._last_sent: dict[str, int] = {}
        self.next_due_ms = _NEVER
        """The earliest time a pending price may go: nothing is due before it."""
        self.conflated = 0
        """Prices replaced by a newer one of their symbol before their window released them."""

    def __len__(self) -> int:
        return len(self._pending)

    def offer(self, point: PricePoint) -> None:
        symbol = point.symbol
        if symbol not in self._pending:
            last = self._last_sent.get(symbol)
            due_at = 0 if last is None else last + self._window_ms(symbol)
            if due_at < self.next_due_ms:
                self.next_due_ms = due_at
        else:
            self.conflated += 1
        self._pending[symbol] = point

    def forget(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._pending.pop(symbol, None)
            self._last_sent.pop(symbol, None)

    def due(self, now_ms: int) -> list[PricePoint]:
        """The pending prices whose window has passed; they count as sent at ``now_ms``."""
        if not self._pending:
            self.next_due_ms = _NEVER  # what was due was forgotten
            return []
        if now_ms < self.next_due_ms:
            return []
        ready: list[PricePoint] = []
        next_due = _NEVER
        for symbol, point in list(self._pending.items()):
            last = self._last_sent.get(symbol)
            window = self._window_ms(symbol)
            if last is None or now_ms - last >= window:
                ready.append(point)
                del self._pending[symbol]
                self._last_sent[symbol] = now_ms
            elif last + window < next_due:
                next_due = last + window
        self.next_due_ms = next_due
        return ready


class LatestPrices:
    """Prices handed to a subscriber and not yet written: the newest per symbol, nothing older.

    What a busy socket could not take at once waits here, and a newer price of the same symbol
    replaces the one waiting, so the backlog of a slow reader is at most one entry per symbol it
    follows and what it finally gets is the newest.
    """

    __slots__ = ("_points", "replaced")

    def __init__(self) -> None:
        self._points: dict[str, PricePoint] = {}
        self.replaced = 0
        """Prices that waited here and were replaced by a newer one before they were written."""

    def __len__(self) -> int:
        return len(self._points)

    def add(self, points: Iterable[PricePoint]) -> None:
        waiting = self._points
        for point in points:
            current = waiting.get(point.symbol)
            if current is None:
                waiting[point.symbol] = point
            elif point.seq >= current.seq:
                waiting[point.symbol] = point
                self.replaced += 1

    def forget(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._points.pop(symbol, None)

    def take(self) -> list[PricePoint]:
        """Everything waiting, which is then no longer waiting."""
        points = list(self._points.values())
        self._points.clear()
        return points


class SequenceTracker:
    """Client side: notices a gap in a symbol's sequence numbers (a missed or skipped price).

    Conflation skips sequence numbers on purpose, so a gap is only a *decrease* or, after a
    snapshot, nothing at all: the tracker reports a gap when a batch brings a sequence number lower
    than one already seen (the relay restarted and its numbers began again), in which case the
    client should ask for a fresh snapshot instead of trusting its old values.
    """

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def accept(self, point: PricePoint, *, snapshot: bool = False) -> bool:
        """Whether ``point`` is not older than what was seen; False means resync that symbol.

        The same number again is the same price (a batch may repeat what a snapshot just gave):
        accepted, not a gap."""
        last = self._seen.get(point.symbol)
        if snapshot or last is None or point.seq >= last:
            self._seen[point.symbol] = point.seq
            return True
        return False

    def reset(self, symbols: Iterable[str] | None = None) -> None:
        if symbols is None:
            self._seen.clear()
        else:
            for symbol in symbols:
                self._seen.pop(symbol, None)
