"""The relay as a program: listen, say where once listening, serve until a signal, stop cleanly.

``web.run_app`` would do most of this, but it builds its own runner (so no JSON answer for a
request its parser refuses, see :mod:`foliosync.server.http_errors`) and it leaves a failed bind
as a bare ``OSError`` after the caller has already announced the address. :func:`serve` binds
first, calls ``on_listening`` only then, and turns a failed bind into a :class:`ConfigError` that
says which address is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Callable, Sequence

from aiohttp import web

from foliosync.server.extensions import Extension
from foliosync.server.http_errors import JsonErrorAppRunner
from foliosync.server.relay import RelayConfig, create_app
from foliosync.sync.errors import ConfigError

__all__ = ["listen_failure", "serve"]


def listen_failure(host: str, port: int, exc: OSError) -> str:
    """What to tell an operator whose relay could not listen on ``host:port``."""
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {host!r}: no such host ({exc.strerror})"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another relay or program listens there): "
            "stop it or choose another port with --port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: that address is not one of this machine's"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {port} of {host} (ports below 1024 need privileges)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


async def serve(
    config: RelayConfig,
    *,
    on_listening: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
    extensions: Sequence[Extension] | None = None,
) -> None:
    """Run the relay on ``config.host:config.port`` until SIGINT or SIGTERM (or ``stop``).

    Raises :class:`ConfigError` if the address cannot be listened on; the store and the feed,
    started before the bind, are closed again first. ``extensions`` are those of
    :func:`create_app` (None: the defaults).
    """
    app = create_app(config, extensions=extensions)
    runner = JsonErrorAppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(listen_failure(config.host, config.port, exc)) from exc
        if on_listening is not None:
            on_listening()
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows' loop
                loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)
    finally:
        await runner.cleanup()
