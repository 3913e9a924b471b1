"""Shared fixtures: a real relay on 127.0.0.1 (in-process), replicas in tmp_path, sync clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import os
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from hypothesis import settings

from foliosync.client.replica import Replica
from foliosync.client.sync import Backoff, SyncClient
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.extensions import Extension
from foliosync.server.http_errors import JsonErrorAppRunner
from foliosync.server.prices import PricePolicy
from foliosync.server.relay import Relay, RelayConfig, RelayKey, create_app
from foliosync.server.storage import RelayStore
from foliosync.sync.prices import check_tick

# Properties are about results, not speed: on a shared 2-core machine one example of a fast test
# sometimes takes over hypothesis' default 200 ms deadline, which would fail it as "flaky".
settings.register_profile("foliosync", deadline=None)
settings.load_profile("foliosync")


def services() -> ModuleType:
    """tests/services.py, loaded once by path (test modules cannot import one another)."""
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture
def own_redis() -> Iterator[Any]:
    """A redis-server of the test's own (``services.RedisProcess``), to stop and start at will."""
    server = services().RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RunningRelay:
    """A relay serving on 127.0.0.1 inside the test's event loop."""

    config: RelayConfig
    runner: web.AppRunner
    port: int
    secret: bytes
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def relay(self) -> Relay:
        app = self.runner.app
        assert app is not None
        return app[RelayKey]

    def token(self, user: str, device: str | None = None, **kwargs: Any) -> str:
        return issue_token(self.secret, user, device=device, **kwargs)

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()


@asynccontextmanager
async def serve_relay(
    data_dir: Path,
    *,
    store: RelayStore | None = None,
    extensions: Sequence[Extension] | None = None,
    price_window_ms: int | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningRelay]:
    """Run a relay (SQLite store in ``data_dir`` unless ``store`` is given) until the block ends.

    ``price_window_ms`` fixes the price push window (a :class:`PricePolicy`); ``extensions``
    replace the relay's default ones."""
    config = replace(RelayConfig(data_dir=data_dir, heartbeat=5.0), **overrides)
    app = create_app(
        config,
        store=store,
        extensions=extensions,
        price_policy=PricePolicy(window_ms=price_window_ms),
    )
    runner = JsonErrorAppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    running = RunningRelay(config, runner, port, load_or_create_secret(data_dir))
    try:
        yield running
    finally:
        await running.stop()


@asynccontextmanager
async def opened_replica(path: Path) -> AsyncIterator[Replica]:
    replica = await Replica.open(path)
    try:
        yield replica
    finally:
        await replica.close()


def fast_client(replica: Replica, url: str, token: str, **kwargs: Any) -> SyncClient:
    """A SyncClient that retries quickly (tests restart relays and must not wait 30 s)."""
    kwargs.setdefault("backoff", Backoff(base=0.05, cap=0.3))
    return SyncClient(replica, url, token, **kwargs)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Wait until ``check()`` is true; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@pytest.fixture
def relay_server() -> Callable[..., AbstractAsyncContextManager[RunningRelay]]:
    """``async with relay_server(data_dir, **config) as relay``: for tests that need several."""
    return serve_relay


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RunningRelay]:
    """One relay with its data in tmp_path/relay and a small frame limit (64 KiB)."""
    async with serve_relay(tmp_path / "relay", max_frame_size=64 << 10) as running:
        yield running


@pytest.fixture
async def open_replica(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Replica]]]:
    """``await open_replica("name")``: a replica file in tmp_path, closed after the test."""
    stack = contextlib.AsyncExitStack()

    async def open_(name: str) -> Replica:
        return await stack.enter_async_context(opened_replica(tmp_path / f"{name}.db"))

    async with stack:
        yield open_


@pytest.fixture
async def sync_clients(open_replica: Any) -> AsyncIterator[Callable[..., SyncClient]]:
    """``sync_clients(replica, url, token)``: a quick-retrying client, stopped after the test
    (and before the replicas close)."""
    clients: list[SyncClient] = []

    def make(replica: Replica, url: str, token: str, **kwargs: Any) -> SyncClient:
        client = fast_client(replica, url, token, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        with contextlib.suppress(Exception):
            await client.stop()


THREAD_WAIT = 10.0


class RelayThread:
    """A relay (``serve_relay``) served by an event loop in another thread: for tests that block
    their own thread (blocking clients, Qt) while the relay must go on serving."""

    def __init__(self, data_dir: Path, **config: Any) -> None:
        self._runner = asyncio.Runner()
        self._started: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._runner.run, args=(self._serve(data_dir, config),), daemon=True
        )
        self._thread.start()
        self.running = self._started.result(THREAD_WAIT)
        self.url: str = self.running.url

    async def _serve(self, data_dir: Path, config: dict[str, Any]) -> None:
        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with serve_relay(data_dir, **config) as running:
            self._started.set_result(running)
            await self._stop.wait()

    def token(self, user: str, device: str) -> str:
        token: str = self.running.token(user, device)
        return token

    def publish(self, symbol: str, price: str, at: datetime | None = None) -> None:
        """A price tick taken ``at`` (now by default), published on the relay's own loop."""

        async def publish() -> None:
            now = time.time_ns() // 1_000_000
            taken = now if at is None else int(at.timestamp() * 1000)
            tick = check_tick({"symbol": symbol, "price": price, "time_ms": taken}, now)
            assert self.running.relay.prices.publish([tick])

        asyncio.run_coroutine_threadsafe(publish(), self.loop).result(THREAD_WAIT)

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(THREAD_WAIT)
        self._runner.close()


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The real console script, installed beside this interpreter, run without blocking the loop
    that may serve the relay: (exit status, stdout, stderr). Only ``env`` sets FOLIOSYNC_*."""
    foliosync = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert foliosync is not None, "the foliosync script is not installed beside this Python"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    process = await asyncio.create_subprocess_exec(
        foliosync,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def helpers() -> Any:
    """Plain helpers for tests (importlib mode: test files cannot import each other)."""

    class _Helpers:
        eventually = staticmethod(eventually)
        fast_client = staticmethod(fast_client)
        run_cli = staticmethod(run_cli)
        opened_replica = staticmethod(opened_replica)
        serve_relay = staticmethod(serve_relay)

    return _Helpers
