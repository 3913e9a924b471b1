"""Qt item models over the client's snapshots: a watchlist, a portfolio's holdings, its trades.

Each model holds plain snapshot values and computes a cell only when a view asks for it, so a
watchlist of a thousand symbols costs what the visible rows cost: a price tick repaints its own
row, and the once-a-second clock repaints the badge columns, of which the view draws only those
on screen. Every word and colour comes from :mod:`.badges`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtGui import QColor

from foliosync.client.app.badges import (
    Badge,
    Holding,
    format_change,
    format_money,
    holdings,
    price_badge,
)
from foliosync.client.quotes import Quote
from foliosync.sync.market import NYSE
from foliosync.sync.model import Position, Trade, WatchlistEntry
from foliosync.sync.validation import decimal_to_str

__all__ = ["HoldingsModel", "TradesModel", "WatchlistModel"]

_Index = QModelIndex | QPersistentModelIndex
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
_ROOT = QModelIndex()


class _ColumnsModel(QAbstractTableModel):
    """A table whose columns and their headers are a class's ``columns``."""

    columns: tuple[str, ...] = ()

    def columnCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def headerData(
        self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole
    ) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return self.columns[section] if 0 <= section < len(self.columns) else None
        return None


class _PricedModel(_ColumnsModel):
    """Rows keyed by symbol, with the quotes and the time their badges are measured at."""

    badge_columns: tuple[int, ...] = ()
    numeric_columns: frozenset[int] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self._quotes: dict[str, Quote] = {}
        self._now = datetime.now(tz=UTC)
        self._badges: dict[str, Badge] = {}
        self._rows_by_symbol: dict[str, int] = {}

    def rowCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self._rows_by_symbol)

    def badge(self, symbol: str) -> Badge | None:
        """The price badge of ``symbol`` at the model's time (None without a price)."""
        cached = self._badges.get(symbol)
        if cached is None:
            quote = self._quotes.get(symbol)
            if quote is None:
                return None
            cached = self._badges[symbol] = price_badge(quote, self._now)
        return cached

    def quote(self, symbol: str) -> Quote | None:
        return self._quotes.get(symbol)

    def set_now(self, now: datetime) -> None:
        """Measure the badges at ``now``; the view repaints what it shows of them."""
        self._now = now
        self._badges.clear()
        rows = self.rowCount()
        if rows:
            for column in self.badge_columns:
                self.dataChanged.emit(self.index(0, column), self.index(rows - 1, column))

    def update_quotes(self, quotes: Iterable[Quote]) -> None:
        """New prices: only the rows of their symbols change."""
        for quote in quotes:
            row = self._rows_by_symbol.get(quote.symbol)
            if row is None:
                continue
            self._quotes[quote.symbol] = quote
            self._badges.pop(quote.symbol, None)
            self._row_priced(row)

    def _row_priced(self, row: int) -> None:
        self.dataChanged.emit(self.index(row, 0), self.index(row, len(self.columns) - 1))

    def _badge_data(self, badge: Badge | None, column: int, role: int) -> Any:
        """The freshness badge cell (first badge column) and its update time (second)."""
        if badge is None:
            return "no price" if role == Qt.ItemDataRole.DisplayRole and column == 0 else None
        if role == Qt.ItemDataRole.DisplayRole:
            return badge.text if column == 0 else badge.updated
        if role == Qt.ItemDataRole.ForegroundRole and column == 0:
            return QColor(badge.colour)
        if role == Qt.ItemDataRole.ToolTipRole:
            return badge.detail
        return None


class WatchlistModel(_PricedModel):
    """A watchlist's symbols in their order, with price, change, freshness and note."""

    columns = ("Symbol", "Price", "Change", "Freshness", "Updated", "Note")
    badge_columns = (3, 4)
    numeric_columns = frozenset({1, 2})

    def __init__(self) -> None:
        super().__init__()
        self._entries: tuple[WatchlistEntry, ...] = ()

    def set_entries(
        self, entries: Sequence[WatchlistEntry], quotes: Mapping[str, Quote], now: datetime
    ) -> None:
        self.beginResetModel()
        self._entries = tuple(entries)
        self._rows_by_symbol = {entry.symbol: row for row, entry in enumerate(self._entries)}
        self._quotes = {s: q for s, q in quotes.items() if s in self._rows_by_symbol}
        self._now = now
        self._badges.clear()
        self.endResetModel()

    @property
    def symbols(self) -> list[str]:
        return [entry.symbol for entry in self._entries]

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._entries):
            return None
        entry = self._entries[index.row()]
        column = index.column()
        if column in self.badge_columns:
            return self._badge_data(self.badge(entry.symbol), column - 3, role)
        if role == Qt.ItemDataRole.TextAlignmentRole and column in self.numeric_columns:
            return _RIGHT
        if role == Qt.ItemDataRole.ForegroundRole and column == 2:
            quote = self._quotes.get(entry.symbol)
            change = None if quote is None else quote.change
            if change:
                return QColor("#1a7f37" if change > 0 else "#c62828")
            return None
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        quote = self._quotes.get(entry.symbol)
        if column == 0:
            return entry.symbol
        if column == 1:
            return "" if quote is None else format_money(quote.price)
        if column == 2:
            return format_change(quote)
        return entry.note or ""


class HoldingsModel(_PricedModel):
    """A portfolio's open positions: quantity, average cost, price, value and gain."""

    columns = ("Symbol", "Quantity", "Avg cost", "Price", "Value", "Gain", "Freshness", "Updated")
    badge_columns = (6, 7)
    numeric_columns = frozenset({1, 2, 3, 4, 5})

    def __init__(self) -> None:
        super().__init__()
        self._positions: Mapping[str, Position] = {}
        self._holdings: list[Holding] = []

    def set_positions(
        self, positions: Mapping[str, Position], quotes: Mapping[str, Quote], now: datetime
    ) -> None:
        self.beginResetModel()
        self._positions = positions
        self._holdings = holdings(positions, quotes)
        self._rows_by_symbol = {h.symbol: row for row, h in enumerate(self._holdings)}
        self._quotes = {s: q for s, q in quotes.items() if s in self._rows_by_symbol}
        self._now = now
        self._badges.clear()
        self.endResetModel()

    @property
    def holdings(self) -> list[Holding]:
        return list(self._holdings)

    def _row_priced(self, row: int) -> None:
        self._holdings = holdings(self._positions, self._quotes)  # a few rows: recompute all
        super()._row_priced(row)

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._holdings):
            return None
        holding = self._holdings[index.row()]
        column = index.column()
        if column in self.badge_columns:
            return self._badge_data(self.badge(holding.symbol), column - 6, role)
        if role == Qt.ItemDataRole.TextAlignmentRole and column in self.numeric_columns:
            return _RIGHT
        if role == Qt.ItemDataRole.ForegroundRole and column == 5 and holding.gain:
            return QColor("#1a7f37" if holding.gain > 0 else "#c62828")
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if column == 0:
            return holding.symbol
        if column == 1:
            return decimal_to_str(holding.quantity)
        if column == 2:
            return format_money(holding.average_cost)
        if column == 3:
            return format_money(holding.price)
        if column == 4:
            return format_money(holding.value)
        gain = holding.gain
        return format_money(gain) if gain is None or gain <= 0 else "+" + format_money(gain)


TradeEditor = Callable[[str, str, str], bool]
"""``editor(trade_id, field, text)`` corrects a trade; False when refused (the app says why)."""


class TradesModel(_ColumnsModel):
    """A portfolio's trades in order; symbol, quantity, price and note are corrected in place."""

    columns = ("Time", "Symbol", "Quantity", "Price", "Note")
    _fields = (None, "symbol", "quantity", "price", "note")

    def __init__(self, editor: TradeEditor) -> None:
        super().__init__()
        self._trades: tuple[Trade, ...] = ()
        self._editor = editor

    def set_trades(self, trades: Sequence[Trade]) -> None:
        self.beginResetModel()
        self._trades = tuple(trades)
        self.endResetModel()

    def trade(self, row: int) -> Trade | None:
        return self._trades[row] if 0 <= row < len(self._trades) else None

    def rowCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self._trades)

    def flags(self, index: _Index) -> Qt.ItemFlag:
        flags = super().flags(index)
        if index.isValid() and self._fields[index.column()] is not None:
            flags |= Qt.ItemFlag.ItemIsEditable
        return flags

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        trade = self.trade(index.row()) if index.isValid() else None
        if trade is None:
            return None
        column = index.column()
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (2, 3):
            return _RIGHT
        if role not in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            return None
        if column == 0:
            return f"{trade.time.astimezone(NYSE.timezone):%Y-%m-%d %H:%M}"  # as the badges
        if column == 1:
            return trade.symbol
        if column == 2:
            return decimal_to_str(trade.quantity)
        if column == 3:
            return decimal_to_str(trade.price)
        return trade.note or ""

    def setData(self, index: _Index, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        trade = self.trade(index.row()) if index.isValid() else None
        field = self._fields[index.column()] if index.isValid() else None
        if trade is None or field is None or role != Qt.ItemDataRole.EditRole:
            return False
        # The correction reaches the model through the client's change notification; until
        # then the cell shows the old value, and a refused one never shows anything else.
        return self._editor(trade.id, field, "" if value is None else str(value))
