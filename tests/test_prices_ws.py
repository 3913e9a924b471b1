"""Prices on the sync WebSocket: a real relay, raw clients driven by a pure ClientSession."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from foliosync.sync.prices import PricePoint, SequenceTracker
from foliosync.sync.protocol import (
    ClientEvent,
    ClientSession,
    ErrorCode,
    ErrorReceived,
    PongReceived,
    PricesReceived,
    PublishedReceived,
    Welcomed,
)

PUBLISH = frozenset({"publish"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Peer:
    """One WebSocket to the relay, driven by a pure ClientSession."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.session = ClientSession()
        self.batches = 0

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, relay: Any, token: str) -> Peer:
        peer = cls(await http.ws_connect(relay.url))
        await peer.send(peer.session.hello(token, "prices-test"))
        welcome = await peer.next()
        assert isinstance(welcome, Welcomed), welcome
        return peer

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def next(self, timeout: float = 5.0) -> ClientEvent:
        message = await self.ws.receive(timeout=timeout)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        (event,) = self.session.receive_data(message.data)
        return event

    async def prices(self, timeout: float = 5.0) -> PricesReceived:
        event = await self.next(timeout)
        assert isinstance(event, PricesReceived), event
        return event

    async def publish(self, batch: int, ticks: list[list[object]]) -> PublishedReceived:
        await self.send(self.session.publish(batch, ticks))
        answer = await self.next()
        assert isinstance(answer, PublishedReceived), answer
        return answer

    async def still_open(self) -> None:
        await self.send(self.session.ping(99))
        assert await self.next() == PongReceived(99)


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_publisher_gets_the_count_and_the_reason_for_a_bad_tick(
    relay: Any, http: Any
) -> None:
    publisher = await Peer.connect(http, relay, relay.token("feeder", scopes=PUBLISH))
    t = now_ms()
    answer = await publisher.publish(7, [["AAPL", "187.25", t], ["AAPL", "0", t]])
    assert answer.batch == 7 and answer.accepted == 1
    ((index, reason),) = answer.rejected
    assert index == 1 and "positive" in reason
    point = relay.relay.prices.book.latest("AAPL")
    assert point is not None and str(point.price) == "187.25"


async def test_a_subscriber_gets_a_snapshot_then_batches(relay: Any, http: Any) -> None:
    publisher = await Peer.connect(http, relay, relay.token("feeder", scopes=PUBLISH))
    t = now_ms()
    await publisher.publish(1, [["MSFT", "421", t]])
    subscriber = await Peer.connect(http, relay, relay.token("alice", "phone"))
    await subscriber.send(subscriber.session.subscribe(["MSFT", "aapl"]))
    snapshot = await subscriber.prices()
    assert snapshot.snapshot
    assert [PricePoint.from_wire(w).price for w in snapshot.ticks] == [421]
    await publisher.publish(2, [["AAPL", "187", t + 1], ["TSLA", "180", t + 1]])
    batch = await subscriber.prices()
    assert not batch.snapshot
    assert [(w[0], w[1], w[3]) for w in batch.ticks] == [("AAPL", "187", 1)]  # no TSLA
    # an empty snapshot for a symbol nobody priced yet
    other = await Peer.connect(http, relay, relay.token("bob"))
    await other.send(other.session.subscribe(["NOPE"]))
    assert (await other.prices()).ticks == ()


async def test_a_reader_that_does_not_read_gets_few_batches_ending_with_the_newest(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    async with relay_server(tmp_path / "r", price_window_ms=200) as relay:
        subscriber = await Peer.connect(http, relay, relay.token("alice", "slow"))
        await subscriber.send(subscriber.session.subscribe(["AAPL"]))
        assert (await subscriber.prices()).ticks == ()
        (connection,) = [c for c in relay.relay.connections if c.device == "slow"]
        publisher = await Peer.connect(http, relay, relay.token("feeder", scopes=PUBLISH))
        t = now_ms()
        for batch in range(20):  # 1,000 ticks of one symbol; the subscriber reads nothing
            ticks: list[list[object]] = [
                ["AAPL", f"{100 + batch * 50 + i}.25", t + batch * 50 + i] for i in range(50)
            ]
            assert (await publisher.publish(batch, ticks)).accepted == 50
            assert len(connection.prices) <= 1  # one entry per followed symbol, never a queue
        await asyncio.sleep(0.5)  # the subscriber idles a while longer
        received: list[PricesReceived] = []
        while not received or received[-1].ticks[-1][1] != "1099.25":
            received.append(await subscriber.prices(timeout=3))
        assert 1 <= len(received) <= 5, [r.ticks for r in received]
        assert all(len(r.ticks) == 1 for r in received)
        seqs = [r.ticks[0][3] for r in received]
        assert seqs == sorted(seqs) and seqs[-1] == 1000
        assert len(connection.prices) == 0


async def test_a_sync_token_may_not_publish(relay: Any, http: Any) -> None:
    device = await Peer.connect(http, relay, relay.token("alice", "phone"))
    await device.send(device.session.publish(1, [["AAPL", "1", now_ms()]]))
    error = await device.next()
    assert isinstance(error, ErrorReceived)
    assert error.code == ErrorCode.FORBIDDEN and not error.fatal
    await device.still_open()
    assert relay.relay.prices.book.latest("AAPL") is None


async def test_a_publish_only_token_may_not_follow_prices(relay: Any, http: Any) -> None:
    feed = await Peer.connect(http, relay, relay.token("feed", scopes=frozenset({"publish"})))
    await feed.publish(1, [["AAPL", "187.3", now_ms()]])
    # Neither by subscribing nor by asking for a resync of what it would follow.
    for request in (feed.session.subscribe(["AAPL"]), feed.session.resync(["AAPL"])):
        await feed.send(request)
        error = await feed.next()
        assert isinstance(error, ErrorReceived), error
        assert error.code == ErrorCode.FORBIDDEN and not error.fatal
    await feed.still_open()
    assert relay.relay.prices.subscribed_symbols() == set()


async def test_after_a_forced_disconnect_a_resubscribe_gets_the_newest_price(
    relay: Any, http: Any
) -> None:
    publisher = await Peer.connect(http, relay, relay.token("feeder", scopes=PUBLISH))
    subscriber = await Peer.connect(http, relay, relay.token("alice", "phone"))
    tracker = SequenceTracker()
    await subscriber.send(subscriber.session.subscribe(["NVDA"]))
    assert (await subscriber.prices()).ticks == ()
    t = now_ms()
    await publisher.publish(1, [["NVDA", "120", t]])
    (tick,) = (await subscriber.prices()).ticks
    assert tracker.accept(PricePoint.from_wire(tick))

    (connection,) = [c for c in relay.relay.connections if c.device == "phone"]
    await connection.close(code=1012, message=b"restart")
    message = await subscriber.ws.receive(timeout=5)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    for _ in range(100):
        if not relay.relay.prices.subscribed_symbols():
            break
        await asyncio.sleep(0.02)
    assert relay.relay.prices.subscribed_symbols() == set()  # the relay forgot the subscriber

    await publisher.publish(2, [["NVDA", "121.5", t + 1], ["NVDA", "122", t + 2]])  # missed
    again = await Peer.connect(http, relay, relay.token("alice", "phone"))
    await again.send(again.session.subscribe(["NVDA"]))
    snapshot = await again.prices()
    assert snapshot.snapshot
    (point,) = [PricePoint.from_wire(w) for w in snapshot.ticks]
    assert (str(point.price), point.seq) == ("122", 3)
    assert tracker.accept(point, snapshot=True)


class StalledPeer:
    """A WebSocket client on a plain socket with a tiny receive buffer that reads only when told,
    so that the relay's side of the socket really fills up (aiohttp's client would read ahead)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session = ClientSession()

    @classmethod
    async def connect(cls, relay: Any, token: str) -> StalledPeer:
        url = yarl.URL(relay.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (url.host, url.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {url.path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        peer = cls(reader, writer)
        await peer.send(peer.session.hello(token, "stalled"))
        assert isinstance(await peer.next(), Welcomed)
        return peer

    async def send(self, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        head = (
            bytes((0x82, 0x80 | size))
            if size < 126
            else bytes((0x82, 0xFE)) + struct.pack(">H", size)
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    async def next(self, timeout: float = 5.0) -> ClientEvent:
        async with asyncio.timeout(timeout):
            first, second = await self.reader.readexactly(2)
            assert first == 0x82, hex(first)  # a final binary frame, unmasked
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack(">Q", await self.reader.readexactly(8))
            (event,) = self.session.receive_data(await self.reader.readexactly(size))
            return event

    def close(self) -> None:
        self.writer.close()


async def stall(relay: Any, http: Any, symbols: list[str]) -> tuple[StalledPeer, Any, Peer, int]:
    """A subscriber to ``symbols`` that stopped reading, and a publisher that kept on until the
    relay had to hold prices back for it (kernel and transport buffers full)."""
    stalled = await StalledPeer.connect(relay, relay.token("alice", "stalled"))
    await stalled.send(stalled.session.subscribe(symbols))
    assert isinstance(await stalled.next(), PricesReceived)  # the (empty) snapshot
    (connection,) = [c for c in relay.relay.connections if c.device == "stalled"]
    # Small kernel buffers on the relay's side too, or filling them takes megabytes.
    connection._transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
    )
    publisher = await Peer.connect(http, relay, relay.token("feeder", scopes=PUBLISH))
    batch = 0
    while not connection.prices:
        batch += 1
        ticks: list[list[object]] = [[s, f"{batch}.5", T0 + batch] for s in symbols]
        assert (await publisher.publish(batch, ticks)).accepted == len(symbols)
        await asyncio.sleep(0.006)  # about a flush interval
        assert batch < 5000, "the stalled socket never filled up"
    return stalled, connection, publisher, batch


T0 = now_ms()


async def test_a_socket_that_stops_taking_data_costs_one_price_per_symbol_and_control_goes_first(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    symbols = [f"S{i:03d}" for i in range(200)]
    async with relay_server(tmp_path / "r", price_window_ms=0, heartbeat=60) as relay:
        stalled, connection, publisher, batch = await stall(relay, http, symbols)
        transport = connection._transport
        buffered = []
        for _ in range(30):  # more prices while it is stalled: they replace the waiting ones
            batch += 1
            ticks: list[list[object]] = [[s, f"{batch}.5", T0 + batch] for s in symbols]
            await publisher.publish(batch, ticks)
            await asyncio.sleep(0.006)
            assert len(connection.prices) <= len(symbols)  # one per symbol, never a queue
            buffered.append(transport.get_write_buffer_size())
        assert max(buffered) < 1 << 20, buffered  # the writer waits for the socket
        assert buffered[-1] <= buffered[len(buffered) // 2], buffered  # and it stopped growing
        newest = f"{batch}.5"
        await stalled.send(stalled.session.ping(7))  # a control frame while prices wait

        # The reader comes back: the pong comes before the prices that were waiting, and the
        # last price of every symbol is its newest.
        last: dict[str, str] = {}
        after_pong: dict[str, str] = {}
        pong_seen = False
        while len(after_pong) < len(symbols):
            event = await stalled.next()
            if isinstance(event, PongReceived):
                pong_seen = True
                continue
            assert isinstance(event, PricesReceived), event
            for tick in event.ticks:
                last[tick[0]] = tick[1]
                if pong_seen:
                    after_pong[tick[0]] = tick[1]
        assert after_pong == last == dict.fromkeys(symbols, newest)
        assert len(connection.prices) == 0
        await stalled.send(stalled.session.ping(8))
        assert await stalled.next() == PongReceived(8)
        stalled.close()


async def test_a_relay_with_a_stalled_client_still_shuts_down_promptly(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    symbols = [f"S{i:03d}" for i in range(200)]
    async with relay_server(tmp_path / "r", price_window_ms=0, heartbeat=60) as relay:
        stalled, connection, _, _ = await stall(relay, http, symbols)
        transport = connection._transport
        async with asyncio.timeout(10):
            await relay.stop()
        assert transport.is_closing() and transport.get_write_buffer_size() == 0
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, AssertionError)):
            while True:  # what it gets ends with the connection cut, not a clean close
                await stalled.next()
        stalled.close()
