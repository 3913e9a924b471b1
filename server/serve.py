"""The relay as a program: listen, say where once listening, serve until a signal, stop cleanly.

``web.run_app`` would do most of this, but it builds its own runner (so no JSON answer for a
request its parser refuses, see :mod:`foliosync.server.http_errors`) and it leaves a failed bind
as a bare ``OSError`` after the caller has already announced the address. :func:`serve` binds
first, calls ``on_listening`` only then, and turns a failed bind into a :class:`ConfigError` that
says which address is taken. The socket is bound before the app starts, so a taken port stops
the relay before its store is opened or its price feed has started (no feed line, then an error).

``reuse_port`` binds with ``SO_REUSEPORT``: several relay processes on one machine then listen on
one port and the kernel spreads new connections over them (one core each). It only makes sense
with a shared store and bus (``--store postgresql://...``, ``--redis``): see
:mod:`foliosync.server.redis_fanout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from foliosync.server.extensions import Extension
from foliosync.server.http_errors import JsonErrorAppRunner
from foliosync.server.relay import RelayConfig, create_app
from foliosync.server.storage import RelayStore
from foliosync.sync.errors import ConfigError

__all__ = ["bind_socket", "listen_failure", "serve", "tls_server_context"]


def tls_server_context(cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """The TLS context the relay serves wss:// and https:// with: ``cert`` (PEM, the chain the
    clients verify, leaf first) and its private ``key`` (PEM, unencrypted: the relay starts
    unattended). TLS 1.2 at least. A missing, unreadable or mismatched file is a ConfigError that
    names it, at start-up, never a relay that quietly serves plain text."""
    for label, path in (("certificate", cert), ("key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"the TLS {label} file {path} does not exist")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"cannot use the TLS certificate {cert} with the key {key}: {exc.reason or exc} "
            "(both PEM, the key unencrypted and matching the certificate)"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"cannot read the TLS certificate {cert} or key {key}: {exc.strerror or exc}"
        ) from exc
    return context


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


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (the first address ``host`` resolves to), not yet
    listening; ConfigError (see :func:`listen_failure`) if it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(listen_failure(host, port, exc)) from exc
    try:
        if hasattr(socket, "SO_REUSEADDR") and os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise ConfigError("--reuse-port needs SO_REUSEPORT, which this system lacks")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(listen_failure(host, port, exc)) from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    config: RelayConfig,
    *,
    on_listening: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
    extensions: Sequence[Extension] | None = None,
    tls: ssl.SSLContext | None = None,
    store: RelayStore | None = None,
    reuse_port: bool = False,
) -> None:
    """Run the relay on ``config.host:config.port`` until SIGINT or SIGTERM (or ``stop``).

    Raises :class:`ConfigError` if the address cannot be listened on, before anything else
    starts. ``extensions`` and ``store`` are those of :func:`create_app` (None: the defaults);
    ``reuse_port`` lets other relay processes listen on the same port (``SO_REUSEPORT``). With
    ``tls`` (see :func:`tls_server_context`) the port serves wss:// and https:// only.
    """
    sock = bind_socket(config.host, config.port, reuse_port=reuse_port)
    try:
        app = create_app(config, extensions=extensions, store=store)
        runner = JsonErrorAppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    try:
        site = web.SockSite(runner, sock, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            sock.close()
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
