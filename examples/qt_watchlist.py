"""A Qt window on foliosync: a watchlist's symbols with their prices, a freshness badge, an entry.

python examples/qt_watchlist.py [REPLICA] (FOLIOSYNC_SERVER and FOLIOSYNC_TOKEN to sync; offline
without). FOLIOSYNC_EXAMPLE_SECONDS=N closes it after N seconds; it prints its rows on the way out.
Needs PySide6 (pip install PySide6-Essentials).
"""

import os
import sys
from collections.abc import Callable

from PySide6.QtCore import QObject, QTimer, Signal, Slot
from PySide6.QtWidgets import QApplication, QLabel, QLineEdit, QListWidget, QVBoxLayout, QWidget

from foliosync.client import BackgroundClient
from foliosync.sync.errors import FolioSyncError


class Bridge(QObject):  # emitted from foliosync's thread, run in Qt's: a queued connection
    call = Signal(object)

    @Slot(object)
    def run(self, fn: Callable[[], None]) -> None:
        fn()


app, bridge, window = QApplication(sys.argv), Bridge(), QWidget()
bridge.call.connect(bridge.run)
server, token = os.environ.get("FOLIOSYNC_SERVER"), os.environ.get("FOLIOSYNC_TOKEN")
client = BackgroundClient.open(
    sys.argv[1] if len(sys.argv) > 1 else "replica.db", server, token, dispatcher=bridge.call.emit
)
if "Tech" not in [d.name for d in client.documents()]:
    client.create_watchlist("Tech")
badge, rows, entry, layout = QLabel(), QListWidget(), QLineEdit(), QVBoxLayout(window)
for widget in (badge, rows, entry):
    layout.addWidget(widget)


def refresh(*_: object) -> None:
    watchlist = client.watchlist("Tech")  # a snapshot: plain values, safe to keep
    badge.setText(watchlist.freshness.describe())
    quotes = client.quotes(watchlist.symbols)
    rows.clear()
    for symbol in watchlist.symbols:
        q = quotes.get(symbol)
        rows.addItem(f"{symbol}  {q.price} ({q.freshness().level})" if q else symbol)


def add() -> None:
    try:
        client.add_symbols("Tech", entry.text())
        entry.clear()
    except FolioSyncError as exc:  # an invalid symbol, say
        badge.setText(str(exc))


entry.returnPressed.connect(add)
for subscribe in (client.on_change, client.on_prices, client.on_freshness, client.on_connection):
    subscribe(refresh)
refresh()
window.setWindowTitle("Tech")
window.show()
if seconds := os.environ.get("FOLIOSYNC_EXAMPLE_SECONDS"):
    QTimer.singleShot(int(float(seconds) * 1000), app.quit)
app.exec()
print(badge.text(), *(rows.item(i).text() for i in range(rows.count())), sep="\n")
client.close()  # pending changes get a moment to reach the relay; none is lost either way
