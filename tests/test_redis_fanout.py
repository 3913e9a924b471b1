"""RedisFanOut and RedisPriceBus between two relays' documents over one shared store.

No relay runs here: two ``RelayDocuments`` over one ``MemoryRelayStore`` play the two relays,
each with its own ``RedisFanOut``, as ``foliosync relay --redis`` would wire them. The tests that
stop Redis run a ``redis-server`` of their own on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from pycrdt import Doc, Map
from redis.asyncio import Redis

from foliosync.server.documents import RelayDocuments
from foliosync.server.fanout import (
    Change,
    ControlEvent,
    ShareRevoked,
    TokensRevoked,
    websocket_binary_frame,
)
from foliosync.server.prices import PriceHub
from foliosync.server.redis_fanout import RedisFanOut
from foliosync.server.redis_prices import RedisPriceBus
from foliosync.server.storage import MemoryRelayStore, Watermark
from foliosync.sync.errors import ConfigError, FolioSyncError
from foliosync.sync.prices import Tick

USER, DOC = "alice", "watchlist:tech"


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def shared_redis_url() -> str:
    _services().require_redis()
    url: str = _services().redis_url()
    return url


async def eventually(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.005)


class Writer:
    """A device editing one document: each edit is one V1 update."""

    def __init__(self) -> None:
        self.doc: Doc[Any] = Doc()
        self.items = self.doc.get("items", type=Map)

    def edit(self, key: str, value: str) -> bytes:
        before = self.doc.get_state()
        self.items[key] = value
        return self.doc.get_update(before)


class Side:
    """One relay: its documents over the shared store, its fan-out, what its devices got."""

    def __init__(self, relay_id: str, store: MemoryRelayStore, url: str, prefix: str) -> None:
        self.relay_id, self.store, self.url, self.prefix = relay_id, store, url, prefix
        self.documents = RelayDocuments(store)
        self.fanout: RedisFanOut | None = None
        self.delivered: list[Change] = []
        self.peer_changes = 0
        self.reloads = 0
        self.hot: set[tuple[str, str]] = set()

    def on_peer_change(self, change: Change) -> None:
        self.peer_changes += 1
        self.documents.apply_peer(
            change.user,
            change.doc_id,
            change.update,
            Watermark(change.changed_at, change.changed_by),
        )

    async def on_missed(self) -> None:
        """What the relay does: every hot document is brought up to the store, and its devices
        are sent what they lack (the diff from the hot copy's state)."""
        self.reloads += 1
        fanout = self.fanout
        assert fanout is not None
        for user, doc_id in sorted(self.hot):
            stored = await self.store.load(user, doc_id)
            if stored is None:
                continue
            _, before, _ = await self.documents.state(user, doc_id, b"\x00")
            for update in (stored.snapshot, *stored.updates):
                if update:
                    self.documents.apply_peer(user, doc_id, update, stored.watermark)
            diff, _, watermark = await self.documents.state(user, doc_id, before)
            fanout.deliver_local(
                Change(user, doc_id, diff, watermark.changed_at or 0, "relay", "", self.relay_id)
            )

    async def start(self, **options: Any) -> RedisFanOut:
        self.fanout = RedisFanOut(
            self.url,
            relay_id=self.relay_id,
            on_peer_change=self.on_peer_change,
            on_missed=self.on_missed,
            prefix=self.prefix,
            **options,
        )
        self.fanout.subscribe(USER, self.delivered.append)
        await self.fanout.start()
        return self.fanout

    async def load(self, doc_id: str = DOC) -> None:
        """Make the document hot here (a device synced it)."""
        await self.documents.state(USER, doc_id, b"\x00")
        self.hot.add((USER, doc_id))

    async def write(self, update: bytes, n: int, doc_id: str = DOC) -> Change:
        """Store, then publish: what the relay does with a device's update."""
        assert self.fanout is not None
        origin = f"{self.relay_id}:{n}"
        applied = await self.documents.apply(
            USER, doc_id, update, device="phone", now_ms=1_700_000_000_000 + n, origin=origin
        )
        assert applied.changed
        change = Change(USER, doc_id, update, 1_700_000_000_000 + n, "phone", origin, self.relay_id)
        await self.fanout.publish(change)
        return change

    async def items(self, doc_id: str = DOC) -> dict[str, Any]:
        """The hot copy's content (a miss would load it from the store: asserted elsewhere)."""
        diff, _, _ = await self.documents.state(USER, doc_id, b"\x00")
        doc: Doc[Any] = Doc()
        doc.apply_update(diff)
        content: dict[str, Any] = doc.get("items", type=Map).to_py()
        return content

    @property
    def outbox(self) -> int:
        return 0 if self.fanout is None else self.fanout.outbox

    async def close(self) -> None:
        if self.fanout is not None:
            await self.fanout.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    url = shared_redis_url()
    name = f"test-redis-fanout-{uuid.uuid4().hex[:12]}:"
    yield name
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def two_relays(url: str, prefix: str, **options: Any) -> AsyncIterator[tuple[Side, Side]]:
    store = MemoryRelayStore()
    a, b = Side("relay-a", store, url, prefix), Side("relay-b", store, url, prefix)
    try:
        await a.start(**options)
        await b.start(**options)
        yield a, b
    finally:
        await a.close()
        await b.close()


# -- one shared Redis ---------------------------------------------------------------------------


async def test_a_change_stored_by_one_relay_is_applied_to_the_others_hot_copy(prefix: str) -> None:
    async with two_relays(shared_redis_url(), prefix) as (a, b):
        writer = Writer()
        await a.load()
        await b.load()
        misses = b.documents.misses
        sent = await a.write(writer.edit("AAPL", "Apple"), 1)
        await eventually("relay-b's device gets it", lambda: len(b.delivered) == 1)
        got = b.delivered[0]
        assert (got.update, got.origin, got.relay) == (sent.update, "relay-a:1", "relay-a")
        assert got.frame, "a peer's change comes with its Update frame made once"
        # ... and framed for the WebSocket once: what lets the relay hold and merge it
        assert got.wire == websocket_binary_frame(got.frame)
        assert b.peer_changes == 1
        assert await b.items() == {"AAPL": "Apple"}
        assert b.documents.misses == misses, "read from memory, not reloaded from the store"
        assert a.delivered == [sent], "its own relay's devices got it at publish time"
        assert a.peer_changes == 0, "a relay does not apply its own change twice"
        _, watermark_at_b = (await b.documents.state(USER, DOC, b"\x00"))[1:]
        assert watermark_at_b == Watermark(1_700_000_000_001, "phone")
        assert b.reloads == 1 and a.reloads == 1, "a first start only (nothing was hot)"


async def test_a_restarted_relay_catches_up_from_its_offset(prefix: str) -> None:
    async with two_relays(shared_redis_url(), prefix) as (a, b):
        writer = Writer()
        await a.load()
        await b.load()
        await a.write(writer.edit("AAPL", "Apple"), 1)
        await eventually("relay-b reads the first", lambda: b.peer_changes == 1)
        await b.close()
        for n in range(2, 7):
            await a.write(writer.edit(f"S{n}", str(n)), n)
        reloads = b.reloads
        fanout = await b.start()  # the same relay id: resumes from its offset
        await eventually("relay-b catches up", lambda: b.peer_changes == 6)
        assert b.reloads == reloads, "nothing was missed: no reload"
        assert len(await b.items()) == 6
        assert [c.origin for c in b.delivered[1:]] == [f"relay-a:{n}" for n in range(2, 7)]
        assert fanout.received == 5


async def test_a_relay_killed_between_storing_and_publishing_makes_its_peers_reload(
    prefix: str,
) -> None:
    """Stored and acknowledged, never published: the peers' hot copies lack the change (a
    deletion in it would never reach their devices) until the relay's next start says so."""
    async with two_relays(shared_redis_url(), prefix) as (a, b):
        writer = Writer()
        await a.load()
        await b.load()
        await a.write(writer.edit("AAPL", "Apple"), 1)
        await eventually("relay-b reads the first", lambda: b.peer_changes == 1)
        stored = await a.documents.apply(
            USER, DOC, writer.edit("lost", "x"), device="phone", now_ms=1, origin="a:2"
        )
        assert stored.changed
        killed = a.fanout
        assert killed is not None
        for task in killed._tasks:  # SIGKILL: no close, no outbox flushed, the mark stays
            task.cancel()
        reloads = b.reloads
        restarted = Side("relay-a", a.store, a.url, a.prefix)
        try:
            fanout = await restarted.start()
            assert fanout.unclean_start
            await eventually("relay-b is told to reload", lambda: b.reloads == reloads + 1)
            assert await b.items() == {"AAPL": "Apple", "lost": "x"}
            assert b.delivered[-1].update, "its devices are sent what the reload found"
        finally:
            await restarted.close()
        again = Side("relay-a", a.store, a.url, a.prefix)
        try:
            assert not (await again.start()).unclean_start, "a closed relay left no mark"
        finally:
            await again.close()
        assert b.reloads == reloads + 1


async def test_a_relay_away_longer_than_the_stream_holds_reloads_its_hot_documents(
    prefix: str,
) -> None:
    async with two_relays(shared_redis_url(), prefix, maxlen=100) as (a, b):
        writer = Writer()
        await a.load()
        await b.load()
        await a.write(writer.edit("first", "1"), 0)
        await eventually("relay-b reads the first", lambda: b.peer_changes == 1)
        await b.close()
        assert a.fanout is not None
        for n in range(1, 401):
            await a.write(writer.edit(f"k{n}", str(n)), n)
            await eventually("each change is an entry of its own", lambda: not a.outbox)
        reloads = b.reloads
        await b.start(maxlen=100)
        assert b.reloads == reloads + 1, "the trimmed stream is noticed before start returns"
        assert len(await b.items()) == 401, "the reload from the store holds every change"
        await a.write(writer.edit("after", "x"), 401)
        await eventually("relay-b reads on after the reload", lambda: len(b.delivered) >= 3)
        assert b.delivered[-1].origin == "relay-a:401"
        assert b.delivered[-2].update, "the devices were sent what the reload found"


async def test_bad_entries_on_the_stream_are_skipped_and_counted(prefix: str) -> None:
    url = shared_redis_url()
    async with two_relays(url, prefix) as (a, b):
        client = Redis.from_url(url)
        try:
            for junk in (b"\xc1", b"\x93\x01\x02\x03", b"\x99" + b"\x01" * 9):
                await client.xadd(f"{prefix}changes", {b"c": junk})
            await client.xadd(f"{prefix}changes", {b"other": b"field"})
        finally:
            await client.aclose()
        writer = Writer()
        await b.load()
        await a.write(writer.edit("AAPL", "Apple"), 1)
        await eventually("the change after the junk arrives", lambda: len(b.delivered) == 1)
        assert b.fanout is not None and b.fanout.bad_records == 4
        assert await b.items() == {"AAPL": "Apple"}


async def test_control_records_a_relay_does_not_know_are_skipped_and_counted(
    prefix: str,
) -> None:
    """A newer relay's control kind, or a record of a known kind with wrong fields, is skipped;
    the good one written among them still arrives, exactly."""
    url = shared_redis_url()
    async with two_relays(url, prefix) as (a, b):
        assert b.fanout is not None and a.fanout is not None
        got: list[ControlEvent] = []
        b.fanout.subscribe_control(got.append)
        records: list[list[object]] = [
            [3, 1, "moved", "alice", "wl-1", "bob"],
            [3, 1, "granted", "alice", "wl-1", "bob", "admin"],
            [3, 1, "unshared", "alice", "wl-1"],
            [3, 1, "tokens", "yesterday", "alice", "laptop", ""],
            [3, "soon", "unshared", "alice", "wl-1", "bob"],
            [3, 1, "unshared", "alice", "wl-1", "bob"],
        ]
        entry = msgpack.packb(["relay-c", records], use_bin_type=True)
        client = Redis.from_url(url)
        try:
            await client.xadd(f"{prefix}changes", {b"c": entry})
        finally:
            await client.aclose()
        await a.fanout.publish_control(TokensRevoked(1_700_000_000, user="bob", device="laptop"))
        await eventually("the control event after the junk arrives", lambda: len(got) == 2)
        assert got == [
            ShareRevoked("alice", "wl-1", "bob"),
            TokensRevoked(1_700_000_000, user="bob", device="laptop"),
        ], got
        assert b.fanout.bad_records == 5 and b.fanout.control_received == 2


async def test_bad_settings_are_refused() -> None:
    for options in (
        {"relay_id": ""},
        {"relay_id": "x", "maxlen": 10},
        {"relay_id": "x", "block_s": 0},
    ):
        with pytest.raises(ConfigError):
            RedisFanOut("redis://127.0.0.1:1/0", on_peer_change=lambda c: None, **options)


async def test_a_prefix_bound_to_another_store_is_refused_with_what_to_do(prefix: str) -> None:
    """Two groups on one prefix would apply each other's changes to documents of the same ids."""
    store = MemoryRelayStore()
    first, same, other = (Side(n, store, shared_redis_url(), prefix) for n in ("a", "b", "c"))
    try:
        await first.start(store_id="store-one")
        await same.start(store_id="store-one")  # the same store: one group, welcome
        with pytest.raises(ConfigError, match=f"{prefix}store") as refused:
            await other.start(store_id="store-two")
        assert "store-one" in str(refused.value) and "--redis-prefix" in str(refused.value)
        client = Redis.from_url(shared_redis_url())
        try:  # the operator's way out, once the old store is gone for good
            assert await client.ttl(f"{prefix}store") > 0  # nor does it outlive its group
            await client.delete(f"{prefix}store")
        finally:
            await client.aclose()
        await other.close()
        await other.start(store_id="store-two")
    finally:
        for side in (first, same, other):
            await side.close()


async def test_publish_to_delivery_latency_between_two_relays(prefix: str) -> None:
    """10,000 changes from relay-a to relay-b's subscriber, paced as a busy relay sends them
    (bursts of 10 a millisecond apart), then one unpaced burst: the report's figures."""
    async with two_relays(shared_redis_url(), prefix) as (a, b):
        assert a.fanout is not None and b.fanout is not None
        sent_at: dict[bytes, float] = {}
        lags: list[float] = []

        def measure(change: Change) -> None:
            lags.append(time.perf_counter() - sent_at[change.update])

        b.fanout.subscribe("bench", measure)

        async def run(count: int, pace: bool) -> list[float]:
            lags.clear()
            for n in range(count):
                update = uuid.uuid4().bytes
                sent_at[update] = time.perf_counter()
                await a.fanout.publish(  # type: ignore[union-attr]
                    Change(
                        "bench", f"watchlist:{n % 50}", update, n, "phone", "relay-a:1", "relay-a"
                    )
                )
                if pace and n % 10 == 9:
                    await asyncio.sleep(0.001)
            await eventually(f"{count} changes arrive", lambda: len(lags) >= count, 60.0)
            return sorted(lags)

        for name, pace in (("paced", True), ("burst", False)):
            started = time.perf_counter()
            got = await run(10_000, pace)
            elapsed = time.perf_counter() - started
            p50, p99 = got[len(got) // 2], got[int(len(got) * 0.99)]
            print(
                f"\n{name}: 10000 changes in {elapsed:.2f} s, publish->delivery"
                f" p50 {p50 * 1000:.2f} ms p99 {p99 * 1000:.2f} ms"
                f" mean {statistics.fmean(got) * 1000:.2f} ms"
            )
            assert len(got) == 10_000
            if pace:
                assert p50 < 0.05 and p99 < 0.25, (p50, p99)


# -- a Redis of our own, stopped and started ---------------------------------------------------


RedisProcess = _services().RedisProcess  # own_redis, the fixture (conftest), gives one


FAST = {"backoff": (0.02, 0.2), "block_s": 0.2, "ping_timeout": 0.5}


async def raises_folio(call: Callable[[], Awaitable[None]]) -> bool:
    try:
        await call()
    except FolioSyncError:
        return True
    return False


async def test_redis_restarted_mid_way_nothing_lost_nothing_twice(own_redis: RedisProcess) -> None:
    async with two_relays(own_redis.url, "t:", **FAST) as (a, b):
        assert a.fanout is not None and b.fanout is not None
        writer = Writer()
        await a.load()
        await b.load()
        for n in range(10):
            await a.write(writer.edit(f"before{n}", str(n)), n)
        await eventually("relay-b reads the first ten", lambda: len(b.delivered) == 10)
        reloads = b.reloads
        own_redis.stop()
        assert await raises_folio(a.fanout.ping) and await raises_folio(b.fanout.ping)
        for n in range(10, 20):  # stored and acknowledged while the bus is away
            await a.write(writer.edit(f"during{n}", str(n)), n)
        assert len(a.delivered) == 20, "relay-a's own devices are not held up"
        await asyncio.sleep(0.3)
        assert a.fanout.outbox == 10
        own_redis.start()  # empty: it kept nothing
        await eventually("relay-b gets what waited", lambda: len(b.delivered) >= 20 + 1)
        await eventually("relay-a's outbox is empty", lambda: a.outbox == 0)
        for n in range(20, 25):
            await a.write(writer.edit(f"after{n}", str(n)), n)
        await eventually("relay-b reads on", lambda: b.peer_changes == 25)
        await asyncio.sleep(0.3)  # room for a wrong second delivery
        from_a = [c.origin for c in b.delivered if c.relay == "relay-a"]
        assert from_a == [f"relay-a:{n}" for n in range(25)], from_a
        assert b.reloads == reloads + 1, "the lost stream was noticed once"
        assert len(await b.items()) == 25
        await a.fanout.ping()
        await b.fanout.ping()
        assert b.fanout.stats.errors >= 1


async def test_connections_cut_mid_way_resume_from_the_offset(own_redis: RedisProcess) -> None:
    """Redis keeps its data but drops every connection: the readers resume where they were,
    with no reload and no entry delivered twice."""
    async with two_relays(own_redis.url, "t:", **FAST) as (a, b):
        writer = Writer()
        await b.load()
        reloads = b.reloads
        killer = Redis.from_url(own_redis.url)
        try:
            for n in range(30):
                await a.write(writer.edit(f"k{n}", str(n)), n)
                if n % 10 == 5:
                    await killer.execute_command(
                        "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
                    )
            await eventually("relay-b gets all thirty", lambda: b.peer_changes >= 30)
        finally:
            await killer.aclose()
        await asyncio.sleep(0.3)  # room for a wrong second delivery
        assert [c.origin for c in b.delivered] == [f"relay-a:{n}" for n in range(30)]
        assert b.reloads == reloads, "nothing was lost: no reload"
        assert len(await b.items()) == 30
        assert b.fanout is not None and b.fanout.stats.errors >= 1, "the cut was noticed"


async def test_a_full_outbox_makes_the_peers_reload(own_redis: RedisProcess) -> None:
    async with two_relays(own_redis.url, "t:", max_outbox=5, **FAST) as (a, b):
        assert a.fanout is not None and b.fanout is not None
        writer = Writer()
        await a.load()
        await b.load()
        await a.write(writer.edit("first", "1"), 0)
        await eventually("relay-b reads the first", lambda: b.peer_changes == 1)
        # Unreachable without losing data: the outbox fills while the writer cannot send.
        own_redis.stop()
        for n in range(1, 13):
            await a.write(writer.edit(f"k{n}", str(n)), n)
        assert a.fanout.dropped == 7 and a.fanout.outbox == 5
        reloads = b.reloads
        own_redis.start()
        await eventually("relay-b reloads", lambda: b.reloads > reloads)
        await eventually("relay-b has every change", lambda: b.peer_changes >= 6)
        await eventually("relay-a's outbox is empty", lambda: a.outbox == 0)
        assert len(await b.items()) == 13


async def test_a_relay_started_while_redis_is_down_connects_later(own_redis: RedisProcess) -> None:
    own_redis.stop()
    store = MemoryRelayStore()
    a = Side("relay-a", store, own_redis.url, "t:")
    b = Side("relay-b", store, own_redis.url, "t:")
    try:
        started = time.monotonic()
        await a.start(**FAST)
        assert time.monotonic() - started < 5, "start does not wait for Redis"
        own_redis.start()
        await b.start(**FAST)
        writer = Writer()
        await a.load()
        await eventually("relay-a's reader is placed", lambda: a.reloads == 1)
        await b.write(writer.edit("AAPL", "Apple"), 1)
        await eventually("relay-a gets relay-b's change", lambda: a.peer_changes == 1)
        assert await a.items() == {"AAPL": "Apple"}
    finally:
        await a.close()
        await b.close()
    assert not [t for t in asyncio.all_tasks() if "fanout" in t.get_name() and not t.done()]


# -- prices -------------------------------------------------------------------------------------


async def test_prices_published_on_one_relay_reach_the_others_hub_once(prefix: str) -> None:
    url = shared_redis_url()
    got: dict[str, list[list[Tick]]] = {"a": [], "b": [], "c": []}
    buses = [
        RedisPriceBus(url, relay_id=name, on_peer_ticks=got[name].append, prefix=prefix)
        for name in got
    ]
    try:
        for bus in buses:
            await bus.start()
        now = int(time.time() * 1000)
        buses[0].publish(
            [Tick("AAPL", Decimal("190.5"), now), Tick("AAPL", Decimal("191"), now + 1)]
        )
        buses[0].publish([Tick("MSFT", Decimal("410.25"), now, Decimal("3"))])
        await eventually(
            "b and c get both symbols",
            lambda: all(sum(len(t) for t in got[n]) >= 2 for n in "bc"),
        )
        await asyncio.sleep(0.1)
        for name in "bc":
            ticks = {t.symbol: t for batch in got[name] for t in batch}
            assert ticks["AAPL"].price == Decimal("191"), "newest wins"
            assert ticks["MSFT"].size == Decimal("3")
            assert sum(len(t) for t in got[name]) == 2, "each tick once, conflated per symbol"
        assert got["a"] == [], "a relay does not hear its own ticks back"
        await buses[0].ping()
    finally:
        for bus in buses:
            await bus.close()
    assert all(not bus._tasks for bus in buses)


async def test_two_hubs_share_prices_without_a_loop(prefix: str) -> None:
    """The wiring the relay uses: its own sources' ticks go to its hub, then what the hub took
    to the bus; a peer's ticks go to the hub only."""
    url = shared_redis_url()
    hub_a, hub_b = PriceHub(), PriceHub()
    bus_a = RedisPriceBus(url, relay_id="relay-a", on_peer_ticks=hub_a.publish, prefix=prefix)
    bus_b = RedisPriceBus(url, relay_id="relay-b", on_peer_ticks=hub_b.publish, prefix=prefix)
    try:
        hub_a.start()
        hub_b.start()
        await bus_a.start()
        await bus_b.start()
        now = int(time.time() * 1000)
        bus_a.publish(hub_a.publish([Tick("AAPL", Decimal("190.5"), now)]))
        bus_b.publish(hub_b.publish([Tick("MSFT", Decimal("410"), now)]))
        await eventually(
            "each hub has both prices", lambda: len(hub_a.book) == len(hub_b.book) == 2
        )
        latest = hub_b.book.latest("AAPL")
        assert latest is not None and latest.price == Decimal("190.5")
        await asyncio.sleep(0.1)  # room for an echo
        assert (hub_a.ticks_in, hub_b.ticks_in) == (2, 2), "each tick once per hub"
        assert (bus_a.sent, bus_b.sent) == (1, 1), "nothing a peer sent is sent again"
    finally:
        for bus in (bus_a, bus_b):
            await bus.close()
        await hub_a.close()
        await hub_b.close()


async def test_prices_survive_a_redis_restart_and_bad_messages_are_skipped(
    own_redis: RedisProcess,
) -> None:
    got: list[Tick] = []
    a = RedisPriceBus(own_redis.url, relay_id="a", on_peer_ticks=list, backoff=FAST["backoff"])
    b = RedisPriceBus(
        own_redis.url, relay_id="b", on_peer_ticks=got.extend, backoff=FAST["backoff"]
    )
    try:
        await a.start()
        await b.start()
        client = Redis.from_url(own_redis.url)
        await client.publish("foliosync:prices", b"\xc1")
        await client.publish("foliosync:prices", b"\x92\xa1x\x91\x94\xa4AAPL\xa2-1\x01\xc0")
        await client.aclose()
        own_redis.stop()
        now = int(time.time() * 1000)
        a.publish([Tick("AAPL", Decimal("1"), now)])  # lost: prices are lossy
        await asyncio.sleep(0.2)
        own_redis.start()
        await eventually("b listens again", lambda: b.errors >= 1)

        async def sent() -> bool:
            a.publish([Tick("MSFT", Decimal("2"), int(time.time() * 1000))])
            await asyncio.sleep(0.05)
            return bool(got)

        deadline = time.monotonic() + 10
        while not await sent():
            assert time.monotonic() < deadline, "no tick after the restart"
        assert {t.symbol for t in got} == {"MSFT"}
        assert b.rejected == 1, "a negative price from a peer is refused like any publisher's"
    finally:
        await a.close()
        await b.close()
