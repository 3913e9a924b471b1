"""Several `foliosync relay` processes, one truth: PostgreSQL for documents, Redis between them.

Real programs, real services: two relay subprocesses on two ports, or on one port with
``--reuse-port``; devices speaking the protocol by hand, so that what was acknowledged is known
exactly. Redis is a ``redis-server`` of the test's own on a free port (stopped and started), and
PostgreSQL is reached through a TCP proxy the test cuts (the machine's PostgreSQL is never
stopped). Under ``FOLIOSYNC_REQUIRE_REDIS=1`` a missing service fails these tests.

Sharing across the group (a share ended, a token revoked, a share granted through one relay and
felt by the connections of another) runs two relays inside the test's process instead, on two
ports over the same services: what crosses between them crosses Redis all the same, and they
start in a fraction of the time a process takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol import (
    Ack,
    Error,
    Frame,
    Hello,
    PriceSnapshot,
    Publish,
    Published,
    Subscribe,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    decode_frame,
    encode_frame,
)

TECH = document_id(DocumentKind.WATCHLIST, "Tech")


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


free_port = _services().free_port
RedisProcess = _services().RedisProcess


def foliosync() -> str:
    script = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert script is not None, "the foliosync console script is not installed next to python"
    return script


# -- services of the test's own ----------------------------------------------------------------


@pytest.fixture
def own_redis(own_redis: RedisProcess) -> RedisProcess:
    _services().require_redis()  # a run that needs several relays needs Redis and PostgreSQL
    return own_redis


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with _services().postgres_database() as dsn:
        yield dsn


class TcpProxy:
    """127.0.0.1:port -> target: :meth:`cut` drops every connection and refuses new ones (as a
    network partition would, seen from the relay), :meth:`restore` lets them through again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._links |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links -= {writer, up_writer}

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._links.clear()

    async def restore(self) -> None:
        await self.start()

    def dsn(self, database_dsn: str) -> str:
        return database_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{self.port}")


# -- relay processes ---------------------------------------------------------------------------


class RelayProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.stderr = b""

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


@contextlib.asynccontextmanager
async def relay_group(
    data_dir: Path, dsn: str, redis_url: str, ports: list[int], *, reuse_port: bool = False
) -> AsyncIterator[list[RelayProcess]]:
    """One relay process per entry of ``ports`` (the same port twice with ``reuse_port``),
    all on the same secret, store and bus; yields once each says it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    relays: list[RelayProcess] = []
    try:
        for n, port in enumerate(ports):
            args = [foliosync(), "relay", "--feed", "none", "--port", str(port)]
            args += ["--data", str(data_dir), "--store", dsn, "--redis", redis_url]
            args += ["--relay-id", f"relay-{n}", "--log-level", "WARNING"]
            if reuse_port:
                args.append("--reuse-port")
            process = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
            )
            relay = RelayProcess(process, port)
            relays.append(relay)
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            if not line.startswith(b"foliosync relay on"):
                assert process.stderr is not None
                err = await asyncio.wait_for(process.stderr.read(), 10)
                raise AssertionError(f"relay {n} did not start: {line!r} {err.decode()}")
            assert b"documents in PostgreSQL at" in line, line
        yield relays
    finally:
        for relay in relays:
            if relay.process.returncode is None:
                relay.process.send_signal(signal.SIGTERM)
        for relay in relays:
            try:
                await asyncio.wait_for(relay.process.wait(), 15)
            except TimeoutError:
                relay.kill()
                await relay.process.wait()


# -- devices -----------------------------------------------------------------------------------


def watchlist_update(doc: Doc[Any], symbol: str) -> bytes:
    """Add ``symbol`` to a device's copy of the watchlist; the update, as a device sends it."""
    before = doc.get_state()
    doc.get("symbols", type=Map)[f"{symbol}\x1fraw"] = {"t": "0" * 17}
    return doc.get_update(before)


def symbols_of(doc: Doc[Any]) -> set[str]:
    return {key.split("\x1f")[0] for key in doc.get("symbols", type=Map)}


class Device:
    """A device speaking the protocol by hand: it edits one watchlist, knows which of its edits
    were acknowledged, applies what the relay sends, and reconnects when cut off."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.doc: Doc[Any] = Doc()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.seq = 0
        self.unacked: dict[int, tuple[str, bytes]] = {}
        self.acked: set[str] = set()
        self.errors: list[Error] = []
        self.prices: dict[str, str] = {}
        self.connects = 0
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        ws = await self.http.ws_connect(self.url)
        await ws.send_bytes(encode_frame(Hello(1, self.token, "cluster-test")))
        welcome = await self._next(ws)
        assert isinstance(welcome, Welcome), welcome
        await ws.send_bytes(encode_frame(SyncRequest(TECH, self.doc.get_state())))
        reply = await self._next(ws)
        assert isinstance(reply, SyncReply), reply
        self.doc.apply_update(reply.update)
        self.ws = ws
        self.connects += 1
        self._reader = asyncio.get_running_loop().create_task(self._read(ws))
        waiting = [edit for _, edit in sorted(self.unacked.items())]
        self.unacked = {}
        for symbol, update in waiting:  # resent: applying an update twice changes nothing
            self.seq += 1
            self.unacked[self.seq] = (symbol, update)
            await ws.send_bytes(encode_frame(Update(TECH, self.seq, update)))

    @staticmethod
    async def _next(ws: aiohttp.ClientWebSocketResponse) -> Frame:
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        return decode_frame(message.data, max_frame_size=1 << 30)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            frame = decode_frame(message.data, max_frame_size=1 << 30)
            if isinstance(frame, Update):
                self.doc.apply_update(frame.update)
            elif isinstance(frame, Ack):
                for seq in [s for s in self.unacked if s <= frame.seq]:
                    self.acked.add(self.unacked.pop(seq)[0])
            elif isinstance(frame, Error):
                self.errors.append(frame)
            elif isinstance(frame, PriceSnapshot):
                for symbol, price, *_ in frame.ticks:
                    self.prices[str(symbol)] = str(price)

    @property
    def connected(self) -> bool:
        return self.ws is not None and not self.ws.closed

    async def add(self, symbol: str) -> None:
        """Edit and send; when not connected the edit waits, to be sent at the next connect."""
        update = watchlist_update(self.doc, symbol)
        self.seq += 1
        self.unacked[self.seq] = (symbol, update)
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_bytes(encode_frame(Update(TECH, self.seq, update)))

    async def subscribe(self, symbols: tuple[str, ...]) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(encode_frame(Subscribe(symbols)))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


async def eventually(what: str, condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)


def tokens(data_dir: Path) -> Callable[..., str]:
    secret = load_or_create_secret(data_dir)  # one secret for every relay of the group

    def token(user: str, device: str, scopes: frozenset[str] = frozenset({"sync"})) -> str:
        return issue_token(secret, user, device=device, scopes=scopes)

    return token


async def publish(http: aiohttp.ClientSession, url: str, token: str, symbol: str) -> None:
    ws = await http.ws_connect(url)
    try:
        await ws.send_bytes(encode_frame(Hello(1, token, "publisher")))
        assert isinstance(await Device._next(ws), Welcome)
        tick = (symbol, "123.45", int(time.time() * 1000), None)
        await ws.send_bytes(encode_frame(Publish(1, (tick,))))
        published = await Device._next(ws)
        assert isinstance(published, Published) and published.accepted == 1, published
    finally:
        await ws.close()


# -- the tests ---------------------------------------------------------------------------------


async def test_two_relays_on_two_ports_share_edits_and_prices(
    tmp_path: Path, own_redis: RedisProcess, database: str
) -> None:
    token = tokens(tmp_path)
    ports = [free_port(), free_port()]
    async with (
        relay_group(tmp_path, database, own_redis.url, ports) as (a, b),
        aiohttp.ClientSession() as http,
    ):
        on_a, on_b = (
            Device(http, a.url, token("alice", "d1")),
            Device(http, b.url, token("alice", "d2")),
        )
        await on_a.connect()
        await on_b.connect()
        await on_a.add("AAPL")
        await eventually(
            "relay B's device sees A's edit", lambda: "AAPL" in symbols_of(on_b.doc), 5
        )
        await on_b.add("MSFT")
        await eventually(
            "relay A's device sees B's edit", lambda: "MSFT" in symbols_of(on_a.doc), 5
        )
        await eventually(
            "both acknowledged", lambda: on_a.acked == {"AAPL"} and on_b.acked == {"MSFT"}
        )

        await publish(http, a.url, token("feed", None, frozenset({"publish"})), "NVDA")
        subscriber = Device(http, b.url, token("bob", "b1"))
        await subscriber.connect()

        async def snapshot_has_price() -> bool:
            await subscriber.subscribe(("NVDA",))
            await asyncio.sleep(0.1)
            return subscriber.prices.get("NVDA") == "123.45"

        deadline = time.monotonic() + 5
        while not await snapshot_has_price():
            assert time.monotonic() < deadline, "a price published on A never reached B"
        for device in (on_a, on_b, subscriber):
            await device.close()


async def test_on_one_port_a_killed_relay_loses_nothing_acknowledged(
    tmp_path: Path, own_redis: RedisProcess, database: str
) -> None:
    """Devices spread by the kernel over two relays on one port edit on; one relay is killed;
    its devices reconnect through the port (to the other) and every acknowledged edit is there,
    on every device and for a new one."""
    token = tokens(tmp_path)
    port = free_port()
    async with (
        relay_group(tmp_path, database, own_redis.url, [port, port], reuse_port=True) as relays,
        aiohttp.ClientSession() as http,
    ):
        devices = [Device(http, relays[0].url, token("alice", f"d{n}")) for n in range(12)]
        for device in devices:
            await device.connect()

        async def edit(rounds: int, tag: str) -> None:
            for n in range(rounds):
                for i, device in enumerate(devices):
                    if device.connected:
                        await device.add(f"{tag}{i}X{n}")
                await asyncio.sleep(0.01)

        await edit(5, "B")
        relays[0].kill()  # one of the two: about half the devices lose their relay
        await relays[0].process.wait()
        await edit(5, "D")
        for device in devices:
            if not device.connected:
                await device.connect()  # the port now leads to the surviving relay
        await edit(3, "A")
        # A device may learn only now that its relay died (a loaded machine reads the closed
        # socket late): these raw devices do not reconnect by themselves, so do it for them.
        deadline = time.monotonic() + 30
        while any(d.unacked for d in devices):
            if time.monotonic() > deadline:
                stuck = [(d.connects, d.errors[-3:]) for d in devices if d.unacked]
                pytest.fail(f"every edit acknowledged: not within 30 s: {stuck}")
            for device in devices:
                if not device.connected:
                    await device.connect()
            await asyncio.sleep(0.05)
        acked = set().union(*(d.acked for d in devices))
        assert len(acked) >= 12 * 8, len(acked)
        assert any(d.connects == 2 for d in devices), "no device was on the killed relay"
        await eventually(
            "every device holds every acknowledged edit",
            lambda: all(acked <= symbols_of(d.doc) for d in devices),
        )
        late = Device(http, relays[1].url, token("alice", "late"))
        await late.connect()
        assert acked <= symbols_of(late.doc)
        for device in [*devices, late]:
            await device.close()


async def test_redis_down_refuses_writes_clearly_and_the_group_recovers(
    tmp_path: Path, own_redis: RedisProcess, database: str
) -> None:
    token = tokens(tmp_path)
    async with (
        relay_group(tmp_path, database, own_redis.url, [free_port(), free_port()]) as (a, b),
        aiohttp.ClientSession() as http,
    ):
        on_a, on_b = (
            Device(http, a.url, token("alice", "d1")),
            Device(http, b.url, token("alice", "d2")),
        )
        await on_a.connect()
        await on_b.connect()
        await on_a.add("BEFORE")
        await eventually("B sees A's edit", lambda: "BEFORE" in symbols_of(on_b.doc))
        own_redis.stop()
        await asyncio.sleep(0.5)  # the relays' readers notice at once: their connection breaks
        await on_a.add("DURING")
        await eventually("A refuses it", lambda: bool(on_a.errors) and not on_a.connected)
        error = on_a.errors[-1]
        assert error.code == "internal" and "other relays are unreachable" in error.message, error
        assert on_a.acked == {"BEFORE"}, "nothing acknowledged while the bus is down"
        own_redis.start()  # empty: it kept nothing, the relays reload from PostgreSQL

        async def resend() -> bool:
            if not on_a.connected:
                on_a.errors.clear()
                await on_a.connect()
            await asyncio.sleep(0.3)
            return "DURING" in on_a.acked

        deadline = time.monotonic() + 20
        while not await resend():
            assert time.monotonic() < deadline, f"writes not accepted again: {on_a.errors}"
        await eventually(
            "B sees the edit made after recovery", lambda: "DURING" in symbols_of(on_b.doc)
        )
        await on_b.add("AFTER")
        await eventually("A sees B's edit", lambda: "AFTER" in symbols_of(on_a.doc))
        for device in (on_a, on_b):
            await device.close()


async def test_postgresql_unreachable_refuses_writes_clearly_and_the_group_recovers(
    tmp_path: Path, own_redis: RedisProcess, database: str
) -> None:
    proxy = TcpProxy(("127.0.0.1", 5432))
    await proxy.start()
    token = tokens(tmp_path)
    try:
        async with (
            relay_group(
                tmp_path, proxy.dsn(database), own_redis.url, [free_port(), free_port()]
            ) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            on_a, on_b = (
                Device(http, a.url, token("alice", "d1")),
                Device(http, b.url, token("alice", "d2")),
            )
            await on_a.connect()
            await on_b.connect()
            await on_a.add("BEFORE")
            await eventually("B sees A's edit", lambda: "BEFORE" in symbols_of(on_b.doc))
            await proxy.cut()
            await on_a.add("DURING")
            await eventually("A refuses it", lambda: bool(on_a.errors) and not on_a.connected, 30)
            error = on_a.errors[-1]
            assert error.code == "internal" and "store is unreachable" in error.message, error
            assert on_a.acked == {"BEFORE"} and "DURING" not in symbols_of(on_b.doc)
            # Reads while it is down: a connect is refused clearly too (the document list).
            with pytest.raises(AssertionError):
                await Device(http, b.url, token("alice", "d3")).connect()
            await proxy.restore()

            async def resend() -> bool:
                if not on_a.connected:
                    on_a.errors.clear()
                    with contextlib.suppress(AssertionError, aiohttp.ClientError):
                        await on_a.connect()
                await asyncio.sleep(0.3)
                return "DURING" in on_a.acked

            deadline = time.monotonic() + 30
            while not await resend():
                assert time.monotonic() < deadline, f"writes not accepted again: {on_a.errors}"
            await eventually("B sees it", lambda: "DURING" in symbols_of(on_b.doc))
            for device in (on_a, on_b):
                await device.close()
    finally:
        await proxy.cut()


async def test_workers_start_several_relays_on_one_port_and_stop_together(
    tmp_path: Path, own_redis: RedisProcess, database: str
) -> None:
    token = tokens(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    process = await asyncio.create_subprocess_exec(
        *(foliosync(), "relay", "--feed", "none", "--port", str(port), "--data", str(tmp_path)),
        *("--store", database, "--redis", own_redis.url, "--workers", "2"),
        *("--relay-id", "w", "--log-level", "WARNING"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        lines = [await asyncio.wait_for(process.stdout.readline(), 30) for _ in range(2)]
        assert all(line.startswith(b"foliosync relay on") for line in lines), lines
        assert {b"relay w/1 " in b" ".join(lines), b"relay w/2 " in b" ".join(lines)} == {True}
        async with aiohttp.ClientSession() as http:
            one = Device(http, f"ws://127.0.0.1:{port}/ws", token("alice", "d1"))
            two = Device(http, f"ws://127.0.0.1:{port}/ws", token("alice", "d2"))
            await one.connect()
            await two.connect()
            await one.add("AAPL")
            await eventually("the other device sees it", lambda: "AAPL" in symbols_of(two.doc))
            await one.close()
            await two.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- sharing across the group: two relays in this process, on two ports -----------------------


Raw = _services().RawClient


async def call(
    http: aiohttp.ClientSession, base: str, token: str, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.request(method, base + path, json=body, headers=headers) as response:
        return response.status, await response.json()


@contextlib.asynccontextmanager
async def two_relays(
    relay_server: Any, data_dir: Path, dsn: str, redis_url: str
) -> AsyncIterator[tuple[Any, Any]]:
    """Relays A and B in this process, on two ports, over one PostgreSQL and one Redis (and one
    secret, in ``data_dir``): each as ``foliosync relay --store ... --redis ...`` builds it."""
    options = {"store_url": dsn, "redis_url": redis_url, "feed": "none"}
    async with (
        relay_server(data_dir, relay_id="relay-a", **options) as a,
        relay_server(data_dir, relay_id="relay-b", **options) as b,
    ):
        yield a, b


async def test_a_share_revoked_or_granted_through_one_relay_reaches_the_grantee_on_another(
    tmp_path: Path, own_redis: RedisProcess, database: str, relay_server: Any
) -> None:
    async with (
        two_relays(relay_server, tmp_path, database, own_redis.url) as (a, b),
        aiohttp.ClientSession() as http,
    ):
        alice_token, bob_token = a.token("alice", "a1"), a.token("bob", "b1")
        share = {"doc": TECH, "user": "bob", "access": "write"}
        assert (await call(http, a.http, alice_token, "POST", "/v1/shares", share))[0] == 201
        bob = Raw(await http.ws_connect(b.url))  # on relay B
        assert (await bob.hello(bob_token)).documents == (f"alice/{TECH}",)
        await bob.sync(f"alice/{TECH}")
        alice = Raw(await http.ws_connect(a.url))  # on relay A
        await alice.hello(alice_token)
        await alice.sync(TECH)
        alice_on_b = Raw(await http.ws_connect(b.url))  # a second device of alice's, on B
        await alice_on_b.hello(a.token("alice", "a2"))
        await alice_on_b.sync(TECH)

        await alice.send(Update(TECH, 1, watchlist_update(Doc(), "AAPL")))
        assert await alice.receive() == Ack(TECH, 1)
        got = await bob.receive()
        assert isinstance(got, Update) and got.doc == f"alice/{TECH}", got
        assert isinstance(await alice_on_b.receive(), Update)

        status, _ = await call(http, a.http, alice_token, "DELETE", f"/v1/shares/{TECH}/bob")
        assert status == 200
        started = time.monotonic()
        notice = await bob.receive(timeout=5)  # bob sends nothing: relay B tells him by itself
        took = time.monotonic() - started
        assert isinstance(notice, Error) and not notice.fatal, notice
        assert (notice.code, notice.doc, notice.seq) == ("revoked", f"alice/{TECH}", None)
        assert took < 3, took
        # alice edits through both relays: her device on B gets the one of A, bob neither.
        await alice.send(Update(TECH, 2, watchlist_update(Doc(), "NVDA")))
        assert await alice.receive() == Ack(TECH, 2)
        assert isinstance(await alice_on_b.receive(), Update)  # NVDA, from relay A
        await alice_on_b.send(Update(TECH, 1, watchlist_update(Doc(), "MSFT")))
        assert await alice_on_b.receive() == Ack(TECH, 1)
        assert isinstance(await alice.receive(), Update)  # MSFT, from relay B
        await bob.quiet()
        await bob.send(Update(f"alice/{TECH}", 1, watchlist_update(Doc(), "EVIL")))
        refused = await bob.receive()
        assert isinstance(refused, Error) and (refused.code, refused.seq) == ("revoked", 1)

        # A share granted through A: bob's connection on B is told at once.
        portfolio = document_id(DocumentKind.PORTFOLIO, "Main")
        share = {"doc": portfolio, "user": "bob", "access": "read"}
        assert (await call(http, a.http, alice_token, "POST", "/v1/shares", share))[0] == 201
        shared = await bob.receive(timeout=5)
        assert isinstance(shared, Error) and not shared.fatal, shared
        assert (shared.code, shared.doc) == ("shared", f"alice/{portfolio}")
        assert "read-only" in shared.message, shared
        await alice_on_b.quiet()  # the notice is the grantee's only
        for raw in (alice, alice_on_b, bob):
            await raw.ws.close()


async def test_a_token_revoked_through_one_relay_closes_its_socket_on_another(
    tmp_path: Path, own_redis: RedisProcess, database: str, relay_server: Any
) -> None:
    async with (
        two_relays(relay_server, tmp_path, database, own_redis.url) as (a, b),
        aiohttp.ClientSession() as http,
    ):
        laptop, phone = Raw(await http.ws_connect(b.url)), Raw(await http.ws_connect(b.url))
        await laptop.hello(a.token("bob", "laptop"))
        await phone.hello(a.token("bob", "phone"))
        admin = a.token("ops", scopes=frozenset({"admin"}))
        revocation = {"device": "laptop", "user": "bob"}
        status, answer = await call(http, a.http, admin, "POST", "/v1/revocations", revocation)
        assert (status, answer) == (200, {"closed": 0})  # relay A held none of them
        started = time.monotonic()
        fatal = await laptop.receive(timeout=5)
        took = time.monotonic() - started
        assert isinstance(fatal, Error) and fatal.fatal, fatal
        assert (fatal.code, fatal.message) == ("auth_failed", "token revoked")
        assert await laptop.receive() is None  # and closed
        assert took < 3, took
        await phone.quiet()  # another device of bob's
        await phone.ws.close()


async def test_a_relay_that_may_have_missed_control_events_rechecks_its_connections(
    tmp_path: Path, own_redis: RedisProcess, database: str, relay_server: Any
) -> None:
    """A share ended and a token revoked in the store with no control event (as if relay A's
    outbox overflowed while Redis was away); then a peer's "could not publish" record: relay B
    checks its open connections against the store before it reloads anything."""
    import msgpack
    from redis.asyncio import Redis

    from foliosync.server.sharing import Revocation

    async with (
        two_relays(relay_server, tmp_path, database, own_redis.url) as (a, b),
        aiohttp.ClientSession() as http,
    ):
        alice_token = a.token("alice", "a1")
        share = {"doc": TECH, "user": "bob", "access": "write"}
        assert (await call(http, a.http, alice_token, "POST", "/v1/shares", share))[0] == 201
        bob = Raw(await http.ws_connect(b.url))
        await bob.hello(a.token("bob", "b1"))
        await bob.sync(f"alice/{TECH}")
        laptop = Raw(await http.ws_connect(b.url))
        await laptop.hello(a.token("carol", "laptop"))
        await a.relay.shares.revoke("alice", TECH, "bob")  # the store only: no one is told
        await a.relay.shares.revoke_tokens(Revocation(int(time.time()), "carol", "laptop"))
        await bob.quiet()
        await laptop.quiet()
        client = Redis.from_url(own_redis.url)
        try:
            marker = msgpack.packb(["relay-c", [[2, time.time_ns()]]])
            await client.xadd("foliosync:changes", {b"c": marker})
        finally:
            await client.aclose()
        notice = await bob.receive()
        assert isinstance(notice, Error) and (notice.code, notice.doc) == (
            "revoked",
            f"alice/{TECH}",
        )
        fatal = await laptop.receive()
        assert isinstance(fatal, Error) and (fatal.code, fatal.fatal) == ("auth_failed", True)
        assert await laptop.receive() is None
        await bob.quiet()  # told once, and nothing of the reload
        await bob.ws.close()
