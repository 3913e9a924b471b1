"""pycrdt-websocket's server as its documentation sets it up, for the relay benchmark's comparison.

``python -m bench.relay_pycrdt_server --port P`` serves a :class:`pycrdt.websocket.WebsocketServer`
through its :class:`~pycrdt.websocket.ASGIServer` on Hypercorn, on 127.0.0.1: one room (one
document) per URL path, no store, no authentication. It stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from bench.relay_load import raise_nofile_limit


async def main(port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config
    from pycrdt.websocket import ASGIServer, WebsocketServer
    from pycrdt.websocket.websocket_server import exception_logger

    raise_nofile_limit()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 1024
    config.accesslog = None
    config.loglevel = "WARNING"
    websocket_server = WebsocketServer(exception_handler=exception_logger)
    app = ASGIServer(websocket_server)
    async with websocket_server:
        await serve(app, config, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(main(args.port))
