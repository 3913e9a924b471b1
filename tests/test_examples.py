"""The desktop examples, run as a user runs them, against a real relay on 127.0.0.1.

Each example is a window on a watchlist that a phone made: it must show the phone's symbols with
the relay's price, take a symbol the phone adds while it runs, and say it is live. Tk runs under
Xvfb, Qt on its offscreen platform (with foliosync's thread, and with asyncio in Qt's loop through
qasync); each closes by itself (``FOLIOSYNC_EXAMPLE_SECONDS``) and
print their rows. A machine without Tk, Xvfb or PySide6 fails here with what to install: these
are examples the README promises, not optional extras.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from foliosync.client import Replica, SyncClient
from foliosync.sync.prices import check_tick

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECONDS = 5


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not importable by {sys.executable}: {install}")


async def _phone_edit(relay: Any, phone: Path, *symbols: str) -> None:
    async with Replica.open(phone) as replica:
        if not replica.documents():
            await replica.create_watchlist("Tech")
        await (await replica.watchlist("Tech")).add(list(symbols))
        await SyncClient(replica, relay.url, relay.token("alice", "phone")).sync_once(10)


async def _run_example(
    command: list[str], tmp_path: Path, relay_server: Any, helpers: Any, env: dict[str, str]
) -> list[str]:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        await _phone_edit(relay, tmp_path / "phone.db", "AAPL")
        now = time.time_ns() // 1_000_000
        relay.relay.prices.publish(
            [check_tick({"symbol": "AAPL", "price": "187.5", "time_ms": now}, now)]
        )
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
        full_env.update(
            env,
            FOLIOSYNC_SERVER=relay.url,
            FOLIOSYNC_TOKEN=relay.token("alice", "desk"),
            FOLIOSYNC_EXAMPLE_SECONDS=str(SECONDS),
        )
        process = await asyncio.create_subprocess_exec(
            *command,
            str(tmp_path / "desk.db"),
            env=full_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            # Once the window's client follows AAPL it is connected and synced: edit meanwhile.
            await helpers.eventually(
                lambda: "AAPL" in relay.relay.prices.subscribed_symbols(), timeout=SECONDS
            )
            await _phone_edit(relay, tmp_path / "phone.db", "MSFT")
            out, err = await asyncio.wait_for(process.communicate(), SECONDS + 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0, err.decode()
    assert "Traceback" not in err.decode(), err.decode()
    return out.decode().splitlines()


def _check_rows(lines: list[str]) -> None:
    badge, *rows = lines
    assert badge.startswith("live — "), lines  # connected and in sync
    assert any(row.startswith("AAPL  187.5 (") for row in rows), lines  # the relay's price...
    assert any(row.split()[-1] in {"(live)", "(fresh)", "(stale)", "(outdated)"} for row in rows)
    assert any(row.startswith("MSFT") for row in rows), lines  # ...and the phone's later edit


async def test_the_tk_example_shows_the_watchlist_live(
    tmp_path: Path, relay_server: Any, helpers: Any
) -> None:
    _require(
        "tkinter",
        "this Python was built without Tk (Debian: apt-get install tk-dev, then rebuild it; "
        "the system's python3 needs python3-tk)",
    )
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        pytest.fail("xvfb-run is missing: apt-get install xvfb xauth (Debian)")
    command = [xvfb, "-a", sys.executable, str(EXAMPLES / "tk_watchlist.py")]
    _check_rows(await _run_example(command, tmp_path, relay_server, helpers, {}))


async def test_the_qt_example_shows_the_watchlist_live(
    tmp_path: Path, relay_server: Any, helpers: Any
) -> None:
    _require("PySide6", "pip install PySide6-Essentials")
    command = [sys.executable, str(EXAMPLES / "qt_watchlist.py")]
    lines = await _run_example(
        command, tmp_path, relay_server, helpers, {"QT_QPA_PLATFORM": "offscreen"}
    )
    _check_rows(lines)


async def test_the_qasync_example_shows_the_watchlist_live(
    tmp_path: Path, relay_server: Any, helpers: Any
) -> None:
    """The same window with asyncio in Qt's loop: the README's note for such apps."""
    _require("PySide6", "pip install PySide6-Essentials")
    _require("qasync", "pip install qasync")
    command = [sys.executable, str(EXAMPLES / "qt_asyncio_watchlist.py")]
    lines = await _run_example(
        command, tmp_path, relay_server, helpers, {"QT_QPA_PLATFORM": "offscreen"}
    )
    _check_rows(lines)


def test_the_examples_are_about_thirty_lines() -> None:
    for name in ("tk_watchlist.py", "qt_watchlist.py", "qt_asyncio_watchlist.py"):
        text = (EXAMPLES / name).read_text()
        code = [line for line in text.split('"""', 2)[2].splitlines() if line.strip()]
        assert len(code) <= 50, (name, len(code))
        assert "FOLIOSYNC_EXAMPLE_SECONDS" in text
