"""The foliosync relay in a process of its own, for the price fan-out benchmark.

``python -m bench.prices_relay PORT DATA_DIR WINDOW [--flush-ms N] [--max-seconds S]`` runs
:func:`create_app` on 127.0.0.1:PORT with ``PricePolicy(window_ms=WINDOW)`` (an int, or ``policy``
for the smart-refresh policy's windows), no price feed of its own (ticks come from the benchmark's
publisher) and a 60 s heartbeat. ``--flush-ms`` sets the price hub's ``flush_interval`` (the least
time between two flushes; 50 ms by default, the window if shorter) once the app has started: an
experiment, not a setting RelayConfig offers. The process stops by itself after ``--max-seconds``
(default 1800).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from bench.prices_load import raise_nofile_limit
from foliosync.server.prices import PricePolicy
from foliosync.server.relay import RelayConfig, RelayKey, create_app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prices_relay")
    parser.add_argument("port", type=int)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("window", help="price_window_ms, or 'policy'")
    parser.add_argument("--flush-ms", type=float)
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    args = parser.parse_args(argv)
    raise_nofile_limit()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    config = RelayConfig(
        host="127.0.0.1",
        port=args.port,
        data_dir=args.data_dir,
        heartbeat=60.0,
        feed="none",
    )
    window = None if args.window == "policy" else int(args.window)
    app = create_app(config, price_policy=PricePolicy(window_ms=window))

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        if args.flush_ms is not None:
            app[RelayKey].prices.flush_interval = args.flush_ms / 1000
        stop = asyncio.get_running_loop().call_later(
            args.max_seconds, os.kill, os.getpid(), signal.SIGTERM
        )
        yield
        stop.cancel()

    app.cleanup_ctx.append(lifetime)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,
        shutdown_timeout=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
