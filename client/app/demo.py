"""``foliosync demo``: a relay with simulated prices and two app windows, one user's two devices.

Everything lives in a fresh temporary folder (the relay's store and secret, each device's
replica), removed on the way out, so the demo touches nothing of the user's. The simulated feed
moves prices at any hour (``sim:always``), so prices flow on a Sunday night too. Each window has
its own "work offline" switch: edit in one while it is offline, switch it back, and watch the
other converge.

``--check`` plays that scenario by itself through the windows' own controls and prints what it
saw, one line per step, then quits: a scripted proof that the demo works on this machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QTimer

from foliosync.client.app.main_window import Bridge, MainWindow
from foliosync.client.app.run import application
from foliosync.client.background import BackgroundClient
from foliosync.sync.errors import ConfigError, FolioSyncError

__all__ = ["DEMO_SYMBOLS", "DemoRelay", "run_demo"]

DEMO_SYMBOLS = ("AAPL", "MSFT", "NVDA", "GOOGL", "AMZN", "BRK.B")
DEMO_TRADES = (("AAPL", "10", "187.25"), ("MSFT", "5", "402.10"), ("NVDA", "12", "118.40"))
_START_TIMEOUT = 10.0
_CHECK_SYMBOL = "TSLA"


class DemoRelay:
    """A relay on 127.0.0.1 served by an event loop in a thread of its own, for the demo.

    Its own thread, so that Qt's loop in the main thread and the relay never wait on each
    other. ``port=0`` takes any free port (the default: a demo must not fight a real relay).
    """

    def __init__(self, data_dir: Path, *, port: int = 0, feed: str = "sim:always") -> None:
        self._data_dir = data_dir
        self._port = port
        self._feed = feed
        self._runner = asyncio.Runner()
        self._started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="foliosync-demo-relay", daemon=True)
        self._thread.start()
        try:
            self.port = self._started.result(_START_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise ConfigError("the demo relay did not start within 10 s") from None
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def _run(self) -> None:
        try:
            self._runner.run(self._serve())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
        finally:
            with contextlib.suppress(Exception):
                self._runner.close()

    async def _serve(self) -> None:
        from aiohttp import web

        from foliosync.server.auth import load_or_create_secret
        from foliosync.server.http_errors import JsonErrorAppRunner
        from foliosync.server.relay import RelayConfig, create_app

        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        config = RelayConfig(data_dir=self._data_dir, port=self._port, feed=self._feed)
        self.secret = load_or_create_secret(self._data_dir)
        runner = JsonErrorAppRunner(create_app(config), handle_signals=False, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self._port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    f"the demo relay cannot listen on port {self._port}: {exc}"
                ) from exc
            server = site._server
            assert server is not None
            port: int = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            self._started.set_result(port)
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def token(self, user: str, device: str) -> str:
        from foliosync.server.auth import issue_token

        return issue_token(self.secret, user, device=device)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_START_TIMEOUT)


def _seed(client: BackgroundClient) -> None:
    """The laptop's documents at the start: a watchlist and a portfolio with a few trades."""
    client.create_watchlist("Tech")
    client.add_symbols("Tech", DEMO_SYMBOLS)
    client.create_portfolio("Main")
    for symbol, quantity, price in DEMO_TRADES:
        client.add_trade("Main", symbol, quantity, price)


class _Check:
    """The scripted scenario of ``--check``: offline edit on the laptop, convergence on the phone.

    Driven by a Qt timer, step by step, through the widgets (the offline switch, the symbol
    entry, the Add button), so that what it proves is what a person would see.
    """

    def __init__(
        self,
        laptop: MainWindow,
        phone: MainWindow,
        say: Callable[[str], None],
        done: Callable[[int], None],
    ) -> None:
        self.laptop, self.phone, self.say, self.done = laptop, phone, say, done
        self.started = time.monotonic()
        self.step = "synced"
        self.step_started = self.started
        self.timer = QTimer()
        self.timer.timeout.connect(self.poll)
        self.timer.start(50)

    def fail(self, why: str) -> None:
        self.say(f"check failed: {why}")
        self.timer.stop()
        self.done(1)

    def poll(self) -> None:
        try:
            self._poll()
        except FolioSyncError as exc:
            self.fail(str(exc))

    def _poll(self) -> None:
        now = time.monotonic()
        if now - self.step_started > 30:
            phone = self.phone
            self.fail(
                f"stuck at step {self.step!r} for 30 s; the phone shows {_items(phone)}, "
                f"{phone.watchlist_model.symbols}, {phone.connection_label.text()!r}, "
                f"{phone.message_label.text()!r}"
            )
            return
        laptop, phone = self.laptop, self.phone
        if self.step == "synced":
            if "Tech" in _items(phone) and phone.watchlist_model.rowCount() == len(DEMO_SYMBOLS):
                self.say(
                    f"phone has the laptop's watchlist: {' '.join(phone.watchlist_model.symbols)}"
                )
                self._next("prices")
        elif self.step == "prices":
            priced = [s for s in DEMO_SYMBOLS if phone.watchlist_model.quote(s) is not None]
            if len(priced) == len(DEMO_SYMBOLS):
                sample = phone.watchlist_model.quote(DEMO_SYMBOLS[0])
                assert sample is not None
                self.say(f"prices flowing: {DEMO_SYMBOLS[0]} {sample.price} on the phone")
                laptop.offline_switch.setChecked(True)  # the switch itself, as clicked
                self._next("offline")
        elif self.step == "offline":
            if laptop.client.offline and "offline" in laptop.connection_label.text():
                laptop.symbol_entry.setText(_CHECK_SYMBOL)
                laptop.add_button.click()
                if _CHECK_SYMBOL not in laptop.watchlist_model.symbols:
                    self.fail(f"the laptop refused {_CHECK_SYMBOL}: {laptop.message_label.text()}")
                    return
                self.say(f"laptop offline, added {_CHECK_SYMBOL}: {laptop.pending_label.text()}")
                self.offline_since = now
                self._next("apart")
        elif self.step == "apart":
            if _CHECK_SYMBOL in phone.watchlist_model.symbols:
                self.fail("the phone saw an edit made offline before the laptop went online")
            elif now - self.offline_since > 1.0:
                self.say(f"phone without {_CHECK_SYMBOL} while the laptop is offline")
                laptop.offline_switch.setChecked(False)
                self.online_at = now
                self._next("converge")
        elif self.step == "converge" and _CHECK_SYMBOL in phone.watchlist_model.symbols:
            self.say(
                f"converged: the phone shows {_CHECK_SYMBOL} {now - self.online_at:.1f} s after "
                "the laptop went back online"
            )
            self.timer.stop()
            self.done(0)

    def _next(self, step: str) -> None:
        self.step, self.step_started = step, time.monotonic()


def _items(window: MainWindow) -> list[str]:
    picker = window.watchlist_picker
    return [picker.itemText(i) for i in range(picker.count())]


def run_demo(
    *,
    port: int = 0,
    quit_after: float | None = None,
    check: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Run the demo until both windows are closed (or ``quit_after`` s, or the check ends)."""
    app = application()
    with tempfile.TemporaryDirectory(prefix="foliosync-demo-") as folder:
        root = Path(folder)
        relay = DemoRelay(root / "relay", port=port)
        say(f"relay on {relay.url} with simulated prices; data in {root}")
        clients: list[BackgroundClient] = []
        windows: list[MainWindow] = []
        bridges: list[Bridge] = []
        status = 0
        try:
            for device in ("laptop", "phone"):
                bridge = Bridge()
                client = BackgroundClient.open(
                    root / f"{device}.db",
                    relay.url,
                    relay.token("demo", device),
                    dispatcher=bridge.call.emit,
                    client_name=f"foliosync-demo-{device}",
                )
                bridges.append(bridge)  # alive as long as its client's callbacks
                clients.append(client)
                if device == "laptop":
                    _seed(client)
                window = MainWindow(client, title=f"foliosync demo — {device}")
                window.move(40 + 620 * len(windows), 60)
                window.resize(1000, 600)
                window.show()
                windows.append(window)
                say(f"window {device} shown")
            result: dict[str, int] = {}

            def done(code: int) -> None:
                result["status"] = code
                app.quit()

            checker = _Check(windows[0], windows[1], say, done) if check else None
            if quit_after is not None:
                QTimer.singleShot(int(quit_after * 1000), app.quit)
            app.setQuitOnLastWindowClosed(True)
            app.exec()
            del checker
            status = result.get("status", 1 if check else 0)
        finally:
            for window in windows:
                window.detach()
                window.close()
            for client in clients:
                with contextlib.suppress(FolioSyncError):
                    client.close()
            relay.stop()
    return status
