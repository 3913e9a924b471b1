"""The external services some tests need: Redis and PostgreSQL on 127.0.0.1.

A test that needs one calls ``require_redis()`` / ``require_postgres()`` first: if the service
does not answer, the test is skipped, or fails when ``FOLIOSYNC_REQUIRE_REDIS=1`` /
``FOLIOSYNC_REQUIRE_POSTGRES=1`` is set (CI sets them, so a missing service cannot pass as a
green run of skips). ``FOLIOSYNC_REQUIRE_REDIS=1`` requires PostgreSQL too: it is what ``make
test`` sets once it started both, and a run meant to cover several relays needs both.

:func:`postgres_database` gives a test its own database, dropped afterwards. Test files are
imported in pytest's importlib mode and cannot import one another: load this one by path::

    def _services() -> ModuleType:
        name = "foliosync_test_services"
        if name not in sys.modules:
            path = Path(__file__).with_name("services.py")
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        return sys.modules[name]
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

__all__ = [
    "RawClient",
    "RedisProcess",
    "WatchlistEdits",
    "free_port",
    "postgres_database",
    "postgres_dsn",
    "redis_url",
    "require_postgres",
    "require_redis",
]

_REDIS = ("127.0.0.1", 6379)
_POSTGRES = ("127.0.0.1", 5432)


def redis_url() -> str:
    return f"redis://{_REDIS[0]}:{_REDIS[1]}/0"


def postgres_dsn(database: str = "postgres") -> str:
    return f"postgresql://postgres@{_POSTGRES[0]}:{_POSTGRES[1]}/{database}"


def _answers(address: tuple[str, int], probe: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0) as sock:
            sock.settimeout(1.0)
            if not probe:
                return True
            sock.sendall(probe)
            return sock.recv(64).startswith(expect)
    except OSError:
        return False


def _require(name: str, variables: tuple[str, ...], reachable: bool) -> None:
    if reachable:
        return
    message = f"{name} is not reachable"
    for variable in variables:
        if os.environ.get(variable) == "1":
            pytest.fail(f"{message} and {variable}=1 requires it")
    pytest.skip(message)


def require_redis() -> None:
    """Skip (or fail, with FOLIOSYNC_REQUIRE_REDIS=1) unless Redis answers PING."""
    _require(
        f"Redis on {_REDIS[0]}:{_REDIS[1]}",
        ("FOLIOSYNC_REQUIRE_REDIS",),
        _answers(_REDIS, b"PING\r\n", b"+PONG"),
    )


def require_postgres() -> None:
    """Skip (or fail, with FOLIOSYNC_REQUIRE_POSTGRES=1 or FOLIOSYNC_REQUIRE_REDIS=1) unless
    PostgreSQL accepts a connection."""
    _require(
        f"PostgreSQL on {_POSTGRES[0]}:{_POSTGRES[1]}",
        ("FOLIOSYNC_REQUIRE_POSTGRES", "FOLIOSYNC_REQUIRE_REDIS"),
        _answers(_POSTGRES, b"", b""),
    )


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A new empty database ``foliosync_test_<random>``, dropped afterwards (its remaining
    connections terminated first): yields its DSN. Calls :func:`require_postgres` first."""
    import asyncpg  # only the tests that need PostgreSQL need asyncpg

    require_postgres()
    name = f"foliosync_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_dsn(), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield postgres_dsn(name)
        finally:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await admin.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """A redis-server of the test's own, on its own port, that keeps nothing on disk: stopping it
    loses every key, like a crash; what the shared Redis must never be put through."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("FOLIOSYNC_REQUIRE_REDIS") == "1":
                pytest.fail("redis-server is not installed and FOLIOSYNC_REQUIRE_REDIS=1")
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--daemonize", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


class RawClient:
    """A connection speaking the protocol by hand over an aiohttp WebSocket, that sends nothing
    unless told: what reaches it, reaches it on the relay's initiative."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, frame: Any) -> None:
        from foliosync.sync.protocol import encode_frame

        await self.ws.send_bytes(encode_frame(frame))

    async def receive(self, timeout: float = 5) -> Any:
        """The next frame, or None once the relay closed the socket."""
        import aiohttp

        from foliosync.sync.protocol import decode_frame

        message = await self.ws.receive(timeout=timeout)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return None
        assert message.type == aiohttp.WSMsgType.BINARY, message
        return decode_frame(message.data, max_frame_size=1 << 30)

    async def hello(self, token: str) -> Any:
        from foliosync.sync.protocol import Hello, Welcome

        await self.send(Hello(1, token, "raw"))
        welcome = await self.receive()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    async def sync(self, doc: str) -> Any:
        from pycrdt import Doc

        from foliosync.sync.protocol import SyncReply, SyncRequest

        await self.send(SyncRequest(doc, Doc().get_state()))
        reply = await self.receive()
        assert isinstance(reply, SyncReply), reply
        return reply

    async def quiet(self) -> None:
        """Nothing else arrives before a Pong: no change was sent in between."""
        from foliosync.sync.protocol import Ping, Pong

        await self.send(Ping(5))
        assert await self.receive() == Pong(5)


class WatchlistEdits:
    """One device's watchlist edits made by hand, each an update of its own (as a replica
    sends them): a symbol entry in the layout the relay checks."""

    def __init__(self) -> None:
        from pycrdt import Doc, Map

        self.doc: Any = Doc()
        self.symbols = self.doc.get("symbols", type=Map)

    def add(self, symbol: str) -> bytes:
        before = self.doc.get_state()
        self.symbols[f"{symbol}\x1fraw"] = {"t": "0" * 17}
        return bytes(self.doc.get_update(before))
