"""How current each document is: on the replica, from a live sync client, and in `status`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from foliosync.sync.freshness import FreshnessLevel


async def test_a_document_never_synced_is_outdated_with_its_pending_changes(
    open_replica: Any,
) -> None:
    replica = await open_replica("a")
    tech = await replica.create_watchlist("Tech")
    await tech.add(["AAPL"])
    await tech.add(["MSFT"])
    freshness = replica.freshness(tech.id)
    assert freshness.level is FreshnessLevel.OUTDATED
    assert freshness.reason == "never synced"
    assert freshness.pending == tech.pending == 3  # created, and two additions
    assert "3 changes not yet synced" in freshness.describe()


async def test_freshness_ages_from_the_last_confirmed_sync(
    relay: Any, open_replica: Any, helpers: Any
) -> None:
    replica = await open_replica("a")
    tech = await replica.create_watchlist("Tech")
    await tech.add(["AAPL"])
    await helpers.fast_client(replica, relay.url, relay.token("alice", "d1")).sync_once(10)
    synced = replica.info(tech.id).last_synced_at
    assert synced is not None
    at = datetime.fromtimestamp(synced / 1000, tz=UTC)

    assert replica.freshness(tech.id, now=at + timedelta(seconds=30)).level is FreshnessLevel.LIVE
    assert replica.freshness(tech.id, now=at + timedelta(minutes=3)).level is FreshnessLevel.FRESH
    assert replica.freshness(tech.id, now=at + timedelta(minutes=10)).level is FreshnessLevel.STALE
    later = replica.freshness(tech.id, now=at + timedelta(minutes=20))
    assert later.level is FreshnessLevel.OUTDATED and later.pending == 0

    await tech.add(["MSFT"])  # offline again: the age stays, the pending change shows
    offline = replica.freshness(tech.id, now=at + timedelta(minutes=3))
    assert offline.level is FreshnessLevel.FRESH and offline.pending == 1


async def test_a_connected_client_reports_live_and_the_relay_watermark(
    relay: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    laptop = await open_replica("laptop")
    tech = await laptop.create_watchlist("Tech")
    await tech.add(["AAPL"])
    await helpers.fast_client(laptop, relay.url, relay.token("alice", "laptop")).sync_once(10)

    phone = await open_replica("phone")
    client = sync_clients(phone, relay.url, relay.token("alice", "phone"))
    client.start()
    await client.wait_in_sync(timeout=10)
    status = client.status(tech.id)
    assert status.connected and status.pending == 0
    assert status.remote_changed_by == "laptop"
    assert client.freshness(tech.id).level is FreshnessLevel.LIVE

    await client.stop()
    assert not client.status(tech.id).connected
    assert phone.info(tech.id).last_synced_at is not None  # kept for when it is offline


async def test_status_command_shows_freshness_pending_and_the_relays_last_change(
    tmp_path: Path, relay: Any, helpers: Any
) -> None:
    path = tmp_path / "device.db"
    async with helpers.opened_replica(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await helpers.fast_client(replica, relay.url, relay.token("alice", "d1")).sync_once(10)
        await (await replica.create_portfolio("Main")).add_trade("AAPL", "1", "100")
    foliosync = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert foliosync is not None
    done = subprocess.run(
        [foliosync, "--db", str(path), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["server"] == relay.url
    rows = {row["name"]: row for row in report["documents"]}
    assert rows["Tech"]["freshness"] == "live" and rows["Tech"]["pending"] == 0
    assert rows["Tech"]["remote_changed_by"] == "d1"
    assert rows["Main"]["freshness"] == "outdated" and rows["Main"]["pending"] == 2
    assert "never synced" in rows["Main"]["freshness_reason"]

    text = subprocess.run(
        [foliosync, "--db", str(path), "status"], capture_output=True, text=True, timeout=60
    )
    assert text.returncode == 0 and "2 changes not yet synced" in text.stdout
