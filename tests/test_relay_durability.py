"""Crashes: the relay killed with SIGKILL while clients write, and a client killed mid-sync.

The relay runs as a real process (``foliosync relay``) on a free port with its SQLite store in
tmp_path; clients are real SyncClients with real replica files.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from foliosync.client.replica import DocumentChange, Replica
from foliosync.client.sync import SyncClient
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.sync.model import DocumentKind, document_id

MAIN = document_id(DocumentKind.PORTFOLIO, "Main")
TECH = document_id(DocumentKind.WATCHLIST, "Tech")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RelayProcess:
    """``foliosync relay`` in a child process; start, SIGKILL and start again on the same data."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, user: str, device: str) -> str:
        return issue_token(load_or_create_secret(self.data_dir), user, device=device)

    async def start(self) -> None:
        assert self.process is None
        command = [sys.executable, "-m", "foliosync.client.cli", "relay"]
        command += ["--port", str(self.port), "--data", str(self.data_dir)]
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command, stdout=log, stderr=asyncio.subprocess.STDOUT
            )
        await self._wait_healthy()

    async def _wait_healthy(self, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.process is not None
                if self.process.returncode is not None:
                    pytest.fail(f"the relay exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    url = f"http://127.0.0.1:{self.port}/healthz"
                    async with http.get(url) as response:
                        if response.status == 200 and (await response.json())["status"] == "ok":
                            return
                if loop.time() > deadline:
                    pytest.fail(f"the relay did not start: {self.log.read_text()[-2000:]}")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        assert await self.process.wait() == -signal.SIGKILL
        self.process = None


@pytest.fixture
async def relay_process(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    relay = RelayProcess(tmp_path / "relay-data", tmp_path / "relay.log")
    await relay.start()
    try:
        yield relay
    finally:
        if relay.process is not None and relay.process.returncode is None:
            relay.process.kill()
            await relay.process.wait()


async def trade_ids_seen_by_a_fresh_device(relay: RelayProcess, path: Path) -> set[str]:
    path.unlink(missing_ok=True)
    async with await Replica.open(path) as fresh:
        await SyncClient(fresh, relay.url, relay.token("alice", "fresh")).sync_once(timeout=20)
        if MAIN not in fresh.document_ids():
            return set()
        return {trade.id for trade in (await fresh.portfolio(MAIN)).trades()}


# -- the relay killed while a client writes ------------------------------------------------------


async def test_relay_killed_mid_stream_keeps_every_acknowledged_edit(
    relay_process: RelayProcess, tmp_path: Path, helpers: Any
) -> None:
    relay = relay_process
    eventually = partial(helpers.eventually, timeout=20.0)
    async with await Replica.open(tmp_path / "writer.db") as writer:
        client = helpers.fast_client(writer, relay.url, relay.token("alice", "d1"))
        seq_of: dict[str, int] = {}  # trade id -> the seq of the local update holding it
        last_seq: list[int] = [0]

        def on_change(change: DocumentChange) -> None:
            if change.doc_id == MAIN and change.origin == "local" and change.seq:
                last_seq[0] = change.seq

        writer.subscribe(on_change)
        portfolio = await writer.create_portfolio("Main")
        counter = iter(range(10_000))

        async def write(n: int, pause: float = 0.0) -> None:
            for _ in range(n):
                i = next(counter)
                trade = await portfolio.add_trade(f"S{i % 7}", i + 1, "10", note=f"edit {i}")
                seq_of[trade.id] = last_seq[0]
                if pause:
                    await asyncio.sleep(pause)

        async def acknowledged() -> set[str]:
            pending = {p.seq for p in await writer.pending_updates(MAIN)}
            return {trade_id for trade_id, seq in seq_of.items() if seq not in pending}

        client.start()
        await write(30, pause=0.002)
        await eventually(lambda: writer.info(MAIN).pending == 0)
        first_batch = set(seq_of)
        assert await acknowledged() == first_batch

        # keep writing; SIGKILL the relay in the middle of the stream
        stream = asyncio.get_running_loop().create_task(write(60, pause=0.003))
        await eventually(lambda: len(seq_of) >= 45)
        await relay.kill()
        await stream
        await write(10)  # offline edits
        acked = await acknowledged()
        assert first_batch < acked < set(seq_of), "the kill did not land mid-stream"
        await client.stop()

        # the restarted relay has every edit it acknowledged before the kill
        await relay.start()
        seen = await trade_ids_seen_by_a_fresh_device(relay, tmp_path / "fresh.db")
        assert acked <= seen
        assert seen <= set(seq_of)

        # the writer reconnects and resends the rest: nothing is lost
        client.start()
        await eventually(lambda: writer.info(MAIN).pending == 0)
        assert await trade_ids_seen_by_a_fresh_device(relay, tmp_path / "fresh.db") == set(seq_of)

        # once more, without stopping the client: it keeps retrying and resends by itself
        await write(10, pause=0.002)
        await relay.kill()
        await write(10)
        assert writer.info(MAIN).pending > 0
        await asyncio.sleep(0.3)  # a few failed reconnects
        await relay.start()
        await eventually(lambda: writer.info(MAIN).pending == 0)
        await client.wait_in_sync(timeout=20)
        await client.stop()
        everything = set(seq_of)
        assert len(everything) == 120

    assert await trade_ids_seen_by_a_fresh_device(relay, tmp_path / "fresh.db") == everything


# -- a client killed mid-sync --------------------------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from foliosync.client.replica import Replica
    from foliosync.client.sync import SyncClient

    async def main(path, url, token, count):
        replica = await Replica.open(path)
        watchlist = await replica.create_watchlist("Tech")
        portfolio = await replica.create_portfolio("Main")
        for i in range(int(count)):
            await watchlist.add([f"S{i}"])
            await portfolio.add_trade(f"S{i}", i + 1, "5", note=f"trade {i}")
        for name in ("One", "Two", "Three"):
            await (await replica.create_watchlist(name)).add(["SPY"])
        print("committed", flush=True)
        client = SyncClient(replica, url, token)
        client.on_connection_change(lambda up: up and print("connected", flush=True))
        await client.sync_once(timeout=30)
        print("synced", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.parametrize("kill_at", ["committed", "connected"])
async def test_client_killed_mid_sync_resends_its_edits(
    relay_process: RelayProcess, tmp_path: Path, kill_at: str
) -> None:
    relay = relay_process
    path = tmp_path / "device.db"
    count = 40
    token = relay.token("alice", "d1")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT_SCRIPT,
        str(path),
        relay.url,
        token,
        str(count),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        while True:
            line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
            if not line:
                stderr = await child.stderr.read() if child.stderr else b""
                pytest.fail(f"the client exited early: {stderr.decode()[-2000:]}")
            if line.decode().strip() == kill_at:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    # Killed, not ended by itself (it sleeps a minute after its sync). 255 is what asyncio's
    # child watcher reports when another waitpid() in the test process reaped the child first
    # ("Unknown child process pid ..."), seen once in CI: the kill landed all the same.
    assert child.returncode in (-signal.SIGKILL, 255), child.returncode

    expected_symbols = sorted(f"S{i}" for i in range(count))
    expected_notes = {f"trade {i}" for i in range(count)}

    async with await Replica.open(path) as device:
        # every committed edit survived the kill
        assert sorted((await device.watchlist(TECH)).symbols) == expected_symbols
        assert {t.note for t in (await device.portfolio(MAIN)).trades()} == expected_notes
        if kill_at == "committed":
            assert await device.pending_updates()
        await SyncClient(device, relay.url, token).sync_once(timeout=20)
        assert await device.pending_updates() == []
        assert all(info.pending == 0 for info in device.documents())

    async with await Replica.open(tmp_path / "fresh.db") as fresh:
        await SyncClient(fresh, relay.url, relay.token("alice", "d2")).sync_once(timeout=20)
        assert sorted(d.name for d in fresh.documents()) == ["Main", "One", "Tech", "Three", "Two"]
        assert sorted((await fresh.watchlist(TECH)).symbols) == expected_symbols
        trades = (await fresh.portfolio(MAIN)).trades()
        assert {t.note for t in trades} == expected_notes
        assert sum(t.quantity for t in trades) == sum(range(1, count + 1))
        assert (await fresh.watchlist("Three")).symbols == ["SPY"]
