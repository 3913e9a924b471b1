"""Random edits on three devices, random disconnects, one real relay: all converge, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foliosync.client.replica import Replica
from foliosync.client.sync import SyncClient
from foliosync.sync.model import DocumentKind, document_id

CLIENTS = 3
SYMBOLS = ["AAPL", "MSFT", "GOOG", "TSLA", "IBM"]
TECH = document_id(DocumentKind.WATCHLIST, "Tech")
MAIN = document_id(DocumentKind.PORTFOLIO, "Main")

client_index = st.integers(0, CLIENTS - 1)
symbol = st.sampled_from(SYMBOLS)
step = st.one_of(
    st.tuples(st.just("add"), client_index, symbol),
    st.tuples(st.just("remove"), client_index, symbol),
    st.tuples(st.just("trade"), client_index, symbol, st.integers(-50, 50).filter(bool)),
    st.tuples(st.just("disconnect"), client_index),
    st.tuples(st.just("connect"), client_index),
    st.tuples(st.just("sync_once"), client_index),
    st.tuples(st.just("pause"), st.sampled_from([0.0, 0.005, 0.02])),
)


@dataclass
class Device:
    replica: Replica
    client: SyncClient
    running: bool = False


@dataclass
class Expected:
    trades: set[str] = field(default_factory=set)
    # per symbol, the last edit that changed it on the device that made it: "add" or "remove"
    last_effective: dict[str, str] = field(default_factory=dict)


async def symbols_of(replica: Replica) -> list[tuple[str, str | None, str]]:
    return [(e.symbol, e.note, e.position) for e in (await replica.watchlist(TECH)).entries()]


async def trades_of(replica: Replica) -> list[dict[str, Any]]:
    return [t.to_json() for t in (await replica.portfolio(MAIN)).trades()]


async def run_scenario(
    serve_relay: Any,
    fast_client: Any,
    initially_connected: list[bool],
    steps: list[tuple[Any, ...]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with serve_relay(root / "relay") as relay, contextlib.AsyncExitStack() as stack:
            devices: list[Device] = []
            expected = Expected()
            for i in range(CLIENTS):
                replica = await Replica.open(root / f"device{i}.db")
                stack.push_async_callback(replica.close)
                client = fast_client(replica, relay.url, relay.token("alice", f"d{i}"))
                stack.push_async_callback(client.stop)  # runs before the replica closes
                # every device creates the same two documents while offline
                await replica.create_watchlist("Tech")
                await replica.create_portfolio("Main")
                devices.append(Device(replica, client))
            for device, connected in zip(devices, initially_connected, strict=True):
                if connected:
                    device.client.start()
                    device.running = True

            for action, *args in steps:
                if action == "pause":
                    await asyncio.sleep(args[0])
                    continue
                device = devices[args[0]]
                if action == "add":
                    watchlist = await device.replica.watchlist(TECH)
                    if await watchlist.add([args[1]]):
                        expected.last_effective[args[1]] = "add"
                elif action == "remove":
                    watchlist = await device.replica.watchlist(TECH)
                    if await watchlist.remove([args[1]]):
                        expected.last_effective[args[1]] = "remove"
                elif action == "trade":
                    portfolio = await device.replica.portfolio(MAIN)
                    trade = await portfolio.add_trade(args[1], args[2], "10")
                    expected.trades.add(trade.id)
                elif action == "disconnect" and device.running:
                    await device.client.stop()
                    device.running = False
                elif action == "connect" and not device.running:
                    device.client.start()
                    device.running = True
                elif action == "sync_once" and not device.running:
                    await device.client.sync_once(timeout=20)

            # final: everyone disconnects, then syncs twice round the table
            for device in devices:
                await device.client.stop()
                device.running = False
            for _ in range(2):
                for device in devices:
                    await device.client.sync_once(timeout=20)

            replicas = [device.replica for device in devices]
            symbols = [await symbols_of(r) for r in replicas]
            trades = [await trades_of(r) for r in replicas]
            assert symbols[0] == symbols[1] == symbols[2], symbols
            assert trades[0] == trades[1] == trades[2], trades
            present = {s for s, _, _ in symbols[0]}
            assert {t["id"] for t in trades[0]} == expected.trades
            for sym, last in expected.last_effective.items():
                if last == "add":
                    assert sym in present, f"{sym} was added last and is gone"
            never_added = set(SYMBOLS) - set(expected.last_effective)
            assert not present & never_added
            for replica in replicas:
                assert await replica.pending_updates() == []
                assert [d.name for d in replica.documents()] == ["Main", "Tech"]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initially_connected=st.lists(st.booleans(), min_size=CLIENTS, max_size=CLIENTS),
    steps=st.lists(step, min_size=1, max_size=40),
)
async def test_three_devices_converge_through_one_relay(
    relay_server: Any, helpers: Any, initially_connected: list[bool], steps: list[tuple[Any, ...]]
) -> None:
    await run_scenario(relay_server, helpers.fast_client, initially_connected, steps)
