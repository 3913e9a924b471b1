"""The desktop app: time from process start to the first painted window, with a big watchlist.

Each run is a fresh Python process (``python -m bench.app --child REPLICA``), so that imports,
Qt's start-up and the replica's opening are all paid, as when a person starts the app. The clock
starts in the parent just before the process is spawned and stops at the window's first paint
event (offscreen: Qt paints it as soon as the window is exposed). The replica holds one watchlist
of N symbols, each with a price, and a portfolio of 20 positions, built once beforehand; no relay
is configured, so nothing waits for a network (the window never does: prices and remote edits
fill in after it is shown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from bench.table import Table

__all__ = ["run"]

TARGET_S = 1.0


async def _build(path: Path, symbols: int) -> None:
    from foliosync.client.replica import Replica
    from foliosync.sync.prices import PricePoint

    names = [f"S{i:04d}" for i in range(symbols)]
    now_ms = time.time_ns() // 1_000_000
    async with Replica.open(path) as replica:
        watchlist = await replica.create_watchlist("Big")
        await watchlist.add(names)
        portfolio = await replica.create_portfolio("Main")
        for i, symbol in enumerate(names[:20]):
            await portfolio.add_trade(symbol, "10", f"{100 + i}.25")
        await replica.apply_prices(
            PricePoint(s, Decimal(f"{100 + i % 500}.{i % 100:02d}"), now_ms, 1)
            for i, s in enumerate(names)
        )


def _child(path: Path, started: float) -> None:
    """In the spawned process: open the app's window and report when it first paints."""
    marks = {"python": time.time() - started}
    from PySide6.QtCore import QEvent, QObject
    from PySide6.QtWidgets import QApplication

    from foliosync.client.app.main_window import Bridge, MainWindow
    from foliosync.client.app.run import application
    from foliosync.client.background import BackgroundClient

    marks["imports"] = time.time() - started
    app = application()
    bridge = Bridge()
    client = BackgroundClient.open(path, dispatcher=bridge.call.emit)
    marks["replica open"] = time.time() - started
    window = MainWindow(client, title="bench")
    marks["window built"] = time.time() - started
    rows = window.watchlist_model.rowCount()

    class FirstPaint(QObject):
        def eventFilter(self, watched: QObject, event: QEvent) -> bool:
            if event.type() == QEvent.Type.Paint and "first paint" not in marks:
                marks["first paint"] = time.time() - started
                QApplication.instance().quit()  # type: ignore[union-attr]
            return False

    spy = FirstPaint()
    window.installEventFilter(spy)
    window.show()
    app.exec()
    window.detach()
    client.close()
    print(json.dumps({"rows": rows, **marks}))


def _run_once(path: Path) -> dict[str, float]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "bench.app", "--child", str(path), "--started", repr(started)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the app's start-up run failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(quick: bool) -> list[Table]:
    symbols = 100 if quick else 1000
    runs = 3 if quick else 7
    with tempfile.TemporaryDirectory(prefix="foliosync-bench-app-") as folder:
        path = Path(folder) / "replica.db"
        asyncio.run(_build(path, symbols))
        _run_once(path)  # a warm-up: the OS's file cache, as for a person's second start
        results = [_run_once(path) for _ in range(runs)]
    assert all(r["rows"] == symbols for r in results), results
    table = Table(
        f"App start-up to first paint, watchlist of {symbols:,} symbols (offscreen)",
        ["phase (s since process start)", "median", "max"],
    )
    for phase in ("python", "imports", "replica open", "window built", "first paint"):
        values = [r[phase] for r in results]
        table.add(phase, statistics.median(values), max(values))
    first = statistics.median(r["first paint"] for r in results)
    table.notes.append(
        f"{runs} runs after a warm-up, each a new process; target: first paint under "
        f"{TARGET_S:g} s with 1,000 symbols ({'met' if first < TARGET_S else 'NOT met'}: "
        f"median {first:.3f} s)"
    )
    return [table]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.app")
    parser.add_argument("--child", type=Path, required=True)
    parser.add_argument("--started", type=float, required=True)
    arguments = parser.parse_args()
    _child(arguments.child, arguments.started)
