"""``foliosync app`` (the desktop window) and ``foliosync demo`` (a relay and two windows).

Qt is imported only once one of them runs, so that the rest of the CLI works without the
``desktop`` extra; without it, both say how to install it and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from foliosync.client.cli_common import replica_path, timer_seconds
from foliosync.sync.errors import ConfigError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    app = subparsers.add_parser(
        "app",
        help="open the desktop app (needs foliosync[desktop])",
        description=(
            "Watchlists and portfolios side by side, with live prices and freshness badges, "
            "editable offline. Syncs with --server/--token, else $FOLIOSYNC_SERVER and "
            "$FOLIOSYNC_TOKEN, else the relay the replica last synced with; offline without."
        ),
    )
    app.add_argument("--server", metavar="URL", help="relay URL (ws://HOST:PORT/ws)")
    app.add_argument("--token", help="token from `foliosync token USER --device NAME`")
    app.add_argument(
        "--quit-after", metavar="SECONDS", type=timer_seconds, help="close the window after SECONDS"
    )
    app.set_defaults(handler=_run_app)

    demo = subparsers.add_parser(
        "demo",
        help="a relay with simulated prices and two app windows (one user, two devices)",
        description=(
            "Start a relay with simulated prices on 127.0.0.1 and two app windows, the laptop "
            "and the phone of one user, each with a 'Work offline' switch. Everything lives in "
            "a temporary folder, removed on exit. Closing both windows ends it."
        ),
    )
    demo.add_argument(
        "--port", type=int, default=0, help="the relay's port (default: any free one)"
    )
    demo.add_argument(
        "--quit-after", metavar="SECONDS", type=timer_seconds, help="end the demo after SECONDS"
    )
    demo.add_argument(
        "--check",
        action="store_true",
        help="play the scenario by itself (laptop offline, an edit, back online, the phone "
        "converges), print each step and quit: 0 if it converged; works without a display",
    )
    demo.set_defaults(handler=_run_demo)


def _need_display(offscreen_ok: bool) -> None:
    """Qt aborts the process without a display; say so first, or draw offscreen if that will do."""
    if os.environ.get("QT_QPA_PLATFORM") or not sys.platform.startswith("linux"):
        return
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    if offscreen_ok:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return
    raise ConfigError(
        "no display to open a window on: set DISPLAY (or run under xvfb-run), "
        "or QT_QPA_PLATFORM=offscreen to draw without one"
    )


def _remembered(path: Path) -> tuple[str | None, str | None]:
    """The relay and token the replica last synced with (`foliosync sync` remembers them)."""
    if not path.exists():
        return None, None
    from foliosync.client.replica import Replica

    async def read() -> tuple[str | None, str | None]:
        async with Replica.open(path) as replica:
            meta = replica.meta
            return meta.get("server_url"), meta.get("token")

    return asyncio.run(read())


def _run_app(args: argparse.Namespace) -> int:
    from foliosync.client.app import require_qt

    require_qt()
    _need_display(offscreen_ok=args.quit_after is not None)
    path = replica_path(args)
    server = args.server or os.environ.get("FOLIOSYNC_SERVER")
    token = args.token or os.environ.get("FOLIOSYNC_TOKEN")
    if server is None or token is None:  # as `foliosync sync` does: flags, environment, memory
        remembered_server, remembered_token = _remembered(path)
        server, token = server or remembered_server, token or remembered_token
    if (server is None) != (token is None):
        raise ConfigError("a relay needs both --server and --token (or neither, to work offline)")
    path.parent.mkdir(parents=True, exist_ok=True)
    from foliosync.client.app.run import run_app

    return run_app(path, server, token, quit_after=args.quit_after)


def _run_demo(args: argparse.Namespace) -> int:
    from foliosync.client.app import require_qt

    require_qt()
    if not 0 <= args.port < 65536:
        raise ConfigError(f"invalid port {args.port}")
    _need_display(offscreen_ok=args.check)
    from foliosync.client.app.demo import run_demo

    def say(line: str) -> None:
        print(line, flush=True)

    return run_demo(port=args.port, quit_after=args.quit_after, check=args.check, say=say)
