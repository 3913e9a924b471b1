"""The relay's /metrics: who may read it, and every metric of the catalog moving under the action
that should move it, with a real relay on 127.0.0.1 and real clients."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pycrdt import Doc, Map

from foliosync import __version__
from foliosync.client.cli import main as foliosync_main
from foliosync.client.replica import Replica
from foliosync.server.fanout import Change, InProcessFanOut
from foliosync.server.metrics import CLOSE_CODES, REFUSAL_REASONS, UPDATE_REFUSALS
from foliosync.server.relay import RelayConfig
from foliosync.server.storage import MemoryRelayStore, RelayStoreError, StoredDocument
from foliosync.server.timings import Timings
from foliosync.sync.errors import ConfigError
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.prices import LatestPrices, PricePoint, TickConflator
from foliosync.sync.protocol import (
    ClientEvent,
    ClientSession,
    ErrorReceived,
    PricesReceived,
    PublishedReceived,
    SyncReplied,
    Update,
    Welcomed,
    encode_frame,
)

from .conftest import RunningRelay, eventually, fast_client

TECH = document_id(DocumentKind.WATCHLIST, "Tech")
ADMIN = frozenset({"admin"})
PUBLISH = frozenset({"publish"})


def read_catalog() -> list[tuple[str, str, tuple[str, ...]]]:
    """deploy/METRICS.md, the contract with the alerting rules and the dashboard: name (as the
    parser names a family: counters without _total), type, label names."""
    catalog = []
    text = (Path(__file__).resolve().parent.parent / "deploy/METRICS.md").read_text()
    for match in re.finditer(
        r"^- (foliosync_\w+)(?:\{([^}]*)\})?\s+(gauge|counter|histogram)\b", text, re.M
    ):
        name, labels, kind = match[1], match[2] or "", match[3]
        if kind == "counter":
            assert name.endswith("_total"), f"deploy/METRICS.md: counter {name} without _total"
            name = name.removesuffix("_total")
        catalog.append((name, kind, tuple(label.strip() for label in labels.split(",") if label)))
    return catalog


CATALOG = read_catalog()


class Scrape:
    """One scrape of /metrics, parsed by prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(relay: RunningRelay) -> Scrape:
    token = relay.token("ops", scopes=ADMIN)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{relay.http}/metrics", headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        assert r.status == 200, await r.text()
        return Scrape(await r.text())


class Peer:
    """A raw protocol client: one WebSocket driven by a pure ClientSession."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.session = ClientSession()

    @classmethod
    async def connect(cls, relay: RunningRelay, token: str, **ws_options: Any) -> Peer:
        http = aiohttp.ClientSession()
        peer = cls(http, await http.ws_connect(relay.url, **ws_options))
        await peer.ws.send_bytes(peer.session.hello(token, "metrics-test"))
        welcome = await peer.next()
        assert isinstance(welcome, Welcomed), welcome
        return peer

    async def next(self, timeout: float = 5.0) -> ClientEvent:
        message = await self.ws.receive(timeout=timeout)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        (event,) = self.session.receive_data(message.data)
        return event

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- who may read it -----------------------------------------------------------------------------


async def test_metrics_take_an_admin_token_and_refuse_others_in_json(
    relay: RunningRelay, http: aiohttp.ClientSession
) -> None:
    url = f"{relay.http}/metrics"
    admin = relay.token("ops", scopes=ADMIN)
    async with http.get(url, headers={"Authorization": f"Bearer {admin}"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        assert "foliosync_connections " in await response.text()
    async with http.get(url, headers={"Authorization": f"Bearer {relay.token('alice')}"}) as r:
        assert r.status == 403
        assert await r.json() == {"error": "this token lacks the admin scope", "code": "forbidden"}
    async with http.get(url) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert (await r.json())["code"] == "unauthorized"
    async with http.get(url, headers={"Authorization": "Bearer not-a-token"}) as r:
        assert r.status == 401 and (await r.json())["code"] == "unauthorized"


async def test_the_metrics_port_answers_without_a_token_on_loopback_only(
    tmp_path: Path, relay_server: Any, http: aiohttp.ClientSession
) -> None:
    async with relay_server(tmp_path / "relay", metrics_port=0, host="0.0.0.0") as relay:
        address = relay.relay.metrics_address
        assert address is not None and address[0] == "127.0.0.1"
        port = relay.relay.metrics_port
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            scraped = Scrape(await response.text())
        assert scraped.value("foliosync_connections") == 0
        async with http.get(f"http://127.0.0.1:{port}/ws") as response:  # nothing else there
            assert response.status == 404 and (await response.json())["code"] == "not_found"
        # the main port still wants a token
        async with http.get(f"{relay.http}/metrics") as response:
            assert response.status == 401


async def test_a_taken_metrics_port_is_a_clear_error(tmp_path: Path, relay_server: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            async with relay_server(tmp_path / "relay", metrics_port=port):
                pass


@pytest.mark.parametrize("port", [-1, 65536, True, "9100", 1.5])
def test_a_bad_metrics_port_is_refused(port: object) -> None:
    with pytest.raises(ConfigError, match="metrics port"):
        RelayConfig(metrics_port=port)  # type: ignore[arg-type]


async def test_several_relays_in_one_process_have_their_own_registries(
    tmp_path: Path, relay_server: Any
) -> None:
    async with (
        relay_server(tmp_path / "a", relay_id="relay-a") as a,
        relay_server(tmp_path / "b", relay_id="relay-b") as b,
    ):
        first, second = await scrape(a), await scrape(b)
    assert first.value("foliosync_relay_info", version=__version__, relay_id="relay-a") == 1
    assert second.value("foliosync_relay_info", version=__version__, relay_id="relay-b") == 1
    assert first.value("foliosync_relay_info", version=__version__, relay_id="relay-b") == 0


async def test_every_metric_of_the_catalog_is_there_with_its_type_and_labels(
    relay: RunningRelay,
) -> None:
    scraped = await scrape(relay)
    assert len(CATALOG) >= 36, "deploy/METRICS.md: fewer metrics than were documented"
    for name, kind, labels in CATALOG:
        family = scraped.families.get(name)
        assert family is not None, f"{name} missing"
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(labels), (name, sample.labels)
    assert scraped.value("foliosync_relay_start_time_seconds") == pytest.approx(time.time(), abs=60)
    assert scraped.value("foliosync_market_open") == (1 if relay.relay.prices.market_open() else 0)
    assert any(n.startswith("process_") for n in scraped.families)
    assert any(n.startswith("python_") for n in scraped.families)
    # exported at 0 from the start, so that rates over them are defined before the first one
    for name, label, values in (
        ("foliosync_connections_refused_total", "reason", REFUSAL_REASONS),
        ("foliosync_updates_refused_total", "reason", UPDATE_REFUSALS),
        ("foliosync_connections_closed_total", "code", CLOSE_CODES),
        ("foliosync_store_errors_total", "operation", ("append", "load", "compact", "list")),
        ("foliosync_frames_sent_total", "type", ("welcome", "update", "ack", "price_batch")),
    ):
        for value in values:
            assert (name, frozenset({(label, value)})) in scraped.samples, (name, value)


# -- connections, frames, updates ----------------------------------------------------------------


async def test_a_device_syncing_moves_connections_frames_updates_store_and_cache(
    relay: RunningRelay, open_replica: Any
) -> None:
    before = await scrape(relay)
    replica: Replica = await open_replica("one")
    watchlist = await replica.create_watchlist("Tech")
    await watchlist.add(["AAPL"])
    await fast_client(replica, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)
    after = await scrape(relay)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("foliosync_connections_opened_total") == 1
    await eventually(lambda: not relay.relay.connections)
    closed = await scrape(relay)
    assert closed.value("foliosync_connections_closed_total", code="1000") == 1
    assert closed.value("foliosync_connections") == 0
    for kind in ("hello", "sync_request", "update"):
        assert moved("foliosync_frames_received_total", type=kind) >= 1, kind
        assert moved("foliosync_received_bytes_total", type=kind) > 0, kind
    for kind in ("welcome", "sync_reply", "ack"):
        assert moved("foliosync_frames_sent_total", type=kind) >= 1, kind
        assert moved("foliosync_sent_bytes_total", type=kind) > 0, kind
    acked = moved("foliosync_updates_acknowledged_total")
    assert acked >= 2  # the watchlist and the index
    assert moved("foliosync_update_store_seconds_count") == acked
    assert moved("foliosync_update_store_seconds_sum") > 0
    assert moved("foliosync_store_seconds_count", operation="append") >= 2
    assert moved("foliosync_store_seconds_count", operation="load") >= 2
    assert moved("foliosync_store_seconds_count", operation="list") == 1
    assert moved("foliosync_document_cache_misses_total") >= 2
    assert moved("foliosync_document_cache_hits_total") >= 2  # its updates found them in memory
    assert after.value("foliosync_documents_hot") >= 2
    assert moved("foliosync_updates_merged_concurrent_total") == 0


async def test_refused_connections_are_counted_by_reason(relay_server: Any, tmp_path: Path) -> None:
    async with relay_server(tmp_path / "relay", hello_timeout=0.2) as relay:
        async with aiohttp.ClientSession() as http:
            for token in ("garbage", relay.token("ops", scopes=ADMIN)):
                async with http.ws_connect(relay.url) as ws:
                    await ws.send_bytes(ClientSession().hello(token))
                    await ws.receive(timeout=5)
            async with http.ws_connect(relay.url) as ws:  # says nothing
                await ws.receive(timeout=5)
            async with http.ws_connect(relay.url) as ws:  # not a frame
                await ws.send_bytes(b"\xc1 not msgpack")
                await ws.receive(timeout=5)
            async with http.ws_connect(relay.url) as ws:  # text
                await ws.send_str("hello?")
                await ws.receive(timeout=5)
        await eventually(lambda: not relay.relay.connections)
        scraped = await scrape(relay)
    refused = "foliosync_connections_refused_total"
    assert scraped.value(refused, reason="auth_failed") == 1
    assert scraped.value(refused, reason="scope") == 1
    assert scraped.value(refused, reason="hello_timeout") == 1
    assert scraped.value(refused, reason="bad_hello") == 2
    assert scraped.value("foliosync_connections_opened_total") == 5


async def test_a_peer_that_stops_answering_pings_is_a_missed_heartbeat(
    relay_server: Any, tmp_path: Path
) -> None:
    async with relay_server(tmp_path / "relay", heartbeat=0.2) as relay:
        quiet = await Peer.connect(relay, relay.token("alice"), autoping=False)
        # a healthy peer (aiohttp answers pings while it reads) is not counted
        healthy = await Peer.connect(relay, relay.token("alice"))
        reader = asyncio.ensure_future(healthy.ws.receive())
        await eventually(
            lambda: (
                relay.relay.counters.heartbeats_missed == 1 and len(relay.relay.connections) == 1
            )
        )
        scraped = await scrape(relay)
        assert scraped.value("foliosync_heartbeats_missed_total") == 1
        assert scraped.value("foliosync_connections_closed_total", code="1006") == 1
        reader.cancel()
        await healthy.close()
        await quiet.http.close()
        await eventually(lambda: not relay.relay.connections)
        scraped = await scrape(relay)
    assert scraped.value("foliosync_heartbeats_missed_total") == 1
    assert scraped.value("foliosync_connections_closed_total", code="1000") == 1


async def test_the_relay_shutting_down_closes_with_1001(relay_server: Any, tmp_path: Path) -> None:
    async with relay_server(tmp_path / "relay") as relay:
        peer = await Peer.connect(relay, relay.token("alice"))
        await relay.relay.close_connections()
        await eventually(lambda: not relay.relay.connections)
        scraped = await scrape(relay)
        await peer.close()
    assert scraped.value("foliosync_connections_closed_total", code="1001") == 1


async def test_a_message_far_over_the_frame_limit_closes_with_1009(
    relay_server: Any, tmp_path: Path
) -> None:
    """Past max_frame_size + 1 KiB aiohttp refuses the message itself: close 1009 and no Error
    frame (PROTOCOL.md section 8), counted under its own code, not as a cut connection."""
    async with relay_server(tmp_path / "relay", max_frame_size=64 << 10) as relay:
        assert (await scrape(relay)).value("foliosync_connections_closed_total", code="1009") == 0
        peer = await Peer.connect(relay, relay.token("alice"))
        await peer.ws.send_bytes(b"\x00" * (64 << 10) * 2)
        message = await peer.ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE, message  # no Error frame before it
        assert peer.ws.close_code == 1009
        await peer.close()
        await eventually(lambda: not relay.relay.connections)
        scraped = await scrape(relay)
    assert scraped.value("foliosync_connections_closed_total", code="1009") == 1
    assert scraped.value("foliosync_connections_closed_total", code="1006") == 0


async def test_refused_updates_are_counted_by_the_code_sent(relay: RunningRelay) -> None:
    peer = await Peer.connect(relay, relay.token("alice"))
    await peer.ws.send_bytes(peer.session.sync_request(TECH, b"\x00"))
    assert isinstance(await peer.next(), SyncReplied)
    await peer.ws.send_bytes(peer.session.update(TECH, 1, b"\x01\x02 not a crdt update"))
    refused = await peer.next()
    assert isinstance(refused, ErrorReceived) and refused.code == "bad_update"
    await peer.close()
    # an Update before its document's SyncRequest: the session refuses it, fatally
    second = await Peer.connect(relay, relay.token("alice"))
    unsynced = document_id(DocumentKind.WATCHLIST, "Other")
    await second.ws.send_bytes(_raw_update(unsynced, 1))
    refused = await second.next()
    assert isinstance(refused, ErrorReceived)
    await second.close()
    scraped = await scrape(relay)
    assert scraped.value("foliosync_updates_refused_total", reason="bad_update") == 1
    assert scraped.value("foliosync_updates_refused_total", reason=refused.code) == 1
    assert scraped.value("foliosync_updates_acknowledged_total") == 0


def _crdt_update(symbol: str = "AAPL", device: str = "raw") -> bytes:
    """A watchlist update adding ``symbol``, in the layout the relay checks."""
    crdt: Doc[Any] = Doc()
    crdt.get("symbols", type=Map)[f"{symbol}\x1f{device}"] = {"t": "0" * 17}
    return crdt.get_update()


def _raw_update(doc: str, seq: int) -> bytes:
    """An Update frame the client session would not send (its document not synced)."""
    return encode_frame(Update(doc, seq, _crdt_update()))


class FailingStore(MemoryRelayStore):
    """The memory store with a disk that fills up: appends fail while ``full``."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        if self.full:
            raise RelayStoreError("simulated full disk")
        return await super().append(user, doc_id, update, changed_at, changed_by)


async def test_a_failing_store_counts_errors_per_operation_whatever_the_adapter(
    relay_server: Any, tmp_path: Path
) -> None:
    store = FailingStore()
    async with relay_server(tmp_path / "relay", store=store) as relay:
        peer = await Peer.connect(relay, relay.token("alice"))
        await peer.ws.send_bytes(peer.session.sync_request(TECH, b"\x00"))
        assert isinstance(await peer.next(), SyncReplied)
        store.full = True
        await peer.ws.send_bytes(peer.session.update(TECH, 1, _crdt_update()))
        refused = await peer.next()
        assert isinstance(refused, ErrorReceived) and refused.code == "internal"
        await peer.close()
        scraped = await scrape(relay)
    assert scraped.value("foliosync_store_errors_total", operation="append") == 1
    assert scraped.value("foliosync_store_errors_total", operation="load") == 0
    assert scraped.value("foliosync_store_seconds_count", operation="append") == 1
    assert scraped.value("foliosync_store_seconds_count", operation="load") == 1
    assert scraped.value("foliosync_updates_refused_total", reason="internal") == 1


async def test_a_store_failure_is_an_internal_error_then_close_1011(
    relay_server: Any, tmp_path: Path
) -> None:
    """The relay's own failure closes with 1011, the code FoliosyncWebSocketInternalErrors
    watches; the peer got the fatal ``internal`` Error first."""
    store = FailingStore()
    async with relay_server(tmp_path / "relay", store=store) as relay:
        assert (await scrape(relay)).value("foliosync_connections_closed_total", code="1011") == 0
        peer = await Peer.connect(relay, relay.token("alice"))
        await peer.ws.send_bytes(peer.session.sync_request(TECH, b"\x00"))
        assert isinstance(await peer.next(), SyncReplied)
        store.full = True
        await peer.ws.send_bytes(peer.session.update(TECH, 1, _crdt_update()))
        refused = await peer.next()
        assert isinstance(refused, ErrorReceived) and refused.code == "internal"
        assert refused.doc is None  # fatal
        closing = await peer.ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1011, closing
        await peer.close()
        await eventually(lambda: not relay.relay.connections)
        scraped = await scrape(relay)
    assert scraped.value("foliosync_connections_closed_total", code="1011") == 1
    assert scraped.value("foliosync_connections_closed_total", code="1000") == 0


class BrokenStore(MemoryRelayStore):
    """An adapter with a bug: listing documents raises what no store should let through."""

    async def documents(self, user: str) -> list[str]:
        raise KeyError(user)


async def test_an_unexpected_exception_is_logged_and_closes_with_1011(
    relay_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with relay_server(tmp_path / "relay", store=BrokenStore()) as relay:
        async with aiohttp.ClientSession() as http, http.ws_connect(relay.url) as ws:
            session = ClientSession()
            await ws.send_bytes(session.hello(relay.token("alice"), "metrics-test"))
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.BINARY, message
            (error,) = session.receive_data(message.data)
            assert isinstance(error, ErrorReceived) and error.code == "internal"
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1011, closing
        await eventually(lambda: not relay.relay.connections)
        scraped = await scrape(relay)
    assert scraped.value("foliosync_connections_closed_total", code="1011") == 1
    failures = [r for r in caplog.records if r.name == "foliosync.relay" and r.exc_info]
    assert failures and "failed" in failures[0].getMessage(), caplog.text
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is KeyError


async def test_evictions_and_hits_of_the_hot_document_cache(
    relay_server: Any, tmp_path: Path
) -> None:
    async with relay_server(tmp_path / "relay", max_hot_documents=1) as relay:
        peer = await Peer.connect(relay, relay.token("alice"))
        other = document_id(DocumentKind.WATCHLIST, "Other")
        for doc in (TECH, other, TECH):
            await peer.ws.send_bytes(peer.session.sync_request(doc, b"\x00"))
            assert isinstance(await peer.next(), SyncReplied)
        await peer.ws.send_bytes(peer.session.update(TECH, 1, _crdt_update()))
        await peer.next()  # its Ack
        await peer.close()
        scraped = await scrape(relay)
    assert scraped.value("foliosync_document_cache_misses_total") == 3
    assert scraped.value("foliosync_document_cache_evictions_total") == 2
    assert scraped.value("foliosync_document_cache_hits_total") == 1
    assert scraped.value("foliosync_documents_hot") == 1


# -- concurrent updates ----------------------------------------------------------------------------


class GatedStore(MemoryRelayStore):
    """The memory store, whose appends wait while ``gate`` is clear (a slow disk), so that a
    second device's edit reaches the relay while the first one's is being stored."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return await super().append(user, doc_id, update, changed_at, changed_by)


async def test_concurrent_edits_of_two_devices_are_counted_sequential_ones_not(
    relay_server: Any, tmp_path: Path, open_replica: Any, sync_clients: Any
) -> None:
    store = GatedStore()
    async with relay_server(tmp_path / "relay", store=store) as relay:
        one: Replica = await open_replica("one")
        two: Replica = await open_replica("two")
        await (await one.create_watchlist("Tech")).add(["AAPL"])
        await fast_client(one, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)
        c1 = sync_clients(one, relay.url, relay.token("alice", "d1"))
        c2 = sync_clients(two, relay.url, relay.token("alice", "d2"))
        c1.start()
        c2.start()
        await c1.wait_in_sync(timeout=10)
        await c2.wait_in_sync(timeout=10)
        await eventually(lambda: _has(two, "AAPL"))
        base = (await scrape(relay)).value("foliosync_updates_merged_concurrent_total")

        # one after the other: each device edits once it has the other's change
        wl1, wl2 = await one.watchlist(TECH), await two.watchlist(TECH)
        await wl1.add(["MSFT"])
        await eventually(lambda: _has(two, "MSFT"))
        await wl2.add(["GOOG"])
        await eventually(lambda: _has(one, "GOOG"))
        await wl1.remove(["AAPL"])
        await eventually(lambda: _lacks(two, "AAPL"))
        sequential = await scrape(relay)
        assert sequential.value("foliosync_updates_merged_concurrent_total") == base

        # at the same time: the second edit reaches the relay while the first is being stored
        store.gate.clear()
        await wl1.add(["TSLA"])
        await eventually(lambda: store.waiting == 1)
        await wl2.add(["NVDA"])
        await eventually(lambda: store.waiting == 2)
        store.gate.set()
        await eventually(lambda: _has(one, "TSLA", "NVDA"))
        await eventually(lambda: _has(two, "TSLA", "NVDA"))
        await c1.wait_in_sync(timeout=10)
        await c2.wait_in_sync(timeout=10)
        concurrent = await scrape(relay)
    assert concurrent.value("foliosync_updates_merged_concurrent_total") == base + 1
    assert concurrent.value("foliosync_fanout_lag_seconds_count") >= 5
    assert concurrent.value("foliosync_update_fanout_seconds_count") >= 5
    assert concurrent.value("foliosync_frames_sent_total", type="update") >= 5


async def test_an_edit_before_reading_a_change_already_sent_is_not_counted(
    relay: RunningRelay,
) -> None:
    """The documented limit of foliosync_updates_merged_concurrent_total: B edits after A's
    change was sent to it but before reading it, a real conflict the relay cannot tell from an
    edit made after reading it (an Update carries no state vector): not counted."""
    a = await Peer.connect(relay, relay.token("alice", "a"))
    b = await Peer.connect(relay, relay.token("alice", "b"))
    for peer in (a, b):
        await peer.ws.send_bytes(peer.session.sync_request(TECH, b"\x00"))
        assert isinstance(await peer.next(), SyncReplied)
    await a.ws.send_bytes(a.session.update(TECH, 1, _crdt_update()))
    await a.next()  # the Ack: stored, and fanned out to b, which has not read it
    await b.ws.send_bytes(b.session.update(TECH, 1, _crdt_update("MSFT", "b")))
    received = [await b.next(), await b.next()]  # a's change, then the Ack of b's
    assert len(received) == 2
    await a.close()
    await b.close()
    scraped = await scrape(relay)
    assert scraped.value("foliosync_updates_acknowledged_total") == 2
    assert scraped.value("foliosync_updates_merged_concurrent_total") == 0


async def _symbols(replica: Replica) -> list[str]:
    return list((await replica.watchlist(TECH)).symbols)


async def _has(replica: Replica, *symbols: str) -> bool:
    return set(symbols) <= set(await _symbols(replica))


async def _lacks(replica: Replica, symbol: str) -> bool:
    return symbol not in await _symbols(replica)


# -- fan-out -------------------------------------------------------------------------------------


async def test_a_subscriber_that_raises_is_a_fanout_error_and_the_others_still_get_it() -> None:
    fanout = InProcessFanOut()
    got: list[Change] = []

    def broken(change: Change) -> None:
        raise RuntimeError("a broken subscriber")

    fanout.subscribe("alice", broken)
    fanout.subscribe("alice", got.append)
    change = Change("alice", TECH, b"", 0, "d1", origin="x")
    await fanout.publish(change)
    assert got == [change]
    assert fanout.stats.errors == 1 and fanout.stats.lag.count == 1


# -- prices --------------------------------------------------------------------------------------


async def test_prices_move_ticks_delivery_followed_and_conflated(
    relay_server: Any, tmp_path: Path
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=60_000) as relay:
        publisher = await Peer.connect(relay, relay.token("feeder", scopes=PUBLISH))
        subscriber = await Peer.connect(relay, relay.token("alice", "phone"))
        await subscriber.ws.send_bytes(subscriber.session.subscribe(["AAPL", "MSFT"]))
        assert isinstance(await subscriber.next(), PricesReceived)  # the (empty) snapshot
        old = _now_ms() - 30_000
        await publisher.ws.send_bytes(
            publisher.session.publish(1, [["AAPL", "187", old], ["AAPL", "0", old]])
        )
        answer = await publisher.next()
        assert isinstance(answer, PublishedReceived) and answer.accepted == 1
        batch = await subscriber.next()
        assert isinstance(batch, PricesReceived) and not batch.snapshot
        # inside AAPL's window now: the second replaces the first before it may go
        for n in (2, 3):
            await publisher.ws.send_bytes(
                publisher.session.publish(n, [["AAPL", f"18{n}", old + n]])
            )
            assert isinstance(await publisher.next(), PublishedReceived)
        # valid but older than the book's price: the publisher is told it was accepted, so it
        # is no rejection, but it changed nothing: stale
        await publisher.ws.send_bytes(publisher.session.publish(4, [["AAPL", "170", old - 1]]))
        answer = await publisher.next()
        assert isinstance(answer, PublishedReceived) and answer.accepted == 1, answer
        assert not answer.rejected
        scraped = await scrape(relay)
        await publisher.close()
        await subscriber.close()
    assert scraped.value("foliosync_ticks_received_total") == 3
    assert scraped.value("foliosync_ticks_rejected_total") == 1
    assert scraped.value("foliosync_ticks_stale_total") == 1
    assert scraped.value("foliosync_price_delivery_seconds_count") == 1
    assert scraped.value("foliosync_followed_symbols") == 2
    assert scraped.value("foliosync_price_subscribers") == 1
    assert scraped.value("foliosync_prices_conflated_total") == 1
    assert scraped.value("foliosync_followed_price_age_max_seconds") >= 29
    assert scraped.value("foliosync_frames_sent_total", type="price_batch") == 1
    assert scraped.value("foliosync_frames_received_total", type="publish") == 4


async def test_stale_followed_symbols_count_while_the_market_is_open(
    relay: RunningRelay,
) -> None:
    hub = relay.relay.prices

    class Follower:
        def deliver_prices(self, points: list[PricePoint]) -> None:
            pass

    hub.subscribe(Follower(), ["AAPL"])
    hub._market_open = (hub.now_ms(), True)  # the calendar's cached answer: open
    scraped = await scrape(relay)
    assert scraped.value("foliosync_followed_symbols_stale") == 1  # no price at all
    assert scraped.value("foliosync_followed_price_age_max_seconds") == 0  # none has an age


def test_conflated_and_dropped_prices_are_counted_by_the_pure_parts() -> None:
    def point(seq: int) -> PricePoint:
        return PricePoint("AAPL", Decimal(100 + seq), 1000 + seq, seq)

    conflator = TickConflator(lambda symbol: 1000)
    conflator.offer(point(1))
    assert conflator.due(0) == [point(1)] and conflator.conflated == 0
    conflator.offer(point(2))
    conflator.offer(point(3))
    assert conflator.conflated == 1
    waiting = LatestPrices()
    waiting.add([point(1)])
    waiting.add([point(2), point(3)])
    assert waiting.replaced == 2 and waiting.take() == [point(3)]


# -- initial-sync slots --------------------------------------------------------------------------


class SlowLoadStore(MemoryRelayStore):
    """The memory store, whose loads wait while ``gate`` is clear (a cold disk after a restart)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def load(self, user: str, doc_id: str) -> StoredDocument | None:
        await self.gate.wait()
        return await super().load(user, doc_id)


async def test_initial_syncs_waiting_and_active(relay_server: Any, tmp_path: Path) -> None:
    store = SlowLoadStore()
    async with relay_server(tmp_path / "relay", store=store, max_initial_syncs=1) as relay:
        peers = [await Peer.connect(relay, relay.token(user)) for user in ("alice", "bob")]
        for peer in peers:
            await peer.ws.send_bytes(peer.session.sync_request(TECH, b"\x00"))
        slots = relay.relay.initial_sync_slots
        await eventually(lambda: slots.active == 1 and slots.waiting == 1)
        during = await scrape(relay)
        store.gate.set()
        for peer in peers:
            assert isinstance(await peer.next(), SyncReplied)
            await peer.close()
        after = await scrape(relay)
    assert during.value("foliosync_initial_syncs_active") == 1
    assert during.value("foliosync_initial_syncs_waiting") == 1
    assert after.value("foliosync_initial_syncs_active") == 0
    assert after.value("foliosync_initial_syncs_waiting") == 0


def test_timings_buckets_are_cumulative_and_inclusive() -> None:
    timings = Timings((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 2.0):
        timings.observe(seconds)
    assert timings.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert timings.total == pytest.approx(2.65)
    with pytest.raises(ValueError):
        Timings((1.0, 0.5))


# -- the command line ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_the_relay_command_serves_metrics_to_an_admin_token_and_on_its_metrics_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert foliosync_main(["token", "ops", "--scope", "admin", "--data", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    port, metrics_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    script = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert script is not None
    process = await asyncio.create_subprocess_exec(
        script,
        "relay",
        "--feed",
        "none",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--data",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readline(), 30)
        assert first.startswith(f"foliosync relay on ws://127.0.0.1:{port}/ws".encode())
        second = await asyncio.wait_for(process.stdout.readline(), 30)
        assert second.decode().strip() == f"metrics on http://127.0.0.1:{metrics_port}/metrics"
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as r:
                assert r.status == 200
                assert Scrape(await r.text()).value("foliosync_connections") == 0
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert r.status == 200
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)


@pytest.mark.parametrize("port", ["0", "70000"])
def test_the_relay_command_refuses_a_bad_metrics_port(
    port: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = foliosync_main(["relay", "--metrics-port", port, "--data", str(tmp_path)])
    assert status != 0
    assert f"invalid metrics port {port}" in capsys.readouterr().err


async def test_promtool_finds_nothing_to_fix_in_a_scrape(relay: RunningRelay) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (tools/system-deps installs it)")
    token = relay.token("ops", scopes=ADMIN)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{relay.http}/metrics", headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        text = await r.read()
    check = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(check.communicate(text), 30)
    assert check.returncode == 0, (out + err).decode()
    assert not (out + err).strip(), (out + err).decode()  # no lint warnings either
