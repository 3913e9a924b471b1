"""The Qt watchlist window again, for apps that prefer asyncio in Qt's own loop (qasync).

No thread of foliosync's here: qasync makes Qt's event loop the asyncio loop, so the async API's
listeners run in Qt's thread and may touch widgets. pip install PySide6-Essentials qasync; the
rest as qt_watchlist.py (FOLIOSYNC_SERVER, FOLIOSYNC_TOKEN, FOLIOSYNC_EXAMPLE_SECONDS).
"""

import asyncio
import contextlib
import os
import sys

import qasync
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QLabel, QLineEdit, QListWidget, QVBoxLayout, QWidget

from foliosync.client import Replica, SyncClient
from foliosync.sync.errors import FolioSyncError


async def main() -> None:
    app, window, closed = QApplication.instance(), QWidget(), asyncio.Event()
    assert isinstance(app, QApplication)
    app.setQuitOnLastWindowClosed(False)  # leave by our own path: the replica must close
    app.lastWindowClosed.connect(closed.set)
    badge, rows, entry, layout = QLabel(), QListWidget(), QLineEdit(), QVBoxLayout(window)
    for widget in (badge, rows, entry):
        layout.addWidget(widget)
    server, token = os.environ.get("FOLIOSYNC_SERVER"), os.environ.get("FOLIOSYNC_TOKEN")
    async with Replica.open(sys.argv[1] if len(sys.argv) > 1 else "replica.db") as replica:
        if "Tech" not in [d.name for d in replica.documents()]:
            await replica.create_watchlist("Tech")
        tech = await replica.watchlist("Tech")
        sync = SyncClient(replica, server, token) if server and token else None

        def refresh(*_: object) -> None:
            freshness = (sync or replica).freshness(tech.id)
            badge.setText(freshness.describe())
            rows.clear()
            for symbol in tech.symbols:
                q = replica.quotes.get(symbol)
                rows.addItem(f"{symbol}  {q.price} ({q.freshness().level})" if q else symbol)

        @qasync.asyncSlot()
        async def add() -> None:
            try:
                await tech.add(entry.text())
                entry.clear()
            except FolioSyncError as exc:
                badge.setText(str(exc))

        entry.returnPressed.connect(add)
        replica.subscribe(refresh)
        replica.quotes.subscribe(refresh)
        ticker = QTimer(timeout=refresh, interval=1000)  # freshness levels move with time
        ticker.start()
        window.show()
        refresh()
        if seconds := os.environ.get("FOLIOSYNC_EXAMPLE_SECONDS"):
            QTimer.singleShot(int(float(seconds) * 1000), closed.set)
        async with sync or contextlib.nullcontext():
            await closed.wait()
        print(badge.text(), *(rows.item(i).text() for i in range(rows.count())), sep="\n")


qasync.run(main())
