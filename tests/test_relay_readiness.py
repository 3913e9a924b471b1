"""GET /readyz on a real relay: ready when the store answers, the fan-out publishes and the feed
feeds; 503 naming what fails otherwise."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from foliosync.server.feeds import SimulatorFeed
from foliosync.server.prices import PriceHub
from foliosync.server.readiness import FEED_STALE_AFTER_S, check_feed
from foliosync.server.storage import MemoryRelayStore


async def readyz(http: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{http}/readyz") as response:
        return response.status, await response.json()


async def test_a_running_relay_is_ready_with_every_check(tmp_path: Path, helpers: Any) -> None:
    async with helpers.serve_relay(tmp_path / "relay", feed="sim:always") as relay:
        status, body = await readyz(relay.http)
    assert status == 200, body
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"store", "fanout", "feed"}
    assert all(check["ok"] for check in body["checks"].values())
    assert "failing" not in body


async def test_no_feed_is_alive(tmp_path: Path, helpers: Any) -> None:
    async with helpers.serve_relay(tmp_path / "relay", feed="none") as relay:
        status, body = await readyz(relay.http)
    assert status == 200
    assert body["checks"]["feed"]["ok"]


async def test_a_closed_store_is_not_ready(tmp_path: Path, helpers: Any) -> None:
    async with helpers.serve_relay(tmp_path / "relay", feed="none") as relay:
        await relay.relay.store.close()
        status, body = await readyz(relay.http)
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["failing"] == ["store"]
    assert "closed" in body["checks"]["store"]["detail"]
    assert body["checks"]["fanout"]["ok"] and body["checks"]["feed"]["ok"]


async def test_a_store_that_lost_its_database_is_not_ready(tmp_path: Path, helpers: Any) -> None:
    async with helpers.serve_relay(tmp_path / "relay", feed="none") as relay:
        assert (await readyz(relay.http))[0] == 200
        relay.relay.store._db.close()  # the database connection gone under the store
        status, body = await readyz(relay.http)
    assert status == 503
    assert body["failing"] == ["store"]
    assert "does not answer" in body["checks"]["store"]["detail"]


async def test_a_closed_memory_store_is_not_ready(tmp_path: Path, helpers: Any) -> None:
    store = MemoryRelayStore()
    async with helpers.serve_relay(tmp_path / "relay", store=store, feed="none") as relay:
        assert (await readyz(relay.http))[0] == 200
        await store.close()
        status, body = await readyz(relay.http)
    assert status == 503 and body["failing"] == ["store"]


async def test_a_feed_that_died_is_not_ready(tmp_path: Path, helpers: Any) -> None:
    async with helpers.serve_relay(tmp_path / "relay", feed="sim:always") as relay:
        assert (await readyz(relay.http))[0] == 200
        feed = relay.relay.feed
        assert feed is not None
        await feed.close()
        status, body = await readyz(relay.http)
    assert status == 503
    assert body["failing"] == ["feed"]
    assert "stopped" in body["checks"]["feed"]["detail"]


async def test_a_finished_replay_is_alive_and_a_stopped_one_is_not(
    tmp_path: Path, helpers: Any
) -> None:
    ticks = tmp_path / "ticks.csv"
    ticks.write_text("timestamp,symbol,price\n1700000000000,AAPL,190.5\n")
    async with helpers.serve_relay(tmp_path / "relay", feed=f"csv:{ticks}@max") as relay:
        feed = relay.relay.feed
        assert feed is not None
        await helpers.eventually(lambda: not feed.running)  # type: ignore[attr-defined]
        status, body = await readyz(relay.http)
        assert status == 200, body  # a replay that reached the end of its file is done
        assert body["checks"]["feed"]["detail"] == "replay finished"
        await feed.close()
        status, body = await readyz(relay.http)
    assert status == 503 and body["failing"] == ["feed"]


async def test_a_simulator_that_stopped_ticking_in_session_is_not_alive() -> None:
    hub = PriceHub()
    feed = SimulatorFeed(hub, always=True)
    now = 1_800_000_000_000
    feed.step(now)  # quotes the default symbols: a tick now
    assert check_feed("sim:always", feed, hub, now + 1000).ok is False  # never started: stopped
    feed.start()
    try:
        feed.last_tick_ms = now
        assert check_feed("sim:always", feed, hub, now + 1000).ok
        late = now + int(FEED_STALE_AFTER_S * 1000) + 1000
        check = check_feed("sim:always", feed, hub, late)
        assert not check.ok and "no tick for too long" in check.detail
    finally:
        await feed.close()


async def test_a_store_that_does_not_answer_in_time_is_not_ready(tmp_path: Path) -> None:
    """A store stuck behind a long transaction makes the relay not ready, not the probe hang."""
    from foliosync.server.fanout import InProcessFanOut
    from foliosync.server.readiness import check_readiness
    from foliosync.server.storage import SQLiteRelayStore

    store = await SQLiteRelayStore.open(tmp_path / "relay.db")
    try:
        # What a long commit does: holds the store's thread.
        long_commit = asyncio.ensure_future(store._call(lambda: time.sleep(0.5)))
        try:
            readiness = await check_readiness(
                store, InProcessFanOut(), "none", None, PriceHub(), timeout=0.2
            )
        finally:
            await long_commit
        assert not readiness.ready
        assert readiness.to_json()["failing"] == ["store"]
        assert "no answer within 0.2 s" in readiness.checks[0].detail
        assert (await check_readiness(store, InProcessFanOut(), "none", None, PriceHub())).ready
    finally:
        await store.close()


class LeakyStore(MemoryRelayStore):
    """A store adapter whose failure carries what an unauthenticated caller must not read."""

    async def ping(self) -> None:
        raise OSError("cannot read /srv/foliosync/private/relay.db: permission denied")


async def test_readyz_gives_a_short_reason_and_logs_the_exception(
    tmp_path: Path, helpers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with helpers.serve_relay(tmp_path / "relay", store=LeakyStore(), feed="none") as relay:
        status, body = await readyz(relay.http)
    assert status == 503 and body["failing"] == ["store"]
    assert body["checks"]["store"]["detail"] == "failed (OSError)"
    assert "/srv/foliosync" not in json.dumps(body)
    assert "/srv/foliosync/private/relay.db" in caplog.text  # the operator still sees it
