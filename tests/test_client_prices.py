"""Prices on the device, end to end through a real relay on 127.0.0.1.

The relays here use a fixed push window of 0 ms (``price_window_ms=0``): the policy's windows
depend on whether the market is open, which would make the timing of these tests depend on the
hour they run at. Conflation under the policy's windows is tested on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from foliosync.client.sync import SyncClient
from foliosync.sync.prices import check_tick

from .conftest import run_cli


def _publish(relay: Any, symbol: str, price: str, at_ms: int | None = None) -> None:
    now = time.time_ns() // 1_000_000
    tick = check_tick({"symbol": symbol, "price": price, "time_ms": at_ms or now}, now)
    assert relay.relay.prices.publish([tick])


async def test_followed_symbols_come_from_watchlists_and_positions_and_follow_edits(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        replica = await open_replica("a")
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        main = await replica.create_portfolio("Main")
        await main.add_trade("TSLA", "5", "200")
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        client.start()
        hub = relay.relay.prices
        await helpers.eventually(lambda: hub.subscribed_symbols() == {"AAPL", "TSLA"})

        await tech.add(["MSFT"])
        await tech.remove(["AAPL"])
        await main.add_trade("TSLA", "-5", "210")  # position closed: no longer followed
        client.follow(["SPY"])
        await helpers.eventually(lambda: hub.subscribed_symbols() == {"MSFT", "SPY"})


async def test_a_published_price_reaches_the_replica_and_its_listeners(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        replica = await open_replica("a")
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        heard: list[str] = []
        replica.quotes.subscribe(lambda quotes: heard.extend(str(q.price) for q in quotes))
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        client.start()
        await helpers.eventually(lambda: "AAPL" in relay.relay.prices.subscribed_symbols())

        _publish(relay, "AAPL", "187.25")
        await helpers.eventually(lambda: replica.quotes.get("AAPL") is not None)
        quote = replica.quotes.get("AAPL")
        assert quote is not None and quote.price == Decimal("187.25") and quote.seq == 1
        assert heard == ["187.25"]

        _publish(relay, "AAPL", "188")
        await helpers.eventually(lambda: replica.quotes.get("AAPL").price == Decimal("188"))


async def test_subscribing_brings_the_latest_price_at_once(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        _publish(relay, "AAPL", "150.5")  # before the client exists: only a snapshot brings it
        replica = await open_replica("a")
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        sync_clients(replica, relay.url, relay.token("alice", "d1")).start()
        await helpers.eventually(lambda: replica.quotes.get("AAPL") is not None)
        assert replica.quotes.get("AAPL").price == Decimal("150.5")


async def test_after_a_forced_disconnect_the_client_gets_a_fresh_snapshot(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        replica = await open_replica("a")
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        states: list[bool] = []
        client.on_connection_change(states.append)
        client.start()
        _publish(relay, "AAPL", "100")
        await helpers.eventually(lambda: replica.quotes.get("AAPL") is not None)

        await relay.relay.close_connections()
        _publish(relay, "AAPL", "101")  # published while the client is away
        await helpers.eventually(lambda: states.count(True) >= 2)  # it came back by itself
        await helpers.eventually(lambda: replica.quotes.get("AAPL").price == Decimal("101"))
        assert states[:3] == [True, False, True]


async def test_prices_are_kept_for_offline_use_and_shown_by_the_cli(
    tmp_path: Path, relay_server: Any, sync_clients: Any, helpers: Any
) -> None:
    path = tmp_path / "device.db"
    async with (
        relay_server(tmp_path / "relay", price_window_ms=0) as relay,
        helpers.opened_replica(path) as replica,
    ):
        await (await replica.create_watchlist("Tech")).add(["AAPL", "MSFT"])
        main = await replica.create_portfolio("Main")
        await main.add_trade("AAPL", "10", "150")
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        client.start()
        await helpers.eventually(lambda: "AAPL" in relay.relay.prices.subscribed_symbols())
        _publish(relay, "AAPL", "187.25")
        await helpers.eventually(lambda: replica.quotes.get("AAPL") is not None)
        await client.stop()
    # The relay is gone: what the device shows now comes from its own file.
    foliosync = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert foliosync is not None

    def run(*args: str) -> Any:
        done = subprocess.run(
            [foliosync, "--db", str(path), *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    prices = run("prices", "AAPL", "MSFT", "--json")
    assert prices["AAPL"]["price"] == "187.25"
    assert prices["AAPL"]["freshness"] in {"live", "fresh", "stale", "outdated"}
    assert prices["MSFT"] is None

    watchlist = run("watchlist", "show", "Tech", "--json")
    by_symbol = {e["symbol"]: e for e in watchlist["entries"]}
    assert by_symbol["AAPL"]["price"] == "187.25" and by_symbol["MSFT"]["price"] is None

    portfolio = run("portfolio", "show", "Main", "--json")
    position = portfolio["positions"]["AAPL"]
    assert position["market_value"] == "1872.50"
    assert position["unrealized"] == "372.50"


async def test_document_deltas_are_not_held_behind_a_flood_of_ticks(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        replica = await open_replica("a")
        symbols = [f"S{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(300)]
        tech = await replica.create_watchlist("Tech")
        await tech.add(symbols)
        client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        client.start()
        await helpers.eventually(lambda: len(relay.relay.prices.subscribed_symbols()) == 300)
        await client.wait_in_sync(timeout=10)

        stop = asyncio.Event()

        async def flood() -> None:
            price = 100
            while not stop.is_set():
                price += 1
                now = time.time_ns() // 1_000_000
                ticks = [
                    check_tick({"symbol": s, "price": price, "time_ms": now}, now) for s in symbols
                ]
                relay.relay.prices.publish(ticks)
                await asyncio.sleep(0.005)  # a feed of ~60,000 ticks/s, paced like a real one

        flooding = asyncio.get_running_loop().create_task(flood())
        try:
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await tech.add(["ZZZ"])
            await helpers.eventually(lambda: tech.pending == 0, timeout=10)
            acked_after = time.monotonic() - started
        finally:
            stop.set()
            await flooding
        # The acknowledgement is a control frame: it must not queue behind thousands of ticks.
        assert acked_after < 2.0, acked_after
        assert replica.quotes.get("SAA") is not None


async def test_sync_fetches_the_latest_prices_and_prices_shows_their_age(
    tmp_path: Path, relay_server: Any
) -> None:
    laptop, phone = str(tmp_path / "laptop.db"), str(tmp_path / "phone.db")
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        _publish(relay, "AAPL", "187.25", at_ms=time.time_ns() // 1_000_000 - 12_000)
        _publish(relay, "TSLA", "250")
        assert (await run_cli("--db", laptop, "watchlist", "create", "Tech"))[0] == 0
        assert (await run_cli("--db", laptop, "watchlist", "add", "Tech", "AAPL", "MSFT"))[0] == 0
        assert (await run_cli("--db", laptop, "portfolio", "create", "Main"))[0] == 0
        assert (await run_cli("--db", laptop, "portfolio", "trade", "Main", "TSLA", "1", "200"))[
            0
        ] == 0

        code, out, err = await run_cli(
            "--db", laptop, "sync", "--server", relay.url, "--token", relay.token("alice", "l")
        )
        assert code == 0, err
        assert out.endswith(", prices of 2 of 3 followed symbols\n"), out  # MSFT has none yet
        # a new device learns the documents in the same sync, and the prices of their symbols
        code, out, err = await run_cli(
            "--db", phone, "sync", "--server", relay.url, "--token", relay.token("alice", "p")
        )
        assert code == 0, err
        assert out.endswith(", prices of 2 of 3 followed symbols\n"), out

    # The relay is gone: the prices come from the phone's own file, with their age.
    code, out, err = await run_cli("--db", phone, "prices", "AAPL", "MSFT", "TSLA")
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "187.25" in lines["AAPL"] and " s ago" in lines["AAPL"]
    age = int(lines["AAPL"].split(" s ago")[0].split()[-1])
    assert 12 <= age < 60
    assert lines["AAPL"].split(" s ago")[1].split()[0] in {"live", "fresh", "stale", "outdated"}
    assert "no price yet" in lines["MSFT"]
    assert "250" in lines["TSLA"] and (" s ago" in lines["TSLA"] or "just now" in lines["TSLA"])

    code, out, err = await run_cli("--db", phone, "prices", "AAPL", "MSFT", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["MSFT"] is None
    aapl = shown["AAPL"]
    assert aapl["price"] == "187.25"
    assert 12 <= aapl["age_seconds"] < 60 and aapl["age"] == f"{aapl['age_seconds']} s ago"
    assert aapl["freshness"] in {"live", "fresh", "stale", "outdated"}
    assert aapl["freshness_reason"]


async def test_a_one_shot_sync_waits_for_prices_only_as_long_as_allowed(
    tmp_path: Path, relay_server: Any, open_replica: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay that never answers the subscription (one without prices, say) delays a sync by
    ``snapshot_timeout`` at most, and the documents are in sync all the same."""
    from foliosync.server.relay import Connection

    monkeypatch.setattr(Connection, "_on_subscribe", lambda self, event: None)
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        replica = await open_replica("a")
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        client = SyncClient(replica, relay.url, relay.token("alice", "d1"), snapshot_timeout=0.5)
        started = time.monotonic()
        await client.sync_once(timeout=10)
        took = time.monotonic() - started
        assert 0.5 <= took < 5, took
        assert tech.pending == 0 and replica.quotes.get("AAPL") is None


async def test_prices_follow_into_a_reader_that_stops_early_exits_quietly(
    tmp_path: Path, relay_server: Any
) -> None:
    db = str(tmp_path / "device.db")
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        _publish(relay, "AAPL", "100")
        token = relay.token("alice", "d1")
        foliosync = shutil.which("foliosync", path=os.path.dirname(sys.executable))
        assert foliosync is not None
        pipeline = '"$@" | head -1; echo "status ${PIPESTATUS[0]}" >&2'
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            pipeline,
            "bash",
            foliosync,
            "--db",
            db,
            "prices",
            "AAPL",
            "--follow",
            "--server",
            relay.url,
            "--token",
            token,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        communicate = asyncio.ensure_future(process.communicate())
        price = 100
        while not communicate.done() and price < 2000:  # new prices until the writer has gone
            price += 1
            _publish(relay, "AAPL", str(price))
            await asyncio.sleep(0.02)
        out, err = await asyncio.wait_for(communicate, 30)
    assert out.decode().startswith("AAPL")
    assert err.decode() == "status 141\n"
