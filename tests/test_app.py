"""The desktop app: its window on a real relay (Qt offscreen), its badges, and `foliosync demo`.

The relay runs in a thread with its own event loop, as in test_background_client.py: the Qt test
blocks in Qt's loop (qtbot.waitUntil) while the relay must go on serving. A second device is a
BackgroundClient of its own; every check reads what the window's widgets and models show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before any QApplication exists

from PySide6.QtCore import QAbstractItemModel, Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QLineEdit

from foliosync.client import BackgroundClient, Backoff
from foliosync.client.app.badges import (
    Notice,
    format_change,
    format_money,
    holdings,
    market_line,
    pending_line,
    price_badge,
)
from foliosync.client.app.main_window import Bridge, MainWindow
from foliosync.client.quotes import Quote
from foliosync.sync.market import NYSE, Session
from foliosync.sync.model import Position

from .conftest import RelayThread

WAIT = 10.0
WAIT_MS = int(WAIT * 1000)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def relay(tmp_path: Path, helpers: Any) -> Iterator[RelayThread]:
    running = RelayThread(tmp_path / "relay", price_window_ms=0)
    try:
        yield running
    finally:
        running.stop()


class Devices:
    """Opens clients (the app's on a Qt Bridge) and windows; closes them all after the test."""

    def __init__(self, tmp_path: Path, relay: RelayThread | None, qtbot: Any) -> None:
        self.tmp_path, self.relay, self.qtbot = tmp_path, relay, qtbot
        self.clients: list[BackgroundClient] = []
        self.windows: list[MainWindow] = []
        self.bridges: list[Bridge] = []

    def client(self, device: str, *, qt: bool = False, **options: Any) -> BackgroundClient:
        options.setdefault("backoff", Backoff(base=0.05, cap=0.3))
        if qt:
            bridge = Bridge()
            self.bridges.append(bridge)
            options["dispatcher"] = bridge.call.emit
        server = token = None
        if self.relay is not None:
            server, token = self.relay.url, self.relay.token("alice", device)
        client = BackgroundClient.open(self.tmp_path / f"{device}.db", server, token, **options)
        self.clients.append(client)
        return client

    def window(self, device: str = "laptop", **options: Any) -> MainWindow:
        window = MainWindow(self.client(device, qt=True, **options), title=device)
        self.qtbot.addWidget(window)
        window.show()
        self.qtbot.waitExposed(window)
        self.windows.append(window)
        return window

    def close(self) -> None:
        for window in self.windows:
            window.detach()
        for client in self.clients:
            client.close()


@pytest.fixture
def devices(tmp_path: Path, relay: RelayThread, qtbot: Any) -> Iterator[Devices]:
    opened = Devices(tmp_path, relay, qtbot)
    try:
        yield opened
    finally:
        opened.close()


def cell(model: QAbstractItemModel, row: int, column: int, role: int = 0) -> Any:
    return model.data(model.index(row, column), Qt.ItemDataRole(role))


def column_texts(model: QAbstractItemModel, column: int) -> list[str]:
    return [cell(model, row, column) for row in range(model.rowCount())]


def wait_until(check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


def settle(client: BackgroundClient) -> None:
    """Connected, with nothing left pending: what the relay has, the device has."""
    wait_until(lambda: client.health().in_sync and client.health().pending == 0)


def type_and_enter(qtbot: Any, widget: Any, text: str) -> None:
    widget.clear()
    qtbot.keyClicks(widget, text)
    qtbot.keyClick(widget, Qt.Key.Key_Return)


def create_documents(qtbot: Any, window: MainWindow) -> None:
    type_and_enter(qtbot, window.new_watchlist_entry, "Tech")
    type_and_enter(qtbot, window.new_portfolio_entry, "Main")
    assert window.watchlist_picker.currentText() == "Tech"
    assert window.portfolio_picker.currentText() == "Main"


def a_friday_session(now: datetime) -> Session:
    """The last session on a Friday before ``now`` whose weekend has begun."""
    session = NYSE.last_session(now)
    while (
        session.open.astimezone(NYSE.timezone).weekday() != 4
        or session.close + timedelta(days=2) > now
    ):
        session = NYSE.last_session(session.open - timedelta(seconds=1))
    return session


# -- pure: what the badges and figures say -------------------------------------------------------


def quote(symbol: str, price: str, at: datetime, previous_close: str | None = None) -> Quote:
    previous = None if previous_close is None else Decimal(previous_close)
    return Quote(symbol, Decimal(price), int(at.timestamp() * 1000), 1, previous)


def test_a_closing_price_is_not_outdated_on_sunday_but_a_midday_one_is() -> None:
    friday = a_friday_session(datetime(2026, 11, 30, tzinfo=UTC))
    sunday = friday.close + timedelta(days=2)
    closing = price_badge(quote("AAPL", "190", friday.close - timedelta(seconds=30)), sunday)
    assert (closing.text, closing.colour) == ("live", "#1a7f37")
    assert "before the close, market closed until Mon" in closing.detail
    closed_at = (friday.close - timedelta(seconds=30)).astimezone(NYSE.timezone)
    assert closing.updated == f"{closed_at:%a %d %b %H:%M}"  # not today: with its day
    midday = price_badge(quote("AAPL", "190", friday.close - timedelta(hours=2)), sunday)
    assert midday.text == "outdated"
    # The thresholds of sync/freshness.py, in trading time: 1, 5 and 15 minutes.
    taken = friday.open + timedelta(hours=1)
    levels = [
        price_badge(quote("X", "1", taken), taken + timedelta(seconds=s)).text
        for s in (59, 61, 299, 301, 899, 901)
    ]
    assert levels == ["live", "fresh", "fresh", "stale", "stale", "outdated"]


def test_market_line_says_when_it_opens_or_closes() -> None:
    friday = a_friday_session(datetime(2026, 11, 30, tzinfo=UTC))
    closes = friday.close.astimezone(NYSE.timezone)  # 13:00 after Thanksgiving
    assert market_line(friday.open + timedelta(hours=1)) == f"NYSE open · closes {closes:%H:%M} EST"
    saturday = friday.close + timedelta(days=1)
    monday = NYSE.next_open(saturday).astimezone(NYSE.timezone)
    assert market_line(saturday) == f"NYSE closed · opens Mon {monday:%d %b} 09:30 EST"


def test_money_is_exact_and_holdings_are_valued_at_the_last_price() -> None:
    assert format_money(Decimal("187.2575")) == "187.2575"  # never rounded away
    assert format_money(Decimal("1234567.5")) == "1,234,567.50"
    assert format_money(Decimal("-0.5")) == "-0.50"
    assert format_money(None) == "-"
    now = datetime(2026, 11, 30, 15, tzinfo=UTC)
    assert format_change(quote("A", "190.00", now, previous_close="187.50")) == "+2.50 (+1.33%)"
    assert format_change(quote("A", "185", now, previous_close="187.50")) == "-2.50 (-1.33%)"
    assert format_change(quote("A", "185", now)) == ""
    positions = {
        "AAPL": Position("AAPL", Decimal("10"), Decimal("187.25"), Decimal(0)),
        "MSFT": Position("MSFT", Decimal("3"), Decimal("400"), Decimal(0)),
        "GONE": Position("GONE", Decimal("0"), Decimal("5"), Decimal("12")),
    }
    rows = holdings(positions, {"AAPL": quote("AAPL", "190.1", now)})
    assert [(h.symbol, h.value, h.gain) for h in rows] == [
        ("AAPL", Decimal("1901.0"), Decimal("28.50")),
        ("MSFT", None, None),  # no price: no made-up value
    ]
    assert pending_line(0) == "all changes synced"
    assert pending_line(1) == "1 change waiting to sync"
    assert pending_line(3) == "3 changes waiting to sync"


def test_the_cli_never_imports_qt_and_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from foliosync.client.cli import build_parser, main\n"
        "build_parser()\n"
        "assert 'PySide6' not in sys.modules, 'foliosync --help imported Qt'\n"
        "sys.modules['PySide6'] = None  # as if the desktop extra were not installed\n"
        "sys.exit(main(['--db', sys.argv[1], sys.argv[2]]))\n"
    )
    for command in ("app", "demo"):
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "r.db"), command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert 'pip install "foliosync[desktop]"' in done.stderr
        assert "Traceback" not in done.stderr


# -- the window on a real relay ------------------------------------------------------------------


def test_edits_made_in_the_app_reach_a_second_device(devices: Devices, qtbot: Any) -> None:
    window = devices.window("laptop")
    phone = devices.client("phone")
    create_documents(qtbot, window)
    type_and_enter(qtbot, window.symbol_entry, "aapl, MSFT nvda")
    assert window.watchlist_model.symbols == ["AAPL", "MSFT", "NVDA"]
    window.watchlist_view.selectRow(0)
    qtbot.mouseClick(window.down_button, Qt.MouseButton.LeftButton)  # AAPL one down
    assert window.watchlist_model.symbols == ["MSFT", "AAPL", "NVDA"]
    window.watchlist_view.selectRow(2)
    qtbot.mouseClick(window.remove_button, Qt.MouseButton.LeftButton)
    assert column_texts(window.watchlist_model, 0) == ["MSFT", "AAPL"]

    for symbol, quantity, price in (("AAPL", "10", "187.25"), ("MSFT", "4", "400")):
        window.trade_symbol.setText(symbol)
        window.trade_quantity.setText(quantity)
        window.trade_price.setText(price)
        qtbot.mouseClick(window.record_button, Qt.MouseButton.LeftButton)
    assert window.trades_model.rowCount() == 2
    msft = next(r for r in range(2) if cell(window.trades_model, r, 1) == "MSFT")
    # A correction in the table's own editor: the price cell of the MSFT trade.
    price_cell = window.trades_model.index(msft, 3)
    window.trades_view.setCurrentIndex(price_cell)
    window.trades_view.edit(price_cell)
    (editor,) = window.trades_view.viewport().findChildren(QLineEdit)
    editor.selectAll()
    qtbot.keyClicks(editor, "401.5")
    qtbot.keyClick(editor, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: cell(window.trades_model, msft, 3) == "401.5", timeout=WAIT_MS)
    aapl = next(r for r in range(2) if cell(window.trades_model, r, 1) == "AAPL")
    window.trades_view.selectRow(aapl)
    qtbot.mouseClick(window.delete_trade_button, Qt.MouseButton.LeftButton)
    assert column_texts(window.holdings_model, 0) == ["MSFT"]
    assert cell(window.holdings_model, 0, 2) == "401.50"

    wait_until(lambda: "Main" in [d.name for d in phone.documents()])
    wait_until(lambda: phone.watchlist("Tech").symbols == ("MSFT", "AAPL"))
    wait_until(lambda: [t.price for t in phone.portfolio("Main").trades] == [Decimal("401.5")])
    assert window.message_label.text() == ""


def test_bad_input_is_said_in_the_window_and_changes_nothing(devices: Devices, qtbot: Any) -> None:
    window = devices.window("laptop")
    create_documents(qtbot, window)
    type_and_enter(qtbot, window.symbol_entry, "AAPL")
    type_and_enter(qtbot, window.symbol_entry, "$$$ !")
    assert "cannot add" in window.message_label.text()
    assert "symbol" in window.message_label.text().lower()
    assert window.symbol_entry.text() == "$$$ !"  # kept, to be fixed
    assert window.watchlist_model.symbols == ["AAPL"]
    for quantity, price, word in (
        ("10", "1e3", "not a plain decimal number"),
        ("10", "187.25.1", "price"),
        ("10", "-5", "negative"),
        ("ten", "5", "quantity"),
    ):
        window.trade_symbol.setText("AAPL")
        window.trade_quantity.setText(quantity)
        window.trade_price.setText(price)
        qtbot.mouseClick(window.record_button, Qt.MouseButton.LeftButton)
        assert "cannot record the trade" in window.message_label.text()
        assert word in window.message_label.text(), window.message_label.text()
        assert window.trades_model.rowCount() == 0
    window.trade_quantity.setText("10")
    window.trade_price.setText("187.25")
    qtbot.mouseClick(window.record_button, Qt.MouseButton.LeftButton)
    assert window.trades_model.rowCount() == 1
    assert not window.trades_model.setData(window.trades_model.index(0, 2), "0")  # zero quantity
    assert "cannot correct the quantity" in window.message_label.text()
    assert cell(window.trades_model, 0, 2) == "10"
    # The seam for refused changes and revoked shares: told in the same place.
    window.show_notice(Notice("refused", "a change to Tech was refused and rolled back"))
    assert window.message_label.text() == "a change to Tech was refused and rolled back"
    assert window.notices[-1].kind == "refused"


def test_a_remote_edit_and_price_ticks_appear_in_the_app(
    devices: Devices, relay: RelayThread, qtbot: Any
) -> None:
    window = devices.window("laptop")
    phone = devices.client("phone")
    create_documents(qtbot, window)
    type_and_enter(qtbot, window.symbol_entry, "AAPL")
    window.trade_symbol.setText("AAPL")
    window.trade_quantity.setText("10")
    window.trade_price.setText("187.25")
    qtbot.mouseClick(window.record_button, Qt.MouseButton.LeftButton)

    wait_until(lambda: phone.watchlist("Tech").symbols == ("AAPL",))
    phone.add_symbols("Tech", "NVDA")
    qtbot.waitUntil(lambda: window.watchlist_model.symbols == ["AAPL", "NVDA"], timeout=WAIT_MS)

    # A price of two sessions ago, then one now: the change is against the previous close.
    now = datetime.now(tz=UTC)
    before = NYSE.last_session(NYSE.last_session(now).open - timedelta(seconds=1))
    relay.publish("AAPL", "185.00", before.close - timedelta(seconds=30))
    qtbot.waitUntil(lambda: cell(window.watchlist_model, 0, 1) == "185.00", timeout=WAIT_MS)
    relay.publish("AAPL", "190.00")
    qtbot.waitUntil(lambda: cell(window.watchlist_model, 0, 1) == "190.00", timeout=WAIT_MS)
    assert cell(window.watchlist_model, 0, 2) == "+5.00 (+2.70%)"
    assert cell(window.watchlist_model, 0, 3) == "live"
    assert cell(window.watchlist_model, 1, 3) == "no price"
    holdings_model = window.holdings_model
    assert [cell(holdings_model, 0, c) for c in range(6)] == [
        "AAPL",
        "10",
        "187.25",
        "190.00",
        "1,900.00",
        "+27.50",
    ]
    assert window.portfolio_total.text() == "Value 1,900.00 · gain +27.50"
    relay.publish("NVDA", "120.5")
    qtbot.waitUntil(lambda: cell(window.watchlist_model, 1, 1) == "120.50", timeout=WAIT_MS)

    phone.create_watchlist("Energy")  # a new document, named once its content arrives
    picker = window.watchlist_picker

    def names() -> list[str]:
        return [picker.itemText(i) for i in range(picker.count())]

    qtbot.waitUntil(lambda: names() == ["Energy", "Tech"], timeout=WAIT_MS)
    assert picker.currentText() == "Tech"  # the choice kept


def test_connection_state_pending_changes_and_the_offline_switch(
    devices: Devices, qtbot: Any
) -> None:
    window = devices.window("laptop")
    phone = devices.client("phone")
    create_documents(qtbot, window)
    qtbot.waitUntil(lambda: window.connection_label.text().startswith("live"), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.pending_label.text() == "all changes synced", timeout=WAIT_MS)
    wait_until(lambda: "Tech" in [d.name for d in phone.documents()])

    window.offline_switch.click()  # the switch a person clicks
    assert window.client.offline
    qtbot.waitUntil(lambda: window.connection_label.text().startswith("offline"), timeout=WAIT_MS)
    for symbol in ("AAPL", "MSFT", "NVDA"):
        type_and_enter(qtbot, window.symbol_entry, symbol)
    assert window.pending_label.text() == "3 changes waiting to sync"
    assert "3 changes waiting to sync" in window.connection_label.text()
    time.sleep(0.5)
    assert phone.watchlist("Tech").symbols == ()  # nothing left while offline

    window.offline_switch.click()
    assert not window.client.offline
    qtbot.waitUntil(lambda: window.pending_label.text() == "all changes synced", timeout=WAIT_MS)
    # The two labels follow two signals: the pending count can be redrawn first.
    qtbot.waitUntil(lambda: window.connection_label.text().startswith("live"), timeout=WAIT_MS)
    wait_until(lambda: phone.watchlist("Tech").symbols == ("AAPL", "MSFT", "NVDA"))


def test_the_badges_change_as_time_passes(devices: Devices, relay: RelayThread, qtbot: Any) -> None:
    friday = a_friday_session(datetime.now(tz=UTC))
    clock = [(friday.close - timedelta(minutes=20)).timestamp()]
    window = devices.window("laptop", clock=lambda: clock[0])
    create_documents(qtbot, window)
    type_and_enter(qtbot, window.symbol_entry, "AAA BBB")
    relay.publish("AAA", "10", friday.close - timedelta(minutes=20))  # taken mid-session
    relay.publish("BBB", "20", friday.close - timedelta(seconds=30))  # a closing price
    qtbot.waitUntil(lambda: cell(window.watchlist_model, 1, 1) == "20.00", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: cell(window.watchlist_model, 0, 1) == "10.00", timeout=WAIT_MS)

    def badges_at(seconds_after_aaa: float) -> tuple[str, str]:
        clock[0] = (friday.close - timedelta(minutes=20)).timestamp() + seconds_after_aaa
        qtbot.wait(1100)  # one turn of the window's own one-second timer
        return cell(window.watchlist_model, 0, 3), cell(window.watchlist_model, 1, 3)

    assert badges_at(30)[0] == "live"
    closes = friday.close.astimezone(NYSE.timezone)  # 13:00 on an early close
    assert window.market_label.text() == f"NYSE open · closes {closes:%H:%M %Z}"
    taken = (friday.close - timedelta(minutes=20)).astimezone(NYSE.timezone)
    assert cell(window.watchlist_model, 0, 4) == f"{taken:%H:%M:%S}"  # the time of the update
    assert badges_at(3 * 60)[0] == "fresh"
    assert badges_at(10 * 60)[0] == "stale"
    assert cell(window.watchlist_model, 0, 3, Qt.ItemDataRole.ToolTipRole) == "updated 10 min ago"
    sunday = 2 * 86400 + 20 * 60
    assert badges_at(sunday) == ("outdated", "live")  # the close is current all weekend
    assert window.market_label.text().startswith("NYSE closed · opens Mon")
    assert "market closed until Mon" in cell(
        window.watchlist_model, 1, 3, Qt.ItemDataRole.ToolTipRole
    )

    # Documents age in wall time from their last sync: offline, the minutes show.
    qtbot.waitUntil(lambda: window.pending_label.text() == "all changes synced", timeout=WAIT_MS)
    window.offline_switch.click()
    synced = time.time()
    texts = []
    for minutes in (0, 2, 10, 20):
        clock[0] = synced + minutes * 60 + 1
        qtbot.wait(1100)
        texts.append(window.watchlist_badge.text().split(" · ")[0])
    assert texts == ["live", "fresh", "stale", "outdated"]
    assert window.portfolio_badge.text().startswith("outdated · synced 20 min ago")


def test_the_window_renders_for_the_readme(
    devices: Devices, relay: RelayThread, qtbot: Any, tmp_path: Path
) -> None:
    window = devices.window("laptop")
    window.resize(1200, 560)
    create_documents(qtbot, window)
    prices = {
        "AAPL": ("187.25", "190.12"),
        "MSFT": ("402.10", "398.55"),
        "NVDA": ("118.40", "124.90"),
    }
    type_and_enter(qtbot, window.symbol_entry, "AAPL MSFT NVDA GOOGL AMZN BRK.B")
    for symbol, (cost, _) in prices.items():
        window.trade_symbol.setText(symbol)
        window.trade_quantity.setText("10")
        window.trade_price.setText(cost)
        qtbot.mouseClick(window.record_button, Qt.MouseButton.LeftButton)
    # Each symbol's price at the close two sessions ago, then now: the change since that close.
    now = datetime.now(tz=UTC)
    before = NYSE.last_session(NYSE.last_session(now).open - timedelta(seconds=1))
    closes = {"AAPL": "188.40", "MSFT": "401.00", "NVDA": "121.75", "GOOGL": "172.10"}
    for symbol, close in closes.items():
        relay.publish(symbol, close, before.close - timedelta(seconds=30))
    qtbot.waitUntil(lambda: cell(window.watchlist_model, 3, 1) == "172.10", timeout=WAIT_MS)
    for symbol, (_, price) in prices.items():
        relay.publish(symbol, price)
    relay.publish("GOOGL", "171.30")
    qtbot.waitUntil(lambda: cell(window.watchlist_model, 3, 2) == "-0.80 (-0.46%)", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: cell(window.holdings_model, 2, 3) == "124.90", timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.pending_label.text() == "all changes synced", timeout=WAIT_MS)
    # Rendered into the test's folder; FOLIOSYNC_UPDATE_SCREENSHOT=1 writes the README's copy,
    # so that a test run leaves the checkout as it was.
    path = tmp_path / "app.png"
    if os.environ.get("FOLIOSYNC_UPDATE_SCREENSHOT") == "1":
        path = ROOT / "docs" / "app.png"
    assert window.grab().save(str(path), "PNG")
    image = QImage(str(path))
    assert (image.width(), image.height()) == (window.width(), window.height())
    assert path.stat().st_size > 20_000  # text and tables, not a blank frame


def test_without_a_relay_the_app_edits_offline_and_says_so(tmp_path: Path, qtbot: Any) -> None:
    opened = Devices(tmp_path, None, qtbot)
    try:
        window = opened.window("laptop")
        assert not window.offline_switch.isEnabled()  # nothing to switch: always offline
        create_documents(qtbot, window)
        type_and_enter(qtbot, window.symbol_entry, "AAPL MSFT")
        assert window.watchlist_model.symbols == ["AAPL", "MSFT"]
        assert window.connection_label.text().startswith("offline")
        assert window.pending_label.text() == "3 changes waiting to sync"  # two creations, one add
        assert window.watchlist_badge.text().startswith("outdated · never synced · updated never")
    finally:
        opened.close()


def test_foliosync_app_opens_and_closes_and_refuses_half_a_relay(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    env.pop("FOLIOSYNC_SERVER", None)
    env.pop("FOLIOSYNC_TOKEN", None)
    base = [sys.executable, "-m", "foliosync", "--db", str(tmp_path / "r.db"), "app"]
    done = subprocess.run(
        [*base, "--quit-after", "0.5"], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.db").exists()
    half = subprocess.run(
        [*base, "--server", "ws://127.0.0.1:1/ws"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert half.returncode == 1
    assert "needs both --server and --token" in half.stderr


# -- foliosync demo ------------------------------------------------------------------------------


def test_the_demo_comes_up_and_an_offline_edit_converges(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "foliosync", "demo", "--check"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("relay on ws://127.0.0.1:")
    assert "window laptop shown" in lines and "window phone shown" in lines
    steps = [line.split(":")[0] for line in lines[3:]]
    assert steps == [
        "phone has the laptop's watchlist",
        "prices flowing",
        "laptop offline, added TSLA",
        "phone without TSLA while the laptop is offline",
        "converged",
    ], done.stdout
    assert "laptop offline, added TSLA: 1 change waiting to sync" in lines
    folder = lines[0].rsplit("data in ", 1)[1]
    assert not Path(folder).exists()  # the demo leaves nothing behind


def test_the_demo_ends_after_quit_after(tmp_path: Path) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "foliosync", "demo", "--quit-after", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "window phone shown" in done.stdout
    assert time.monotonic() - started < 30


# -- what BackgroundClient gained for the app ----------------------------------------------------


def test_work_offline_stops_the_sync_and_resumes_it(devices: Devices) -> None:
    from foliosync.client.health import ConnectionState
    from foliosync.sync.errors import ConfigError

    laptop, phone = devices.client("laptop"), devices.client("phone")
    laptop.create_watchlist("Tech")
    settle(laptop)
    wait_until(lambda: "Tech" in [d.name for d in phone.documents()])
    laptop.work_offline()
    assert laptop.offline
    assert laptop.health().state is ConnectionState.STOPPED
    laptop.add_symbols("Tech", ["AAPL", "MSFT"])
    assert laptop.health().pending == 1
    time.sleep(0.3)
    assert phone.watchlist("Tech").symbols == ()
    laptop.work_offline()  # again: no change
    laptop.work_offline(False)
    assert not laptop.offline
    settle(laptop)
    wait_until(lambda: phone.watchlist("Tech").symbols == ("AAPL", "MSFT"))
    alone = BackgroundClient.open(devices.tmp_path / "alone.db")
    try:
        with pytest.raises(ConfigError, match="no server"):
            alone.work_offline()
        assert alone.server is None and not alone.offline
    finally:
        alone.close()
    with pytest.raises(ConfigError, match="clock"):
        BackgroundClient.open(devices.tmp_path / "x.db", clock=0)  # type: ignore[arg-type]


def test_the_clock_is_what_freshness_and_health_are_measured_at(devices: Devices) -> None:
    from foliosync.sync.freshness import FreshnessLevel

    clock = [time.time()]
    laptop = devices.client("laptop", clock=lambda: clock[0])
    doc = laptop.create_watchlist("Tech").id
    settle(laptop)
    assert laptop.freshness(doc).level is FreshnessLevel.LIVE
    clock[0] += 3600  # kept in sync: live at any hour
    assert laptop.freshness(doc).level is FreshnessLevel.LIVE
    assert laptop.now() == datetime.fromtimestamp(clock[0], tz=UTC)
    laptop.work_offline()
    clock[0] = time.time() + 6 * 60
    freshness = laptop.freshness(doc)
    assert (freshness.level, freshness.reason) == (FreshnessLevel.STALE, "synced 6 min ago")
    assert abs(laptop.health().at.timestamp() - clock[0]) < 0.002  # to the millisecond
