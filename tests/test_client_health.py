"""SyncClient.health() and `foliosync status`, against real relays on 127.0.0.1.

Every figure of the status bar is watched while it should move: the connection state as the relay
goes away and comes back, the pending changes as edits are made offline and sent, the last error
after a refused token, price ages with an injected clock and in real time, and the freshness
levels at their thresholds. The relays here push prices at once (``price_window_ms=0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import FrozenInstanceError, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from foliosync.client import ConnectionState, LastError, SyncClient, SyncHealth
from foliosync.client.health import build_health
from foliosync.server.http_errors import JsonErrorAppRunner
from foliosync.server.prices import PricePolicy
from foliosync.server.relay import RelayConfig, create_app
from foliosync.sync.freshness import FreshnessLevel
from foliosync.sync.prices import check_tick

from .conftest import run_cli

# A Wednesday in session (10:00 in New York), and a Friday's last minute before the close.
WEDNESDAY_SESSION = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
FRIDAY_BEFORE_CLOSE = datetime(2026, 11, 20, 20, 59, 30, tzinfo=UTC)


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _publish(relay: Any, symbol: str, price: str, at: datetime | None = None) -> None:
    now = time.time_ns() // 1_000_000
    tick = check_tick({"symbol": symbol, "price": price, "time_ms": _ms(at) if at else now}, now)
    assert relay.relay.prices.publish([tick])


@asynccontextmanager
async def relay_on_port(data_dir: Path, port: int) -> AsyncIterator[None]:
    """A relay on a given port: the one a client already dials, brought back after a stop."""
    app = create_app(
        RelayConfig(data_dir=data_dir, heartbeat=5.0), price_policy=PricePolicy(window_ms=0)
    )
    runner = JsonErrorAppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        yield
    finally:
        await runner.cleanup()


async def test_state_lag_and_pending_follow_the_relay_going_away_and_coming_back(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    replica = await open_replica("a")
    tech = await replica.create_watchlist("Tech")
    await tech.add(["AAPL"])
    relay_cm = relay_server(tmp_path / "relay", price_window_ms=0)
    relay = await relay_cm.__aenter__()
    port = relay.port
    client: SyncClient = sync_clients(replica, relay.url, relay.token("alice", "d1"))
    assert client.health().state is ConnectionState.STOPPED  # not started yet
    client.start()
    await client.wait_in_sync(timeout=10)

    health = client.health()
    assert health.state is ConnectionState.CONNECTED and health.in_sync
    assert health.lag == timedelta() and health.pending == 0 and health.next_retry_at is None
    assert health.freshness is not None and health.freshness.level is FreshnessLevel.LIVE
    assert health.describe().startswith("live")
    with pytest.raises(FrozenInstanceError):
        health.pending = 3  # type: ignore[misc]

    await relay_cm.__aexit__(None, None, None)  # the relay goes away
    await helpers.eventually(lambda: client.health().state is ConnectionState.WAITING)
    waiting = client.health()
    assert waiting.next_retry_at is not None and waiting.next_retry_at >= waiting.at - timedelta(
        seconds=1
    )
    assert waiting.last_error is not None and waiting.last_error.code == "connection_lost"
    assert "offline" in waiting.describe()
    gone_at = waiting.at - waiting.lag  # in sync until the connection dropped
    later = client.health(now=waiting.at + timedelta(minutes=3))
    assert later.at - later.lag == gone_at  # the lag grows with the clock, from the same moment
    assert later.freshness is not None and later.freshness.level is FreshnessLevel.FRESH

    await tech.add(["MSFT"])  # offline edits: pending grows, per document
    await tech.add(["NVDA"])
    offline = client.health()
    assert offline.pending == 2 and dict(offline.pending_by_document) == {tech.id: 2}
    assert "2 changes waiting to sync" in offline.describe()
    assert "behind" in client.health(now=offline.at + timedelta(seconds=5)).describe()

    async with relay_on_port(tmp_path / "relay", port):  # back, where the client dials
        await client.wait_in_sync(timeout=10)
        back = client.health()
        assert back.state is ConnectionState.CONNECTED and back.pending == 0
        assert dict(back.pending_by_document) == {} and back.lag == timedelta()
        assert back.last_error is not None  # kept (the last failed retry), with its time...
        assert back.last_error.code == "connection_lost"
        assert back.last_error.at >= waiting.last_error.at
        assert not back.error_is_current  # ...but the status line no longer shows it
        assert "connection_lost" not in back.describe()
        await client.stop()
        assert client.health().state is ConnectionState.STOPPED


async def test_an_edit_on_a_live_connection_lags_from_the_edit_not_from_the_last_sync(
    relay: Any, open_replica: Any, sync_clients: Any
) -> None:
    replica = await open_replica("a")
    tech = await replica.create_watchlist("Tech")
    client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
    client.start()
    await client.wait_in_sync(timeout=10)
    await asyncio.sleep(0.3)  # in sync for a while, with no new confirmation written
    before = datetime.now(tz=UTC)
    await tech.add(["AAPL"])  # in flight until the relay acknowledges it
    health = client.health()  # no await since the edit: the relay cannot have acknowledged it
    assert health.pending == 1 and health.state is ConnectionState.CONNECTED
    # behind since the edit, not since the last confirmation written (at the initial sync)
    assert health.at - health.lag >= before - timedelta(milliseconds=5)
    assert client.freshness(tech.id).level is FreshnessLevel.LIVE
    await client.wait_in_sync(timeout=10)
    assert client.health().lag == timedelta()


async def test_a_refused_token_is_the_last_error_and_the_replica_remembers_it(
    tmp_path: Path, relay: Any, sync_clients: Any, helpers: Any
) -> None:
    path = tmp_path / "device.db"
    async with helpers.opened_replica(path) as replica:
        await replica.create_watchlist("Tech")
        client = sync_clients(replica, relay.url, "forged")
        client.start()
        await helpers.eventually(lambda: client.health().state is ConnectionState.REFUSED)
        health = client.health()
        assert health.last_error is not None and health.last_error.code == "auth_failed"
        assert "refused the token" in health.last_error.message
        assert health.error_is_current and "auth_failed" in health.describe()
        with pytest.raises(Exception, match="refused the token"):
            await client.stop()
        assert client.health().state is ConnectionState.REFUSED  # stopping does not hide why

    async with helpers.opened_replica(path) as replica:  # a new process knows it too
        remembered = LastError.from_meta(replica.meta)
        assert remembered == health.last_error
        assert SyncClient(replica, relay.url, "x").last_error == remembered

    code, out, err = await run_cli("--db", str(path), "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["state"] == "not_running"
    assert report["last_error"]["code"] == "auth_failed"
    assert report["last_error"]["at"].endswith("Z")


async def test_price_ages_and_levels_with_an_injected_clock(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        _publish(relay, "AAPL", "187.25", WEDNESDAY_SESSION)
        _publish(relay, "MSFT", "410", WEDNESDAY_SESSION - timedelta(minutes=4))
        replica = await open_replica("a")
        await (await replica.create_watchlist("Tech")).add(["AAPL", "MSFT", "NVDA"])
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        client.start()
        await helpers.eventually(lambda: len(replica.quotes.all()) == 2)

        def at(offset: timedelta) -> SyncHealth:
            return client.health(now=WEDNESDAY_SESSION + offset)

        health = at(timedelta(seconds=2))
        assert health.newest_price is not None and health.oldest_price is not None
        assert health.newest_price.symbol == "AAPL"
        assert health.newest_price.age == timedelta(seconds=2)
        assert health.newest_price.freshness.level is FreshnessLevel.LIVE
        assert health.oldest_price.symbol == "MSFT"  # 4 min 2 s: past the 1 min of LIVE
        assert health.oldest_price.freshness.level is FreshnessLevel.FRESH
        assert health.prices_missing == 1  # NVDA is followed and has no price
        assert "prices 2 s old" in health.describe()
        assert "MSFT fresh" in health.describe() and "1 without a price" in health.describe()

        levels = {
            timedelta(seconds=60): FreshnessLevel.LIVE,  # thresholds are inclusive
            timedelta(seconds=61): FreshnessLevel.FRESH,
            timedelta(minutes=5): FreshnessLevel.FRESH,
            timedelta(minutes=10): FreshnessLevel.STALE,
            timedelta(minutes=16): FreshnessLevel.OUTDATED,
        }
        for offset, level in levels.items():
            newest = at(offset).newest_price
            assert newest is not None and newest.age == offset
            assert newest.freshness.level is level, offset
        assert "(stale)" in at(timedelta(minutes=10)).describe()


async def test_a_closing_price_is_not_outdated_on_a_sunday(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        replica = await open_replica("a")
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        client.start()
        await helpers.eventually(lambda: "AAPL" in relay.relay.prices.subscribed_symbols())
        # Published now for a time already past (as a feed catching up would): a Friday close.
        _publish(relay, "AAPL", "190", FRIDAY_BEFORE_CLOSE)
        await helpers.eventually(lambda: replica.quotes.get("AAPL") is not None)
        sunday = client.health(now=FRIDAY_BEFORE_CLOSE + timedelta(days=2))
        newest = sunday.newest_price
        assert newest is not None and newest.age == timedelta(days=2, seconds=0)
        assert newest.freshness.level is FreshnessLevel.LIVE  # nothing traded since
        assert "closing prices" in sunday.describe()
        tuesday = client.health(now=FRIDAY_BEFORE_CLOSE + timedelta(days=4))  # two sessions on
        assert tuesday.newest_price is not None
        assert tuesday.newest_price.freshness.level is FreshnessLevel.OUTDATED


async def test_price_age_grows_in_real_time(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        replica = await open_replica("a")
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        client.start()
        await helpers.eventually(lambda: "AAPL" in relay.relay.prices.subscribed_symbols())
        _publish(relay, "AAPL", "187.25")
        await helpers.eventually(lambda: client.health().newest_price is not None)
        first = client.health().newest_price
        await asyncio.sleep(1.1)
        second = client.health().newest_price
        assert first is not None and second is not None
        assert second.age - first.age >= timedelta(seconds=1)


async def test_health_is_cheap_enough_to_poll(
    relay: Any, open_replica: Any, sync_clients: Any
) -> None:
    replica = await open_replica("a")
    for n in range(30):
        await (await replica.create_watchlist(f"List {n}")).add(["AAPL", "MSFT"])
    client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
    client.start()
    await client.wait_in_sync(timeout=10)
    started = time.perf_counter()
    for _ in range(200):  # no SQLite, no CRDT load: memory only
        health = client.health()
    assert time.perf_counter() - started < 1.0
    assert health.in_sync


async def test_status_json_gives_the_librarys_figures(
    tmp_path: Path, relay_server: Any, sync_clients: Any, helpers: Any
) -> None:
    path = tmp_path / "device.db"
    async with helpers.opened_replica(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL", "MSFT"])
        async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
            _publish(relay, "AAPL", "187.25")
            client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
            client.start()
            await client.wait_in_sync(timeout=10)
            await helpers.eventually(lambda: replica.quotes.get("AAPL") is not None)
            await relay.relay.close_connections()
        await helpers.eventually(lambda: client.health().state is ConnectionState.WAITING)
        await tech.add(["NVDA"])  # followed from now on, also offline
        await helpers.eventually(lambda: client.health().prices_missing == 2)  # MSFT, NVDA
        await client.stop()
        library = client.health()
        assert library.pending == 1 and library.last_error is not None

    code, out, err = await run_cli("--db", str(path), "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    expected = library.to_json()
    for name in ("pending", "pending_by_document", "last_error", "prices_missing"):
        assert report[name] == expected[name], name
    assert report["state"] == "not_running" and report["next_retry_at"] is None
    assert report["newest_price"]["symbol"] == "AAPL"
    for price in ("newest_price", "oldest_price"):  # the same quote, seen a little later
        for name in ("symbol", "time"):
            assert report[price][name] == expected[price][name]  # type: ignore[index]
    assert report["freshness"]["level"] == library.freshness.level.value  # type: ignore[union-attr]
    # the same moment of last sync, seen later: lag = at - that moment, in seconds
    cli_since = datetime.fromisoformat(report["at"]) - timedelta(seconds=report["lag"])
    assert abs(cli_since - (library.at - library.lag)) <= timedelta(milliseconds=2)
    assert report["documents"][0]["name"] == "Tech"  # the per-document rows are still there

    code, text, _ = await run_cli("--db", str(path), "status")
    assert code == 0
    first, *rest = text.splitlines()
    assert first.startswith("offline") and "1 change waiting to sync" in first
    assert any("Tech" in line and "1 change not yet synced" in line for line in rest)


def test_a_damaged_remembered_error_is_ignored() -> None:
    assert LastError.from_meta({"last_error_code": "x", "last_error_message": "m"}) is None
    bad = {"last_error_code": "x", "last_error_message": "m", "last_error_at": "soon"}
    assert LastError.from_meta(bad) is None
    error = LastError("forbidden", "no", datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    assert LastError.from_meta(error.to_meta()) == error
    assert replace(error, code="x") != error


async def test_a_new_replica_reports_its_age_as_lag_and_never_synced(open_replica: Any) -> None:
    replica = await open_replica("a")
    await (await replica.create_watchlist("Tech")).add(["AAPL"])
    now = datetime.now(tz=UTC) + timedelta(minutes=2)
    health = build_health(replica, state=ConnectionState.NOT_RUNNING, now=now)
    assert health.lag >= timedelta(minutes=2)
    assert health.freshness is not None and health.freshness.reason == "never synced"
    assert health.pending == 2 and health.newest_price is None
    assert health.describe().startswith("offline · behind 2 min · 2 changes waiting to sync")


async def test_a_failed_cli_sync_is_remembered_for_status(tmp_path: Path, relay: Any) -> None:
    db = str(tmp_path / "device.db")
    assert (await run_cli("--db", db, "watchlist", "create", "Tech"))[0] == 0
    code, _, _ = await run_cli("--db", db, "sync", "--server", relay.url, "--token", "forged")
    assert code == 1
    code, out, err = await run_cli("--db", db, "status", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["last_error"]["code"] == "auth_failed" and report["pending"] == 1
    assert "auth_failed: the relay refused the token" in report["status_line"]

    token = relay.token("alice", "d1")
    assert (await run_cli("--db", db, "sync", "--server", relay.url, "--token", token))[0] == 0
    code, out, _ = await run_cli("--db", db, "status", "--json")
    report = json.loads(out)
    assert report["last_error"]["code"] == "auth_failed"  # kept, with its time...
    assert "auth_failed" not in report["status_line"]  # ...but older than the sync since
    assert report["pending"] == 0 and report["pending_by_document"] == {}
    assert report["freshness"]["level"] == "live"


async def test_freshness_and_health_agree_at_any_clock_while_in_sync(
    tmp_path: Path, relay: Any, helpers: Any
) -> None:
    """A document kept in sync is "live" at whatever time the caller measures against (an
    app's injected clock, an hour ahead of the wall's), by freshness() and health() alike."""
    async with helpers.opened_replica(tmp_path / "r.db") as replica:
        await replica.create_watchlist("Tech")
        client = helpers.fast_client(replica, relay.url, relay.token("ann", "laptop"))
        async with client:
            await client.wait_in_sync(10)
            doc_id = replica.documents()[0].id
            later = datetime.now(tz=UTC) + timedelta(hours=1)
            assert client.freshness(doc_id, later).level is FreshnessLevel.LIVE
            assert client.health(later).freshness.level is FreshnessLevel.LIVE


async def test_an_error_recorded_as_the_client_stops_is_in_the_file_too(tmp_path: Path) -> None:
    """The client's task cancelled while it writes its last error (stop() during a failed
    reconnect): the replica's file still says what the library says."""
    from foliosync.client.health import LastError
    from foliosync.client.replica import Replica
    from foliosync.client.sync import SyncClient

    path = tmp_path / "device.db"
    replica = await Replica.open(path)
    client = SyncClient(replica, "ws://127.0.0.1:9/ws", "a-token")
    error = LastError.now("connection_lost", "cannot reach the relay")
    task = asyncio.get_running_loop().create_task(client._record_error(error))
    await asyncio.sleep(0)  # the write has begun
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await replica.close()
    reopened = await Replica.open(path)
    try:
        assert LastError.from_meta(reopened.meta) == client.last_error == error
    finally:
        await reopened.close()
