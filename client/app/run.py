"""Start the app: a QApplication, a BackgroundClient on Qt's dispatcher, one window.

The window is built from one snapshot of the shown watchlist and portfolio and shown at once;
prices and remote edits fill in as they come, so start-up does not wait for the relay.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QMessageLogContext, QTimer, QtMsgType, qInstallMessageHandler
from PySide6.QtWidgets import QApplication

from foliosync.client.app.main_window import Bridge, MainWindow
from foliosync.client.background import BackgroundClient

__all__ = ["application", "run_app"]


_QT_NOISE = ("This plugin does not support propagateSizeHints()",)


def _qt_messages(kind: QtMsgType, context: QMessageLogContext, message: str) -> None:
    """Qt's own warnings on stderr, less those the offscreen platform prints for every window."""
    if not message.startswith(_QT_NOISE):
        print(message, file=sys.stderr)


def application() -> QApplication:
    """The process's QApplication, created on first use (Qt allows one)."""
    existing = QApplication.instance()
    if isinstance(existing, QApplication):
        return existing
    qInstallMessageHandler(_qt_messages)
    app = QApplication(sys.argv[:1])
    app.setApplicationName("foliosync")
    # Ctrl-C in the terminal quits as in any command (Python sees the signal at the next slot
    # that runs Python code: the windows' one-second timer at the latest).
    signal.signal(signal.SIGINT, lambda *_: app.quit())
    return app


def run_app(
    path: Path,
    server: str | None,
    token: str | None,
    *,
    quit_after: float | None = None,
    on_shown: Callable[[MainWindow], None] | None = None,
) -> int:
    """Run the window until it is closed (or ``quit_after`` seconds); returns the exit status."""
    app = application()
    bridge = Bridge()
    client = BackgroundClient.open(
        path, server, token, dispatcher=bridge.call.emit, client_name="foliosync-app"
    )
    try:
        window = MainWindow(client, title=f"foliosync — {path.name}")
        window.show()
        if on_shown is not None:
            on_shown(window)
        if quit_after is not None:
            QTimer.singleShot(int(quit_after * 1000), app.quit)
        status = app.exec()
        window.detach()
    finally:
        client.close()  # pending changes get a moment to reach the relay; none is lost anyway
    return int(status)
