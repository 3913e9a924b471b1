"""The desktop app's window: watchlists and portfolios side by side on one BackgroundClient.

Every edit is a blocking call that returns once committed to the replica file (milliseconds,
offline as well as online), so the window never shows an edit that could still be lost. What
others change, and every price, arrives through the client's notifications, handed to Qt's
thread by a queued signal (:class:`Bridge`). A one-second timer re-measures every badge at the
client's clock, so "live" turns "fresh" on screen when the minute has passed, without a tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from PySide6.QtCore import QObject, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPushButton,
    QSplitter,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from foliosync.client.app.badges import (
    Badge,
    Notice,
    document_badge,
    format_money,
    market_line,
    pending_line,
    plain_number,
)
from foliosync.client.app.models import HoldingsModel, TradesModel, WatchlistModel
from foliosync.client.background import BackgroundClient, FreshnessChange
from foliosync.client.health import SyncHealth
from foliosync.client.quotes import Quote
from foliosync.client.replica import DocumentChange
from foliosync.sync.errors import FolioSyncError
from foliosync.sync.freshness import Freshness
from foliosync.sync.model import DocumentKind

__all__ = ["Bridge", "MainWindow"]

log = logging.getLogger(__name__)

TICK_MS = 1000  # the badges' clock: ages are shown to the second
_ZERO = Decimal(0)


class Bridge(QObject):
    """The client's dispatcher: ``call.emit`` from its thread runs the callback in Qt's."""

    call = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self.call.connect(self.run)

    @Slot(object)
    def run(self, fn: Callable[[], None]) -> None:
        fn()


def _label(name: str, text: str = "") -> QLabel:
    label = QLabel(text)
    label.setObjectName(name)
    return label


def _table(name: str) -> QTableView:
    view = QTableView()
    view.setObjectName(name)
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    view.verticalHeader().setVisible(False)
    view.verticalHeader().setDefaultSectionSize(22)
    view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    view.horizontalHeader().setStretchLastSection(True)
    return view


def _paint_badge(label: QLabel, prefix: str, badge: Badge) -> None:
    label.setText(f"{prefix}{badge.text} · {badge.detail} · updated {badge.updated}")
    label.setStyleSheet(f"color: {badge.colour}; font-weight: bold")


class MainWindow(QMainWindow):
    """Watchlists on the left, portfolios on the right, the connection and the market on top.

    Widgets carry object names (``symbol_entry``, ``offline_switch``, ...) so that tests and
    scripted demos drive the same controls a person clicks.
    """

    def __init__(self, client: BackgroundClient, *, title: str = "foliosync") -> None:
        super().__init__()
        self.client = client
        self.setWindowTitle(title)
        self._watchlist_id: str | None = None
        self._portfolio_id: str | None = None
        self._health: SyncHealth | None = None
        self._dirty: set[str] = set()  # what to reload at the next turn of Qt's loop
        self._unsubscribe: list[Callable[[], None]] = []
        self.notices: list[Notice] = []
        self._build()
        # Subscribed before the first read, so that no change falls between the two: the
        # callbacks queue in Qt's thread and run once this constructor has returned.
        self._subscribe()
        self._reload_documents()
        self._tick()
        self._timer = QTimer(self)
        self._timer.timeout.connect(self._tick)
        self._timer.start(TICK_MS)

    # -- layout ------------------------------------------------------------------------------

    def _build(self) -> None:
        top = QHBoxLayout()
        self.market_label = _label("market_label")
        self.connection_label = _label("connection_label")
        self.pending_label = _label("pending_label")
        self.offline_switch = QCheckBox("Work offline")
        self.offline_switch.setObjectName("offline_switch")
        has_server = self.client.server is not None
        self.offline_switch.setEnabled(has_server)
        self.offline_switch.setToolTip(
            "Stop syncing with the relay; edits wait, pending, and go when switched back"
            if has_server
            else "No relay configured: this replica works offline"
        )
        self.offline_switch.toggled.connect(self._toggle_offline)
        for widget in (self.market_label, self.connection_label, self.pending_label):
            top.addWidget(widget)
            top.addSpacing(16)
        top.addStretch(1)
        top.addWidget(self.offline_switch)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self._build_watchlist_panel())
        splitter.addWidget(self._build_portfolio_panel())
        splitter.setSizes([560, 640])

        self.message_label = _label("message_label")
        self.message_label.setWordWrap(True)
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.addLayout(top)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.message_label)
        self.setCentralWidget(central)
        self.resize(1200, 640)

    def _build_watchlist_panel(self) -> QWidget:
        panel = QWidget()
        layout = QVBoxLayout(panel)
        head = QHBoxLayout()
        self.watchlist_picker = QComboBox()
        self.watchlist_picker.setObjectName("watchlist_picker")
        self.watchlist_picker.currentIndexChanged.connect(self._pick_watchlist)
        self.new_watchlist_entry = QLineEdit()
        self.new_watchlist_entry.setObjectName("new_watchlist_entry")
        self.new_watchlist_entry.setPlaceholderText("new watchlist")
        self.new_watchlist_entry.returnPressed.connect(self.create_watchlist)
        head.addWidget(QLabel("<b>Watchlist</b>"))
        head.addWidget(self.watchlist_picker, 1)
        head.addWidget(self.new_watchlist_entry)
        layout.addLayout(head)
        self.watchlist_badge = _label("watchlist_badge")
        layout.addWidget(self.watchlist_badge)
        self.watchlist_model = WatchlistModel()
        self.watchlist_view = _table("watchlist_view")
        self.watchlist_view.setModel(self.watchlist_model)
        for column, width in enumerate((70, 80, 120, 70, 80)):
            self.watchlist_view.setColumnWidth(column, width)
        layout.addWidget(self.watchlist_view, 1)
        edit = QHBoxLayout()
        self.symbol_entry = QLineEdit()
        self.symbol_entry.setObjectName("symbol_entry")
        self.symbol_entry.setPlaceholderText("symbols to add, e.g. AAPL MSFT")
        self.symbol_entry.returnPressed.connect(self.add_symbols)
        edit.addWidget(self.symbol_entry, 1)
        self.add_button = QPushButton("Add")
        self.remove_button = QPushButton("Remove")
        self.up_button = QPushButton("Up")
        self.down_button = QPushButton("Down")
        self.add_button.clicked.connect(self.add_symbols)
        self.remove_button.clicked.connect(self.remove_selected)
        self.up_button.clicked.connect(lambda: self.move_selected(-1))
        self.down_button.clicked.connect(lambda: self.move_selected(+1))
        for name, button in (
            ("add_button", self.add_button),
            ("remove_button", self.remove_button),
            ("up_button", self.up_button),
            ("down_button", self.down_button),
        ):
            button.setObjectName(name)
            edit.addWidget(button)
        layout.addLayout(edit)
        return panel

    def _build_portfolio_panel(self) -> QWidget:
        panel = QWidget()
        layout = QVBoxLayout(panel)
        head = QHBoxLayout()
        self.portfolio_picker = QComboBox()
        self.portfolio_picker.setObjectName("portfolio_picker")
        self.portfolio_picker.currentIndexChanged.connect(self._pick_portfolio)
        self.new_portfolio_entry = QLineEdit()
        self.new_portfolio_entry.setObjectName("new_portfolio_entry")
        self.new_portfolio_entry.setPlaceholderText("new portfolio")
        self.new_portfolio_entry.returnPressed.connect(self.create_portfolio)
        head.addWidget(QLabel("<b>Portfolio</b>"))
        head.addWidget(self.portfolio_picker, 1)
        head.addWidget(self.new_portfolio_entry)
        layout.addLayout(head)
        self.portfolio_badge = _label("portfolio_badge")
        self.portfolio_total = _label("portfolio_total")
        layout.addWidget(self.portfolio_badge)
        layout.addWidget(self.portfolio_total)
        self.holdings_model = HoldingsModel()
        self.holdings_view = _table("holdings_view")
        self.holdings_view.setModel(self.holdings_model)
        for column, width in enumerate((56, 64, 72, 72, 80, 72, 64)):
            self.holdings_view.setColumnWidth(column, width)
        layout.addWidget(self.holdings_view, 3)
        layout.addWidget(QLabel("Trades, New York time (double-click a cell to correct it)"))
        self.trades_model = TradesModel(self.correct_trade)
        self.trades_view = _table("trades_view")
        self.trades_view.setModel(self.trades_model)
        self.trades_view.setColumnWidth(0, 130)
        layout.addWidget(self.trades_view, 2)
        entry = QHBoxLayout()
        self.trade_symbol = QLineEdit()
        self.trade_quantity = QLineEdit()
        self.trade_price = QLineEdit()
        for widget, name, hint in (
            (self.trade_symbol, "trade_symbol", "symbol"),
            (self.trade_quantity, "trade_quantity", "quantity (negative sells)"),
            (self.trade_price, "trade_price", "price, e.g. 187.25"),
        ):
            widget.setObjectName(name)
            widget.setPlaceholderText(hint)
            widget.returnPressed.connect(self.record_trade)
            entry.addWidget(widget)
        self.record_button = QPushButton("Record trade")
        self.record_button.setObjectName("record_button")
        self.record_button.clicked.connect(self.record_trade)
        self.delete_trade_button = QPushButton("Delete trade")
        self.delete_trade_button.setObjectName("delete_trade_button")
        self.delete_trade_button.clicked.connect(self.delete_selected_trade)
        entry.addWidget(self.record_button)
        entry.addWidget(self.delete_trade_button)
        layout.addLayout(entry)
        return panel

    # -- notifications (run in Qt's thread by the Bridge) ------------------------------------

    def _subscribe(self) -> None:
        client = self.client
        self._unsubscribe = [
            client.on_change(self._on_change),
            client.on_prices(self._on_prices),
            client.on_freshness(self._on_freshness),
            client.on_connection(self._on_connection),
        ]

    def _on_change(self, change: DocumentChange) -> None:
        if change.kind is DocumentKind.INDEX:
            self._mark("documents")
        elif change.doc_id == self._watchlist_id:
            self._mark("watchlist")
        elif change.doc_id == self._portfolio_id:
            self._mark("portfolio")
        else:  # another document: its name may have arrived only now (a first sync)
            self._mark("names")
        self._mark("health")  # the pending count moved

    def _on_prices(self, quotes: tuple[Quote, ...]) -> None:
        self.watchlist_model.update_quotes(quotes)
        self.holdings_model.update_quotes(quotes)
        if any(self.holdings_model.quote(q.symbol) is q for q in quotes):
            self._show_total()

    def _on_freshness(self, change: FreshnessChange) -> None:
        if change.subject == "document":
            self._mark("badges")

    def _on_connection(self, health: SyncHealth) -> None:
        self._show_health(health)

    def show_notice(self, notice: Notice) -> None:
        """Tell the user of a change refused and rolled back, or of a share revoked.

        The seam for those events: once the client raises them, an ``on_refused`` /
        ``on_revoked`` subscription calls this, and the documents are reloaded with it.
        """
        self.notices.append(notice)
        self._say(notice.text, error=notice.kind != "info")
        self._mark("documents")

    def _mark(self, what: str) -> None:
        """Coalesce reloads: a burst of remote changes costs one reload, in the next turn."""
        if not self._dirty:
            QTimer.singleShot(0, self._flush)
        self._dirty.add(what)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if self.client.closed:
            return
        try:
            if "documents" in dirty:
                self._reload_documents()  # reloads both documents too
            else:
                if "watchlist" in dirty:
                    self._reload_watchlist()
                if "portfolio" in dirty:
                    self._reload_portfolio()
                if dirty & {"names", "watchlist", "portfolio"}:
                    self._refresh_names()
                if "badges" in dirty:
                    self._show_document_badges(self.client.now())
            if "health" in dirty:
                self._show_health(self.client.health())
        except FolioSyncError as exc:
            self._say(str(exc), error=True)

    # -- reading -----------------------------------------------------------------------------

    def _reload_documents(self) -> None:
        docs = self.client.documents()
        for picker, kind, current in (
            (self.watchlist_picker, DocumentKind.WATCHLIST, self._watchlist_id),
            (self.portfolio_picker, DocumentKind.PORTFOLIO, self._portfolio_id),
        ):
            wanted = [d for d in docs if d.kind is kind]
            picker.blockSignals(True)
            picker.clear()
            for doc in wanted:
                picker.addItem(doc.name, doc.id)
            ids = [d.id for d in wanted]
            picker.setCurrentIndex(ids.index(current) if current in ids else (0 if ids else -1))
            picker.blockSignals(False)
        self._watchlist_id = self.watchlist_picker.currentData()
        self._portfolio_id = self.portfolio_picker.currentData()
        self._reload_watchlist()
        self._reload_portfolio()

    def _refresh_names(self) -> None:
        """The pickers' names as the documents now have them, the choice kept.

        A document first listed by the index has no name until its own content arrives; this
        is what shows that name then.
        """
        names = {d.id: d.name for d in self.client.documents()}
        for picker in (self.watchlist_picker, self.portfolio_picker):
            ids = [picker.itemData(i) for i in range(picker.count())]
            if set(names).issuperset(ids) and any(
                picker.itemText(i) != names[doc_id] for i, doc_id in enumerate(ids)
            ):
                for i, doc_id in enumerate(ids):
                    picker.setItemText(i, names[doc_id])

    def _reload_watchlist(self) -> None:
        now = self.client.now()
        if self._watchlist_id is None:
            self.watchlist_model.set_entries((), {}, now)
            self.watchlist_badge.setText("No watchlist yet: name one above to create it")
            self.watchlist_badge.setStyleSheet("")
            return
        snapshot = self.client.watchlist(self._watchlist_id)
        self.watchlist_model.set_entries(
            snapshot.entries, self.client.quotes(snapshot.symbols), now
        )
        self._paint_document(self.watchlist_badge, snapshot.freshness, now)

    def _reload_portfolio(self) -> None:
        now = self.client.now()
        if self._portfolio_id is None:
            self.holdings_model.set_positions({}, {}, now)
            self.trades_model.set_trades(())
            self.portfolio_badge.setText("No portfolio yet: name one above to create it")
            self.portfolio_badge.setStyleSheet("")
            self.portfolio_total.setText("")
            return
        snapshot = self.client.portfolio(self._portfolio_id)
        self.holdings_model.set_positions(
            snapshot.positions, self.client.quotes(list(snapshot.positions)), now
        )
        self.trades_model.set_trades(snapshot.trades)
        self._paint_document(self.portfolio_badge, snapshot.freshness, now)
        self._show_total()

    def _show_total(self) -> None:
        rows = self.holdings_model.holdings
        priced = [h for h in rows if h.value is not None and h.gain is not None]
        value = sum((h.value for h in priced if h.value is not None), start=_ZERO)
        gain = sum((h.gain for h in priced if h.gain is not None), start=_ZERO)
        missing = len(rows) - len(priced)
        text = f"Value {format_money(value)} · gain {'+' if gain > 0 else ''}{format_money(gain)}"
        if missing:
            text += f" · {missing} without a price"
        self.portfolio_total.setText(text)

    def _paint_document(self, label: QLabel, freshness: Freshness, now: datetime) -> None:
        last = None if freshness.age is None else now - freshness.age
        _paint_badge(label, "", document_badge(freshness, last, now))

    def _show_document_badges(self, now: datetime) -> None:
        for doc_id, label in (
            (self._watchlist_id, self.watchlist_badge),
            (self._portfolio_id, self.portfolio_badge),
        ):
            if doc_id is not None:
                self._paint_document(label, self.client.freshness(doc_id), now)

    def _show_health(self, health: SyncHealth) -> None:
        self._health = health
        self.connection_label.setText(health.describe())
        self.pending_label.setText(pending_line(health.pending))
        self.offline_switch.blockSignals(True)
        self.offline_switch.setChecked(self.client.offline)
        self.offline_switch.blockSignals(False)

    def _tick(self) -> None:
        """Once a second: the market line, every badge and the status line, at the clock."""
        if self.client.closed:
            return
        try:
            now = self.client.now()
            self.market_label.setText(market_line(now))
            self.watchlist_model.set_now(now)
            self.holdings_model.set_now(now)
            self._show_document_badges(now)
            self._show_health(self.client.health())
        except FolioSyncError as exc:
            self._say(str(exc), error=True)

    # -- edits (each committed before it returns, online or not) ------------------------------

    def _say(self, text: str, *, error: bool = False) -> None:
        self.message_label.setText(text)
        self.message_label.setStyleSheet("color: #c62828" if error else "")

    def _attempt(self, what: str, edit: Callable[[], object]) -> bool:
        """Run an edit; a refusal (an invalid symbol, a float-looking price) is said, not raised."""
        try:
            edit()
        except FolioSyncError as exc:
            self._say(f"{what}: {exc}", error=True)
            return False
        self._say("")
        self._show_health(self.client.health())  # the pending count, at once
        return True

    def create_watchlist(self) -> None:
        name = self.new_watchlist_entry.text().strip()
        if not name:
            return
        if self._attempt("cannot create the watchlist", lambda: self._create("watchlist", name)):
            self.new_watchlist_entry.clear()

    def create_portfolio(self) -> None:
        name = self.new_portfolio_entry.text().strip()
        if not name:
            return
        if self._attempt("cannot create the portfolio", lambda: self._create("portfolio", name)):
            self.new_portfolio_entry.clear()

    def _create(self, kind: str, name: str) -> None:
        if kind == "watchlist":
            self._watchlist_id = self.client.create_watchlist(name).id
        else:
            self._portfolio_id = self.client.create_portfolio(name).id
        self._reload_documents()

    def add_symbols(self) -> None:
        symbols = self.symbol_entry.text().replace(",", " ").split()
        if not symbols:
            return
        if self._watchlist_id is None:
            self._say("create a watchlist first (name it above)", error=True)
            return
        watchlist = self._watchlist_id
        if self._attempt("cannot add", lambda: self.client.add_symbols(watchlist, symbols)):
            self.symbol_entry.clear()
            self._reload_watchlist()

    def selected_symbol(self) -> str | None:
        rows = self.watchlist_view.selectionModel().selectedRows()
        symbols = self.watchlist_model.symbols
        return symbols[rows[0].row()] if rows and rows[0].row() < len(symbols) else None

    def remove_selected(self) -> None:
        symbol, watchlist = self.selected_symbol(), self._watchlist_id
        if symbol is None or watchlist is None:
            self._say("select a symbol to remove", error=True)
            return
        if self._attempt("cannot remove", lambda: self.client.remove_symbols(watchlist, symbol)):
            self._reload_watchlist()

    def move_selected(self, step: int) -> None:
        symbol, watchlist = self.selected_symbol(), self._watchlist_id
        if symbol is None or watchlist is None:
            self._say("select a symbol to move", error=True)
            return
        index = self.watchlist_model.symbols.index(symbol) + step
        if not 0 <= index < len(self.watchlist_model.symbols):
            return
        if self._attempt("cannot move", lambda: self.client.move_symbol(watchlist, symbol, index)):
            self._reload_watchlist()
            self.watchlist_view.selectRow(index)

    def record_trade(self) -> None:
        portfolio = self._portfolio_id
        if portfolio is None:
            self._say("create a portfolio first (name it above)", error=True)
            return
        symbol = self.trade_symbol.text().strip()
        quantity = self.trade_quantity.text().strip()
        price = self.trade_price.text().strip()
        if not (symbol and quantity and price):
            self._say("a trade needs a symbol, a quantity and a price", error=True)
            return

        def record() -> None:
            typed_quantity = plain_number(quantity, "quantity")
            typed_price = plain_number(price, "price")
            self.client.add_trade(portfolio, symbol, typed_quantity, typed_price)

        if self._attempt("cannot record the trade", record):
            for widget in (self.trade_symbol, self.trade_quantity, self.trade_price):
                widget.clear()
            self._reload_portfolio()

    def correct_trade(self, trade_id: str, field: str, text: str) -> bool:
        portfolio = self._portfolio_id
        if portfolio is None:
            return False

        def correct() -> None:
            value: object = (text.strip() or None) if field == "note" else text.strip()
            if field in ("quantity", "price"):
                value = plain_number(text, field)
            self.client.correct_trade(portfolio, trade_id, **{field: value})

        ok = self._attempt(f"cannot correct the {field}", correct)
        if ok:
            self._mark("portfolio")  # after the editor has closed: no reset under its feet
        return ok

    def delete_selected_trade(self) -> None:
        rows = self.trades_view.selectionModel().selectedRows()
        trade = self.trades_model.trade(rows[0].row()) if rows else None
        portfolio = self._portfolio_id
        if trade is None or portfolio is None:
            self._say("select a trade to delete", error=True)
            return
        trade_id = trade.id
        if self._attempt("cannot delete", lambda: self.client.delete_trade(portfolio, trade_id)):
            self._reload_portfolio()

    def _toggle_offline(self, offline: bool) -> None:
        self._attempt("cannot switch", lambda: self.client.work_offline(offline))
        self._show_health(self.client.health())

    def _pick_watchlist(self, index: int) -> None:
        self._watchlist_id = self.watchlist_picker.itemData(index)
        self._attempt("cannot open the watchlist", self._reload_watchlist)

    def _pick_portfolio(self, index: int) -> None:
        self._portfolio_id = self.portfolio_picker.itemData(index)
        self._attempt("cannot open the portfolio", self._reload_portfolio)

    # -- closing -----------------------------------------------------------------------------

    def detach(self) -> None:
        """Stop listening to the client (it is closed by whoever opened it)."""
        self._timer.stop()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    def closeEvent(self, event: QCloseEvent) -> None:
        self.detach()
        super().closeEvent(event)
