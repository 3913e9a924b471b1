"""A portfolio: a name and a ledger of trades; positions are derived, never stored.

Layout in the pycrdt document:

- ``meta``: kind and name.
- ``trades``: trade id -> the trade as first recorded (symbol, quantity and price as exact decimal
  text, time in epoch milliseconds, note, stamp, device). Ids are random, so trades recorded
  concurrently on two devices are two keys and both count: positions are a fold over the ledger,
  so there is no read-modify-write to lose.
- ``fields``: later-wins correction slots (see :mod:`.lww`), one per trade, field and device. A
  correction made after another (by wall clock, or after seeing it: it is stamped above the slots
  it saw) wins, whichever device has the higher pycrdt client id.
- Deleting a trade deletes its key; a concurrent correction of a deleted trade is ignored.

Positions use the average-cost method: a buy raises the quantity and re-averages the cost, a sale
lowers the quantity and leaves the average cost; a position that reaches zero starts afresh, and
a sale beyond the holding opens a short position at the sale price. Trades are folded in
(time, recording stamp, id) order, so every replica computes the same figures from the same ledger.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from typing import Any

from pycrdt import Doc, Map

from foliosync.sync.clock import stamp_millis
from foliosync.sync.errors import DocumentNotFound, InvalidNumber, ValidationError
from foliosync.sync.model.document import DocumentKind, DocumentModel, EditContext
from foliosync.sync.model.lww import LwwSlots, newest_stamp
from foliosync.sync.validation import (
    decimal_to_str,
    is_symbol,
    normalize_note,
    normalize_symbol,
    parse_price,
    parse_quantity,
)

__all__ = ["CORRECTABLE_FIELDS", "Portfolio", "Position", "Trade", "compute_positions"]

CORRECTABLE_FIELDS = ("symbol", "quantity", "price", "time", "note")
_MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, well inside float64's exact range
_PLAIN_DECIMAL = re.compile(r"^-?\d{1,18}(?:\.\d{1,12})?$")


@dataclass(frozen=True, slots=True)
class Trade:
    id: str
    symbol: str
    quantity: Decimal  # negative sells
    price: Decimal
    time: datetime  # aware, UTC
    note: str | None
    recorded: str = ""  # stamp of the recording: orders trades of the same instant

    @property
    def sort_key(self) -> tuple[datetime, str, str]:
        return (self.time, self.recorded, self.id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "symbol": self.symbol,
            "qty": decimal_to_str(self.quantity),
            "price": decimal_to_str(self.price),
            "time": self.time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Position:
    symbol: str
    quantity: Decimal
    average_cost: Decimal
    realized: Decimal  # profit or loss realized by sales, at average cost

    @property
    def cost_basis(self) -> Decimal:
        return self.quantity * self.average_cost

    def to_json(self) -> dict[str, str]:
        return {
            "qty": decimal_to_str(self.quantity),
            "avg_cost": decimal_to_str(self.average_cost),
            "realized": decimal_to_str(self.realized),
        }


def _time_ms(value: datetime | int | None, default_ms: int) -> int:
    if value is None:
        return default_ms
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValidationError("a trade time must carry a time zone")
        ms = int(value.timestamp() * 1000)
    elif isinstance(value, int) and not isinstance(value, bool):
        ms = value
    else:
        raise ValidationError(f"a trade time must be a datetime, not {type(value).__name__}")
    if not 0 <= ms <= _MAX_TIME_MS:
        raise ValidationError("a trade time must be between 1970 and 9999")
    return ms


def _ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class Portfolio(DocumentModel):
    KIND = DocumentKind.PORTFOLIO

    def __init__(
        self,
        doc: Doc[Any],
        context: EditContext,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        super().__init__(doc, context)
        self._trades: Map[Any] = doc.get("trades", type=Map)
        self._fields = LwwSlots(doc.get("fields", type=Map))
        self._new_id = new_id
        self._cache: dict[str, Trade] | None = None
        self._cache_version = -1
        self._positions: dict[str, Position] | None = None

    # -- reads -----------------------------------------------------------------------------

    def _ledger(self) -> dict[str, Trade]:
        if self._cache is None or self._cache_version != self.version:
            self._cache = self._read_ledger()
            self._cache_version = self.version
            self._positions = None
        return self._cache

    def _read_ledger(self) -> dict[str, Trade]:
        corrections = self._fields.resolve()
        ledger: dict[str, Trade] = {}
        newest = newest_stamp(corrections)
        for trade_id, raw in self._trades.items():
            trade = _decode_trade(trade_id, raw)
            if trade is None:
                continue  # a record we cannot read is left alone, not guessed at
            newest = max(newest, trade.recorded)
            for field, slot in corrections.get(trade_id, {}).items():
                trade = _apply_correction(trade, field, slot.value)
            ledger[trade_id] = trade
        # What this device writes next (a correction, say) must sort after all it has seen.
        self.context.clock.observe(newest)
        return ledger

    def trades(self) -> list[Trade]:
        """The ledger in time order (then recording order, then id: the same on every replica)."""
        return sorted(self._ledger().values(), key=lambda t: t.sort_key)

    def trade(self, trade_id: str) -> Trade:
        try:
            return self._ledger()[trade_id]
        except KeyError:
            raise DocumentNotFound(f"no trade {trade_id!r} in portfolio {self.name!r}") from None

    def positions(self) -> dict[str, Position]:
        """Open and closed positions by symbol, derived from the ledger."""
        self._ledger()
        if self._positions is None:
            self._positions = compute_positions(self.trades())
        return dict(self._positions)

    def __len__(self) -> int:
        return len(self._ledger())

    # -- edits -----------------------------------------------------------------------------

    def add_trade(
        self,
        symbol: str,
        quantity: object,
        price: object,
        time: datetime | int | None = None,
        note: str | None = None,
    ) -> Trade:
        """Record a trade (negative quantity sells). Validates everything before writing."""
        symbol = normalize_symbol(symbol)
        qty = parse_quantity(quantity)
        px = parse_price(price)
        note = normalize_note(note)
        stamp = self.context.clock.now()
        at_ms = _time_ms(time, stamp_millis(stamp))
        trade_id = self._new_id()
        record = {
            "symbol": symbol,
            "qty": decimal_to_str(qty),
            "price": decimal_to_str(px),
            "at": at_ms,
            "note": note,
            "t": stamp,
            "by": self.context.device,
        }
        ledger = self._ledger()  # patched in place: no copy of a 10,000-trade ledger per edit
        with self.doc.transaction():
            self._trades[trade_id] = record
        trade = Trade(trade_id, symbol, qty, px, _ms_to_datetime(at_ms), note, stamp)
        ledger[trade_id] = trade
        self._patch(ledger)
        return trade

    def correct_trade(self, trade_id: str, **changes: object) -> Trade:
        """Correct fields of a trade: symbol, quantity, price, time, note. Later corrections win."""
        current = self.trade(trade_id)
        unknown = set(changes) - set(CORRECTABLE_FIELDS)
        if unknown:
            raise ValidationError(f"cannot correct {', '.join(sorted(unknown))} of a trade")
        if not changes:
            raise ValidationError("nothing to correct")
        encoded: dict[str, Any] = {}
        for field, value in changes.items():
            encoded[field] = _encode_field(field, value)
        updated = current
        for field, value in encoded.items():
            updated = _apply_correction(updated, field, value)
        ledger = self._ledger()  # read (and so observed by the clock) before stamping
        device, clock = self.context.device, self.context.clock
        with self.doc.transaction():
            for field, value in encoded.items():
                self._fields.write(trade_id, field, device, clock.now(), value)
        ledger[trade_id] = updated
        self._patch(ledger)
        return updated

    def delete_trade(self, trade_id: str) -> None:
        self.trade(trade_id)  # raises DocumentNotFound
        ledger = self._ledger()
        with self.doc.transaction():
            del self._trades[trade_id]
            self._fields.clear(trade_id)
        del ledger[trade_id]
        self._patch(ledger)

    def _patch(self, ledger: dict[str, Trade]) -> None:
        """Adopt ``ledger`` (the cache, patched in place by a local edit) as current."""
        self._cache = ledger
        self._cache_version = self.version
        self._positions = None


def _encode_field(field: str, value: object) -> Any:
    """The document form of a corrected field, validated like a new trade's."""
    if field == "symbol":
        return normalize_symbol(value)
    if field == "quantity":
        return decimal_to_str(parse_quantity(value))
    if field == "price":
        return decimal_to_str(parse_price(value))
    if field == "time":
        if not isinstance(value, datetime | int):
            raise ValidationError("a trade time must be a datetime")
        return _time_ms(value, 0)
    return normalize_note(value)


def _stored_decimal(text: Any) -> Decimal:
    """A decimal as :func:`decimal_to_str` writes it, checked cheaply (ledgers are read whole)."""
    if type(text) is not str or not _PLAIN_DECIMAL.match(text):
        raise ValueError("not a stored decimal")
    return Decimal(text)


def _decode_trade(trade_id: str, raw: Any) -> Trade | None:
    """A stored trade, or None for a record no foliosync wrote (left alone, not guessed at)."""
    if type(raw) is not dict:
        return None
    try:
        symbol, note, stamp = raw["symbol"], raw.get("note"), raw.get("t")
        if type(symbol) is not str or not is_symbol(symbol):
            return None
        quantity = _stored_decimal(raw["qty"])
        price = _stored_decimal(raw["price"])
        if quantity == 0 or price < 0:
            return None
        return Trade(
            trade_id,
            symbol,
            quantity,
            price,
            _ms_to_datetime(int(raw["at"])),
            note if type(note) is str and note else None,
            stamp if type(stamp) is str else "",
        )
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return None


def _apply_correction(trade: Trade, field: str, value: Any) -> Trade:
    """A trade with one corrected field; unreadable corrections are ignored, not trusted."""
    try:
        if field == "symbol":
            return replace(trade, symbol=normalize_symbol(value))
        if field == "quantity":
            return replace(trade, quantity=parse_quantity(value))
        if field == "price":
            return replace(trade, price=parse_price(value))
        if field == "time":
            return replace(trade, time=_ms_to_datetime(int(value)))
        if field == "note":
            return replace(trade, note=value if isinstance(value, str) and value else None)
    except (InvalidNumber, ValidationError, TypeError, ValueError, OverflowError):
        pass
    return trade


def compute_positions(trades: list[Trade]) -> dict[str, Position]:
    """Fold trades (already in time order) into positions by the average-cost method."""
    state: dict[str, tuple[Decimal, Decimal, Decimal]] = {}
    zero = Decimal(0)
    with localcontext() as ctx:
        ctx.prec = 34  # decimal128: enough that the fold is exact for any validated input
        for trade in trades:
            qty, avg, realized = state.get(trade.symbol, (zero, zero, zero))
            q, p = trade.quantity, trade.price
            if qty == 0 or (qty > 0) == (q > 0):
                new_qty = qty + q
                avg = (qty * avg + q * p) / new_qty
                qty = new_qty
            elif abs(q) <= abs(qty):
                realized += (p - avg) * -q
                qty += q
                if qty == 0:
                    avg = zero
            else:  # the sale (or cover) goes past zero: the rest opens at this price
                realized += (p - avg) * qty
                qty += q
                avg = p
            state[trade.symbol] = (qty, avg, realized)
        return {
            symbol: Position(symbol, _plain(qty), _plain(avg), _plain(realized))
            for symbol, (qty, avg, realized) in sorted(state.items())
        }


def _plain(value: Decimal) -> Decimal:
    """Drop trailing zeros without switching to exponent form (10, not 1E+1)."""
    return Decimal(decimal_to_str(value))
