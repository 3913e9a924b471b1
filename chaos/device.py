"""One device in its own process: a real Replica and SyncClient making random edits.

``python -m chaos.device --db FILE --journal FILE --url URL --token TOKEN --index I --seed S``
edits until SIGTERM (then stops its sync client, closes the replica and exits 0) or until it is
SIGKILLed, which is the point: every edit is journalled before and after the call (see
:mod:`chaos.journal`), every Ack as the replica settles it, so that what the API accepted and what
the relay acknowledged is known however the process ends.

``--clock-offset-ms`` moves this process's wall clock, as a device whose clock is hours off: it is
patched in :mod:`foliosync.sync.clock`, where every stamp, trade time and watermark reads it,
before any other foliosync module is imported, so that it holds for this process only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import faulthandler
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.journal import CONTESTED, Journal, read_journal

if TYPE_CHECKING:
    from foliosync.client import PortfolioHandle, Replica, WatchlistHandle

__all__ = ["main", "own_symbols", "patch_clock"]

SHARED = "Shared"
PORTFOLIO = "Main"
SYMBOLS_PER_DEVICE = 8
STATUS_SECONDS = 0.5


def patch_clock(offset_ms: int) -> None:
    """Shift this process's foliosync wall clock by ``offset_ms``: call before importing any
    other foliosync module (they bind ``wall_ms`` when imported)."""
    import foliosync.sync.clock as clock

    original: Callable[[], int] = clock.wall_ms

    def shifted() -> int:
        return original() + offset_ms

    setattr(clock, "wall_ms", shifted)  # noqa: B010 - a module attribute, replaced on purpose
    clock.HybridClock.__init__.__defaults__ = (shifted,)


def own_symbols(index: int) -> list[str]:
    return [f"D{index}X{n}" for n in range(SYMBOLS_PER_DEVICE)]


def own_watchlist(index: int) -> str:
    return f"Own{index}"


class Device:
    """The edit loop: random edits of the device's own symbols and trades, and the contested
    symbol, each journalled with the state it leads to."""

    def __init__(self, replica: Replica, journal: Journal, index: int, seed: int) -> None:
        self.replica = replica
        self.journal = journal
        self.index = index
        self.name = f"dev{index}"
        previous = read_journal(journal.path)
        self.n = max((r.get("n", 0) for r in previous), default=0)
        runs = sum(1 for r in previous if r.get("k") == "start")
        self.rng = random.Random(seed * 7919 + index * 104729 + runs)
        self.tags = max(
            (int(r["tag"].split("#")[1]) for r in previous if r.get("op") == "trade"), default=0
        )

    async def documents(self) -> tuple[WatchlistHandle, WatchlistHandle, PortfolioHandle]:
        names = {(info.kind.value, info.name) for info in self.replica.documents()}
        handles: list[Any] = []
        for kind, name in (
            ("watchlist", SHARED),
            ("watchlist", own_watchlist(self.index)),
            ("portfolio", PORTFOLIO),
        ):
            if (kind, name) not in names:
                await self.edit(
                    {"op": "create", "kind": kind, "doc": name}, self._create(kind, name)
                )
            if kind == "watchlist":
                handles.append(await self.replica.watchlist(name))
            else:
                handles.append(await self.replica.portfolio(name))
        return handles[0], handles[1], handles[2]

    async def _create(self, kind: str, name: str) -> object:
        if kind == "watchlist":
            await self.replica.create_watchlist(name)
        else:
            await self.replica.create_portfolio(name)
        return None

    async def edit(self, intent: dict[str, Any], call: Any) -> Any:
        self.n += 1
        self.journal.write({"k": "intent", "n": self.n, **intent})
        try:
            result = await call
        except Exception as exc:  # refused by the API: not accepted, journalled as such
            self.journal.write({"k": "err", "n": self.n, "error": f"{type(exc).__name__}: {exc}"})
            return None
        outcome: dict[str, Any] = {"k": "ok", "n": self.n}
        if intent["op"] == "trade":
            outcome["id"] = result.id
        self.journal.write(outcome)
        return result

    async def step(
        self, shared: WatchlistHandle, own: WatchlistHandle, portfolio: PortfolioHandle
    ) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            await self._watchlist_edit(rng.choice((shared, own)))
        elif roll < 0.65:
            await self._contested(shared)
        else:
            await self._trade_edit(portfolio)

    async def _watchlist_edit(self, handle: WatchlistHandle) -> None:
        rng = self.rng
        symbol = rng.choice(own_symbols(self.index))
        entries = {e.symbol: e for e in handle.entries()}
        doc = handle.name
        current = entries.get(symbol)
        roll = rng.random()
        note = f"n{self.n + 1}" if rng.random() < 0.5 else None
        if current is None or roll < 0.2:
            after = note if note is not None or current is None else current.note
            intent = {"op": "add", "doc": doc, "sym": symbol, "present": True, "note": after}
            await self.edit(intent, handle.add([symbol], note=note))
        elif roll < 0.45:
            intent = {"op": "remove", "doc": doc, "sym": symbol, "present": False}
            await self.edit(intent, handle.remove([symbol]))
        elif roll < 0.75:
            intent = {"op": "note", "doc": doc, "sym": symbol, "present": True, "note": note}
            await self.edit(intent, handle.set_note(symbol, note))
        else:
            index = rng.randrange(len(entries))
            intent = {"op": "move", "doc": doc, "sym": symbol, "present": True, "to": index}
            await self.edit(intent, handle.move(symbol, index))

    async def _contested(self, handle: WatchlistHandle) -> None:
        rng = self.rng
        doc = handle.name
        if CONTESTED not in handle.symbols:
            intent = {"op": "add", "doc": doc, "sym": CONTESTED, "present": True}
            await self.edit(intent, handle.add([CONTESTED]))
        elif rng.random() < 0.5:
            note = f"{self.name}-{self.n + 1}"
            intent = {"op": "note", "doc": doc, "sym": CONTESTED, "present": True, "note": note}
            await self.edit(intent, handle.set_note(CONTESTED, note))
        else:
            index = rng.randrange(len(handle.symbols))
            intent = {"op": "move", "doc": doc, "sym": CONTESTED, "present": True, "to": index}
            await self.edit(intent, handle.move(CONTESTED, index))

    async def _trade_edit(self, portfolio: PortfolioHandle) -> None:
        rng = self.rng
        mine = [t for t in portfolio.trades() if (t.note or "").startswith(f"{self.name}#")]
        roll = rng.random()
        qty = str(rng.choice((-1, 1)) * rng.randint(1, 500))
        price = f"{rng.randint(1, 900)}.{rng.randint(0, 99):02d}"
        if not mine or roll < 0.6:
            self.tags += 1
            tag = f"{self.name}#{self.tags}"
            symbol = rng.choice(("AAPL", "MSFT", "NVDA", "BRK.B", *own_symbols(self.index)[:2]))
            intent = {"op": "trade", "tag": tag, "qty": qty, "price": price, "note": tag}
            await self.edit(intent, portfolio.add_trade(symbol, qty, price, note=tag))
            return
        trade = rng.choice(mine)
        tag = (trade.note or "").split("/")[0]
        base = {"tag": tag, "id": trade.id}
        before = {"qty": _plain(trade.quantity), "price": _plain(trade.price), "note": trade.note}
        if roll < 0.92:
            changes: dict[str, object] = {}
            after = dict(before)
            if rng.random() < 0.6:
                changes["quantity"] = after["qty"] = qty
            if rng.random() < 0.6 or not changes:
                changes["price"] = after["price"] = price
            if rng.random() < 0.3:
                changes["note"] = after["note"] = f"{tag}/{self.n + 1}"
            intent = {"op": "correct", **base, **after}
            await self.edit(intent, portfolio.correct_trade(trade.id, **changes))
        else:
            intent = {"op": "delete", **base, **before}
            await self.edit(intent, portfolio.delete_trade(trade.id))


def _plain(value: Any) -> str:
    from foliosync.sync.validation import decimal_to_str

    return str(decimal_to_str(value))


def _journal_acks(replica: Replica, journal: Journal) -> None:
    """Journal every Ack the relay gives, with the updates it settles, read before settling."""
    settle = replica.acknowledge

    async def acknowledge(doc_id: str, seq: int, *, keep: Collection[int] = ()) -> None:
        kept = set(keep)
        rows = [
            row
            for row in await replica.pending_updates(doc_id)
            if row.seq <= seq and row.seq not in kept
        ]
        await settle(doc_id, seq, keep=keep)
        journal.write(
            {
                "k": "ack",
                "at": time.time(),  # the real clock, whatever offset foliosync's has
                "doc": doc_id,
                "seq": seq,
                "updates": [base64.b64encode(row.data).decode() for row in rows],
            }
        )

    setattr(replica, "acknowledge", acknowledge)  # noqa: B010 - this process's replica only


async def run(args: argparse.Namespace) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the harness asks when it hangs
    if args.clock_offset_ms:
        patch_clock(args.clock_offset_ms)
    from foliosync.client import Backoff, Replica, SyncClient
    from foliosync.sync.clock import wall_ms

    journal = Journal(Path(args.journal))
    journal.write(
        {"k": "start", "pid": os.getpid(), "t": wall_ms(), "offset": args.clock_offset_ms}
    )
    replica = await Replica.open(args.db)
    _journal_acks(replica, journal)
    replica.on_refusal(
        lambda refusal: journal.write(
            {"k": "refusal", "doc": refusal.doc_id, "code": refusal.code, "text": str(refusal)}
        )
    )
    client = SyncClient(
        replica,
        args.url,
        args.token,
        client_name=f"chaos-dev{args.index}",
        backoff=Backoff(base=0.05, cap=0.5),
        heartbeat=2.0,
        connect_timeout=3.0,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    device = Device(replica, journal, args.index, args.seed)
    client.start()
    shared, own, portfolio = await device.documents()
    print("ready", flush=True)

    async def report() -> None:
        while True:
            health = client.health()
            journal.write({"k": "status", "pending": health.pending, "state": str(health.state)})
            await asyncio.sleep(STATUS_SECONDS)

    reporter = asyncio.ensure_future(report())
    try:
        while not stop.is_set():
            await device.step(shared, own, portfolio)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), device.rng.uniform(args.pause_min, args.pause_max)
                )
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        await client.stop()
        await replica.close()
        journal.write({"k": "stopped"})
        journal.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.device", description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock-offset-ms", type=int, default=0)
    parser.add_argument("--pause-min", type=float, default=0.01)
    parser.add_argument("--pause-max", type=float, default=0.06)
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
