"""What is PostgreSQL's own in PostgresRelayStore: several stores on one database, a server that
drops connections, goes away and comes back, and relays serving devices from it.

The contract every store meets is tests/test_store_contracts.py. Each test here gets its own
database (tests/services.py), and reaches PostgreSQL through a TCP proxy where it needs to take
the server away without touching the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc

from foliosync.client.sync import SyncClient
from foliosync.server.postgres_store import PostgresRelayStore, PostgresTimeouts
from foliosync.sync.errors import ConfigError, RelayStoreError
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol import (
    Error,
    ErrorCode,
    Hello,
    SyncReply,
    SyncRequest,
    Welcome,
    decode_frame,
    encode_frame,
)


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


TECH = document_id(DocumentKind.WATCHLIST, "Tech")
FAST = PostgresTimeouts(connect=1.0, acquire=2.0, command=2.0, ping=1.0)


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with _services().postgres_database() as database:
        yield database


@contextlib.asynccontextmanager
async def opened(dsn: str, **kwargs: Any) -> AsyncIterator[PostgresRelayStore]:
    store = await PostgresRelayStore.open(dsn, **kwargs)
    try:
        yield store
    finally:
        await store.close()


async def terminate_backends(dsn: str) -> int:
    """What an operator's pg_terminate_backend (or a failover) does to every store on ``dsn``."""
    database = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_services().postgres_dsn())
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await admin.close()
    return len(rows)


class TcpProxy:
    """127.0.0.1:port forwarded to PostgreSQL: ``down()`` is the server gone (connections cut,
    new ones refused), ``up()`` the server back on the same port, ``freeze()`` a server that
    keeps its connections but stops answering."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def up(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def freeze(self) -> None:
        self._flowing.clear()

    def dsn(self, database_dsn: str) -> str:
        return database_dsn.replace(f"{self.target[0]}:{self.target[1]}", f"127.0.0.1:{self.port}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass  # one side ended, or the proxy went down: the connection ends with it
        finally:
            for end in (writer, upstream):
                if end is not None:
                    end.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.transport.abort()


@pytest.fixture
async def proxy(dsn: str) -> AsyncIterator[TcpProxy]:
    running = TcpProxy("127.0.0.1", 5432)
    await running.up()
    try:
        yield running
    finally:
        await running.down()


async def _elapsed_raising(operation: Any) -> float:
    started = time.monotonic()
    with pytest.raises(RelayStoreError):
        await operation
    return time.monotonic() - started


# -- several stores on one database ------------------------------------------------------------


async def test_two_stores_appending_to_one_document_number_it_without_gaps(dsn: str) -> None:
    """Per-document seqs come from the document's row, locked until COMMIT: two relays appending
    at once take turns on it, so the seqs are exactly 1..N, each once, in commit order."""
    async with opened(dsn) as one, opened(dsn) as two:
        results = await asyncio.gather(
            *(one.append("alice", TECH, f"a{i}".encode(), i, "d1") for i in range(150)),
            *(two.append("alice", TECH, f"b{i}".encode(), i, "d2") for i in range(150)),
        )
        assert sorted(results) == list(range(1, 301))
        # each store hands its own appends in the order it was given them
        assert results[:150] == sorted(results[:150])
        assert results[150:] == sorted(results[150:])
        loaded = await one.load("alice", TECH)
        assert loaded is not None and loaded.last_seq == 300
        names = [f"a{i}" for i in range(150)] + [f"b{i}" for i in range(150)]
        by_seq = dict(zip(results, names, strict=True))
        assert [u.decode() for u in loaded.updates] == [by_seq[s] for s in range(1, 301)]


async def test_tables_are_prefixed_so_that_two_relays_can_share_a_database(dsn: str) -> None:
    async with opened(dsn) as default, opened(dsn, prefix="other_") as other:
        await default.append("alice", TECH, b"default", 1, "d1")
        assert await other.load("alice", TECH) is None
        assert await other.documents("alice") == []
    admin = await asyncpg.connect(dsn)
    try:
        tables = {
            r["tablename"]
            for r in await admin.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        version = await admin.fetchval(
            "SELECT value FROM foliosync_meta WHERE key = 'schema_version'"
        )
    finally:
        await admin.close()
    assert tables == {
        f"{p}{t}" for p in ("foliosync_", "other_") for t in ("meta", "documents", "updates")
    }
    assert version == "1"


async def test_stores_opening_at_once_create_the_tables_once(dsn: str) -> None:
    stores = await asyncio.gather(*(PostgresRelayStore.open(dsn) for _ in range(6)))
    try:
        seqs = await asyncio.gather(*(s.append("alice", TECH, b"u", 1, "d") for s in stores))
        assert sorted(seqs) == list(range(1, 7))
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_every_store_on_the_same_tables_has_their_one_id_and_other_tables_another(
    dsn: str,
) -> None:
    stores = await asyncio.gather(*(PostgresRelayStore.open(dsn) for _ in range(4)))
    try:
        ids = {s.store_id for s in stores}
        async with opened(dsn, prefix="elsewhere_") as other:
            assert len(ids) == 1 and "" not in ids
            assert other.store_id not in ids and other.store_id
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    async with opened(dsn) as reopened:  # made once, with the tables: kept across restarts
        assert reopened.store_id in ids


async def test_tables_of_a_newer_schema_are_refused_not_written(dsn: str) -> None:
    async with opened(dsn):
        pass
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("UPDATE foliosync_meta SET value = '99' WHERE key = 'schema_version'")
    finally:
        await admin.close()
    with pytest.raises(RelayStoreError, match="schema version 99"):
        await PostgresRelayStore.open(dsn)


async def test_bad_arguments_are_config_errors(dsn: str) -> None:
    for kwargs in ({"min_size": 5, "max_size": 2}, {"max_size": 0}, {"prefix": "Robert'); DROP"}):
        with pytest.raises(ConfigError):
            await PostgresRelayStore.open(dsn, **kwargs)
    with pytest.raises(ConfigError, match="timeout"):
        PostgresTimeouts(ping=0)
    with pytest.raises(ConfigError, match="timeout"):
        PostgresTimeouts(command=float("nan"))


# -- a server that drops connections, goes away, comes back -------------------------------------


async def test_the_store_recovers_at_once_when_the_server_terminates_its_connections(
    dsn: str,
) -> None:
    async with opened(dsn, min_size=3, max_size=3) as store:
        await asyncio.gather(
            *(store.append("alice", TECH, f"u{i}".encode(), i, "d") for i in range(30))
        )
        assert await terminate_backends(dsn) >= 3
        # every operation works again at the first try: the lost connection is replaced
        seq = await store.append("alice", TECH, b"after", 100, "d")
        loaded = await store.load("alice", TECH)
        assert loaded is not None and loaded.updates[-1] == b"after" and loaded.last_seq == seq
        await store.ping()
        assert await store.documents("alice") == [TECH]
        assert await terminate_backends(dsn) >= 1
        await store.compact("alice", TECH, b"SNAPSHOT", seq)
        assert await terminate_backends(dsn) >= 1
        loaded = await store.load("alice", TECH)
        assert loaded is not None and (loaded.snapshot, loaded.updates) == (b"SNAPSHOT", [])


async def test_a_server_that_is_down_fails_fast_and_the_store_recovers_when_it_returns(
    dsn: str, proxy: TcpProxy
) -> None:
    async with opened(proxy.dsn(dsn), timeouts=FAST) as store:
        first = await store.append("alice", TECH, b"before", 1, "d")
        await proxy.down()
        # refused at once, not after a timeout; load raises too (the relay answers `internal`)
        assert await _elapsed_raising(store.append("alice", TECH, b"lost", 2, "d")) < 1.5
        assert await _elapsed_raising(store.load("alice", TECH)) < 1.5
        assert await _elapsed_raising(store.documents("alice")) < 1.5
        assert await _elapsed_raising(store.ping()) < 1.5
        assert await _elapsed_raising(store.compact("alice", TECH, b"S", first)) < 1.5

        await proxy.up()
        second = await store.append("alice", TECH, b"after", 3, "d")
        assert second > first
        loaded = await store.load("alice", TECH)
        assert loaded is not None and loaded.updates == [b"before", b"after"]
        await store.ping()


async def test_a_server_that_stops_answering_fails_within_the_timeouts(
    dsn: str, proxy: TcpProxy
) -> None:
    async with opened(proxy.dsn(dsn), timeouts=FAST) as store:
        await store.append("alice", TECH, b"before", 1, "d")
        proxy.freeze()
        assert await _elapsed_raising(store.ping()) < FAST.ping + 0.5
        assert await _elapsed_raising(store.load("alice", TECH)) < FAST.command + 1.0
        assert (
            await _elapsed_raising(store.append("alice", TECH, b"x", 2, "d"))
            < 2 * (FAST.command + FAST.connect) + 1.0
        )
        await proxy.down()
        await proxy.up()
        await store.append("alice", TECH, b"after", 3, "d")
        loaded = await store.load("alice", TECH)
        assert loaded is not None and loaded.updates[0] == b"before"
        assert loaded.updates[-1] == b"after"


async def test_opening_against_a_closed_port_or_a_silent_server_fails_fast(dsn: str) -> None:
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RelayStoreError, match=f"127.0.0.1:{closed_port}"):
        await PostgresRelayStore.open(
            f"postgresql://postgres:s3cret@127.0.0.1:{closed_port}/x", timeouts=FAST
        )
    assert time.monotonic() - started < 1.5

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(RelayStoreError) as caught:
            await PostgresRelayStore.open(
                f"postgresql://postgres:s3cret@127.0.0.1:{port}/x", timeouts=FAST
            )
        assert time.monotonic() - started < FAST.connect + 1.5
        assert "s3cret" not in str(caught.value)
    finally:
        server.close()


# -- compaction by several relays converges ------------------------------------------------------


class _SimulatedRelay:
    """What RelayDocuments does with a store: apply in memory, append, compact from memory."""

    def __init__(self, store: PostgresRelayStore, user: str) -> None:
        self.store, self.user = store, user
        self.doc: Doc[Any] = Doc()
        self.stored_seq = 0

    async def reload(self) -> None:
        stored = await self.store.load(self.user, TECH)
        self.doc = Doc()
        self.stored_seq = 0
        if stored is not None:
            if stored.snapshot:
                self.doc.apply_update(stored.snapshot)
            for update in stored.updates:
                self.doc.apply_update(update)
            self.stored_seq = stored.last_seq

    async def add(self, value: str) -> None:
        before = self.doc.get_state()
        self.doc.get("items", type=Array).append(value)
        seq = await self.store.append(self.user, TECH, self.doc.get_update(before), 1, "d")
        self.stored_seq = max(self.stored_seq, seq)

    async def compact(self) -> None:
        await self.store.compact(self.user, TECH, self.doc.get_update(), self.stored_seq)


_OPS = st.lists(
    st.tuples(st.sampled_from(["add", "add", "add", "compact", "reload"]), st.integers(0, 2)),
    min_size=1,
    max_size=40,
)


@pytest.fixture(scope="module")
def shared_dsn() -> Iterator[str]:
    """One database for every example of the property (each example takes its own user)."""
    with asyncio.Runner() as runner:
        database = _services().postgres_database()
        dsn = runner.run(database.__aenter__())
        try:
            yield dsn
        finally:
            runner.run(database.__aexit__(None, None, None))


@settings(
    max_examples=int(os.environ.get("FOLIOSYNC_PG_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=_OPS)
def test_three_relays_adding_and_compacting_at_random_lose_nothing(
    shared_dsn: str, ops: list[tuple[str, int]]
) -> None:
    """Whatever the interleaving of appends, compactions and reloads of three relays on one
    document (none hearing of the others' changes), a fresh load holds every item added."""

    async def scenario() -> None:
        user = f"user-{secrets.token_hex(4)}"
        stores = [await PostgresRelayStore.open(shared_dsn, max_size=2) for _ in range(3)]
        try:
            relays = [_SimulatedRelay(s, user) for s in stores]
            for relay in relays:
                await relay.reload()
            added: list[str] = []
            for n, (op, who) in enumerate(ops):
                if op == "add":
                    added.append(f"item-{n}")
                    await relays[who].add(added[-1])
                elif op == "compact":
                    await relays[who].compact()
                else:
                    await relays[who].reload()
            fresh = _SimulatedRelay(stores[0], user)
            await fresh.reload()
            items = fresh.doc.get("items", type=Array).to_py() or []
            assert sorted(items) == sorted(added)
        finally:
            for s in stores:
                await s.close()

    asyncio.run(scenario())


# -- relays serving devices from PostgreSQL ------------------------------------------------------

_SECOND_RELAY = """
import asyncio, sys
from pathlib import Path
from aiohttp import web
from foliosync.server.postgres_store import PostgresRelayStore
from foliosync.server.relay import RelayConfig, create_app

async def main() -> None:
    store = await PostgresRelayStore.open(sys.argv[1])
    app = create_app(RelayConfig(data_dir=Path(sys.argv[2])), store=store)
    runner = web.AppRunner(app, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def relay_process(dsn: str, data_dir: Path) -> AsyncIterator[str]:
    """A second relay, in its own process, on the same database: yields its WebSocket URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SECOND_RELAY, dsn, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        assert line.strip().isdigit(), f"the second relay did not start: {line!r}"
        yield f"ws://127.0.0.1:{int(line)}/ws"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_a_relay_serves_devices_from_postgres_and_a_second_relay_process_serves_it_too(
    dsn: str, tmp_path: Path, open_replica: Any, helpers: Any
) -> None:
    store = await PostgresRelayStore.open(dsn)
    async with helpers.serve_relay(tmp_path / "relay", store=store) as relay:
        phone = await open_replica("phone")
        wl = await phone.create_watchlist("Tech")
        await wl.add(["AAPL", "MSFT"], note="core")
        await SyncClient(phone, relay.url, relay.token("alice", "phone")).sync_once(timeout=10)
        assert await phone.pending_updates() == []

        # acknowledged means committed: another connection to the database sees it now
        async with opened(dsn) as reader:
            stored = await reader.load("alice", wl.id)
        assert stored is not None and stored.updates and stored.watermark.changed_by == "phone"

        # a second relay process on the same database serves the document to a new device,
        # and what that device adds reaches the first device through the first relay
        async with relay_process(dsn, tmp_path / "relay") as second_url:
            laptop = await open_replica("laptop")
            laptop_client = SyncClient(laptop, second_url, relay.token("alice", "laptop"))
            await laptop_client.sync_once(timeout=10)
            assert (await laptop.watchlist(TECH)).symbols == ["AAPL", "MSFT"]
            await (await laptop.watchlist(TECH)).add(["NVDA"])
            await laptop_client.sync_once(timeout=10)
            assert await laptop.pending_updates() == []

        # the first relay holds Tech in memory; a device syncing there after its own reconnect
        # gets the laptop's edit from the store once that document is loaded anew
        tablet = await open_replica("tablet")
        await relay.stop()
    store = await PostgresRelayStore.open(dsn)
    async with helpers.serve_relay(tmp_path / "relay", store=store) as relay:
        await SyncClient(tablet, relay.url, relay.token("alice", "tablet")).sync_once(timeout=10)
        assert (await tablet.watchlist(TECH)).symbols == ["AAPL", "MSFT", "NVDA"]
        await SyncClient(phone, relay.url, relay.token("alice", "phone")).sync_once(timeout=10)
        assert (await phone.watchlist(TECH)).symbols == ["AAPL", "MSFT", "NVDA"]


async def test_while_postgres_is_down_a_sync_gets_the_fatal_internal_and_then_works_again(
    dsn: str, proxy: TcpProxy, tmp_path: Path, helpers: Any
) -> None:
    """A relay whose store cannot be read serves nothing from it, not an empty document: the
    connection gets the fatal ``internal`` Error (close 1011) at its first read of the store
    (the Welcome lists the user's documents, so already at the Hello), and once PostgreSQL is
    back the same requests are answered with what was stored."""
    store = await PostgresRelayStore.open(proxy.dsn(dsn), timeouts=FAST)
    await store.append("alice", TECH, Doc().get_update(), 1, "phone")  # Tech exists, cold

    async def sync_request(relay: Any) -> Any:
        """The relay's answer to Hello then SyncRequest(Tech): its SyncReply, or its Error."""
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(relay.url) as ws,
        ):

            async def receive() -> Any:
                frame = decode_frame((await ws.receive(timeout=10)).data, max_frame_size=1 << 20)
                if isinstance(frame, Error):
                    closing = await ws.receive(timeout=5)
                    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1011
                return frame

            await ws.send_bytes(encode_frame(Hello(1, relay.token("alice", "d1"), "raw")))
            welcome = await receive()
            if not isinstance(welcome, Welcome):
                return welcome
            await ws.send_bytes(encode_frame(SyncRequest(TECH, Doc().get_state())))
            return await receive()

    async with helpers.serve_relay(tmp_path / "relay", store=store) as relay:
        await proxy.down()
        reply = await sync_request(relay)
        assert isinstance(reply, Error) and reply.code == ErrorCode.INTERNAL and reply.fatal
        await proxy.up()
        reply = await sync_request(relay)
        assert isinstance(reply, SyncReply) and reply.doc == TECH
        assert reply.changed_by == "phone"
