"""Prices on the sync WebSocket: a real relay, raw clients driven by a pure ClientSession."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

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
    await feed.send(feed.session.subscribe(["AAPL"]))
    error = await feed.next()
    assert isinstance(error, ErrorReceived)
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
