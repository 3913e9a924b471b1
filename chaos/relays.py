"""Relays as real processes (``foliosync relay``), killed with SIGKILL and started again on the
same data, and their stored documents read back for the oracle.

One relay keeps its SQLite store in its data directory. Two relays share Redis (fan-out) and a
PostgreSQL database (the store), created fresh for the run; each has its own data directory
holding the same signing secret, so that a device's token is good at either.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from pycrdt import Doc

from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.storage import RelayStore, SQLiteRelayStore

__all__ = [
    "RelayProcess",
    "StoreSpec",
    "free_port",
    "multi_relay_support",
    "open_store",
    "stored_documents",
]

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def multi_relay_support() -> str | None:
    """None if ``foliosync relay`` takes ``--redis`` and ``--store``; else why not."""
    result = subprocess.run(
        [sys.executable, "-m", "foliosync.client.cli", "relay", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    missing = [flag for flag in ("--redis", "--store") if flag not in result.stdout]
    if missing:
        return f"foliosync relay has no {' or '.join(missing)} option yet"
    return None


class StoreSpec:
    """Where the relays keep documents: SQLite in the data directory, or a PostgreSQL DSN
    (with the Redis URL the relays fan out through)."""

    def __init__(
        self, postgres: str | None = None, redis: str | None = None, redis_prefix: str = ""
    ) -> None:
        self.postgres = postgres
        self.redis = redis
        # Each run is a relay group of its own: its keys must not meet another run's (or an
        # earlier one's, whose offsets outlive it), or its relays apply that run's changes.
        self.redis_prefix = redis_prefix or f"foliosync-chaos-{secrets.token_hex(6)}:"

    def flags(self) -> list[str]:
        flags: list[str] = []
        if self.postgres is not None:
            flags += ["--store", self.postgres]
        if self.redis is not None:
            flags += ["--redis", self.redis, "--redis-prefix", self.redis_prefix]
        return flags

    async def forget(self) -> None:
        """Delete the run's Redis keys (the stream and the relays' offsets)."""
        if self.redis is None:
            return
        from redis.asyncio import Redis

        client = Redis.from_url(self.redis)
        try:
            keys = [key async for key in client.scan_iter(match=f"{self.redis_prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


class RelayProcess:
    """``foliosync relay`` on a fixed free port and data directory: start, SIGKILL, start."""

    def __init__(self, name: str, data_dir: Path, log: Path, store: StoreSpec) -> None:
        self.name = name
        self.data_dir = data_dir
        self.port = free_port()
        self.log = log
        self.store = store
        self.process: asyncio.subprocess.Process | None = None
        self.kills = 0
        self.starts = 0
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def share_secret(self, other: RelayProcess) -> None:
        """Give this relay the other's signing secret (before either starts)."""
        load_or_create_secret(other.data_dir)
        shutil.copy2(other.data_dir / "secret.key", self.data_dir / "secret.key")

    def token(self, user: str, device: str) -> str:
        return str(issue_token(load_or_create_secret(self.data_dir), user, device=device))

    async def start(self) -> float:
        """Start and wait until /healthz answers; returns how long that took."""
        if self.process is not None:
            raise RuntimeError(f"relay {self.name} is already running")
        command = [sys.executable, "-m", "foliosync.client.cli", "relay"]
        command += ["--port", str(self.port), "--data", str(self.data_dir), "--feed", "none"]
        command += self.store.flags()
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        self.starts += 1
        await self._wait_healthy()
        return time.monotonic() - started

    async def _wait_healthy(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"relay {self.name} exited at start: {tail}")
                with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                    url = f"http://127.0.0.1:{self.port}/healthz"
                    async with http.get(url) as response:
                        if response.status == 200 and (await response.json())["status"] == "ok":
                            return
                if loop.time() > deadline:
                    raise RuntimeError(f"relay {self.name} did not start in {START_TIMEOUT:g} s")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self.process = None
        self.kills += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@contextlib.asynccontextmanager
async def open_store(relay: RelayProcess) -> AsyncIterator[RelayStore]:
    """The relay's store, opened for reading (with the relay stopped, for SQLite)."""
    store: Any
    if relay.store.postgres is not None:
        from foliosync.server.postgres_store import PostgresRelayStore

        store = await PostgresRelayStore.open(relay.store.postgres, min_size=1, max_size=2)
    else:
        store = await SQLiteRelayStore.open(relay.data_dir / "relay.db")
    try:
        yield store
    finally:
        await store.close()


async def stored_documents(store: RelayStore, user: str) -> dict[str, Doc[Any]]:
    """Every document of ``user`` as the store holds it: snapshot plus updates, applied."""
    documents: dict[str, Doc[Any]] = {}
    for doc_id in await store.documents(user):
        stored = await store.load(user, doc_id)
        if stored is None:
            continue
        doc: Doc[Any] = Doc()
        if stored.snapshot:
            doc.apply_update(stored.snapshot)
        for update in stored.updates:
            doc.apply_update(update)
        documents[doc_id] = doc
    return documents
