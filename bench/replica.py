"""The local replica: how long one durable edit takes, and how fast a large replica opens.

Edit latency is measured around the awaited handle call, which returns only once the change is
committed to SQLite. Each case runs on a document built beforehand to its stated size (building
is timed separately) and kept at that size: an added symbol or trade is removed again after its
timed call, outside the measurement. Background compaction is left on, so an edit that waits for
it pays for it, as an app would.

The load case builds a replica of 50 watchlists and 50 portfolios through the public API, closes
it, and times opening it again (names only), listing, loading every document and reading it.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.table import Table
from foliosync.client.documents import PortfolioHandle, WatchlistHandle
from foliosync.client.replica import COMPACT_AFTER_BYTES, COMPACT_AFTER_ROWS, Replica
from foliosync.sync.model import DocumentKind, Portfolio

__all__ = ["run"]

EDIT_TARGET_MS = 1.0
OPEN_TARGET_MS = 200.0


@dataclass(frozen=True, slots=True)
class Sizes:
    symbols: int  # symbols in the watchlist an edit runs on
    trades: int  # trades in the portfolio an edit runs on
    trade_batch: int  # trades recorded per edit call while building a portfolio
    edits: int  # timed edits per case
    warmup: int  # untimed edits before each case
    watchlists: int  # documents of each kind in the load case
    portfolios: int
    load_repeats: int


FULL = Sizes(
    symbols=1_000,
    trades=10_000,
    trade_batch=1_000,
    edits=2_000,
    warmup=20,
    watchlists=50,
    portfolios=50,
    load_repeats=2,
)
QUICK = Sizes(
    symbols=100,
    trades=1_000,
    trade_batch=100,
    edits=200,
    warmup=5,
    watchlists=50,
    portfolios=50,
    load_repeats=3,
)

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def symbol(i: int) -> str:
    """The i-th benchmark symbol: "A" and five base-26 letters (AAAAAA, AAAAAB, ...)."""
    digits = []
    for _ in range(5):
        i, r = divmod(i, 26)
        digits.append(_LETTERS[r])
    if i:
        raise ValueError("symbol index out of range")
    return "A" + "".join(reversed(digits))


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(slots=True)
class Latencies:
    samples: list[float]  # seconds

    @property
    def ms(self) -> list[float]:
        return sorted(s * 1000 for s in self.samples)

    def summary(self) -> tuple[float, float, float, float]:
        """p50, p99, max (ms), and edits per second back to back."""
        ordered = self.ms
        total = sum(self.samples)
        rate = len(self.samples) / total if total else float("nan")
        return percentile(ordered, 0.50), percentile(ordered, 0.99), ordered[-1], rate


async def timed_edits(
    count: int,
    warmup: int,
    edit: Callable[[int], Awaitable[Any]],
    undo: Callable[[Any], Awaitable[Any]] | None = None,
) -> Latencies:
    """Time ``edit(i)`` ``count`` times after ``warmup`` untimed calls; ``undo`` is untimed."""
    samples: list[float] = []
    clock = time.perf_counter
    for i in range(warmup + count):
        started = clock()
        result = await edit(i)
        elapsed = clock() - started
        if i >= warmup:
            samples.append(elapsed)
        if undo is not None:
            await undo(result)
    return Latencies(samples)


def filesystem_of(path: Path) -> str:
    """The file system type holding ``path`` (from /proc/mounts), for the notes."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1]
                    inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) > len(best):
                        best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


# -- building documents --------------------------------------------------------------------


async def build_watchlist(replica: Replica, name: str, count: int) -> WatchlistHandle:
    handle = await replica.create_watchlist(name)
    await handle.add([symbol(i) for i in range(count)])
    return handle


async def build_portfolio(
    replica: Replica, name: str, count: int, batch: int, rng: random.Random
) -> PortfolioHandle:
    handle = await replica.create_portfolio(name)
    held = [symbol(i) for i in range(100)]
    start_ms = 1_600_000_000_000  # trades spread over the following days, in order
    done = 0
    while done < count:
        size = min(batch, count - done)
        rows = [
            (
                rng.choice(held),
                str(rng.randint(1, 500)),
                f"{rng.randint(1, 900)}.{rng.randint(0, 99):02d}",
                start_ms + (done + k) * 60_000,
            )
            for k in range(size)
        ]

        def record(model: Portfolio, rows: list[tuple[str, str, str, int]] = rows) -> None:
            for sym, qty, price, at in rows:
                model.add_trade(sym, qty, price, at)

        await replica.edit(handle.model, record)
        done += size
    return handle


# -- edit latency ----------------------------------------------------------------------------


async def edit_cases(
    root: Path, mode: str, sizes: Sizes, latency: Table, builds: Table, all_cases: bool
) -> None:
    """Latency rows for one synchronous mode; ``all_cases`` adds move and correct_trade."""
    rng = random.Random(f"edits-{mode}")
    replica = await Replica.open(root / f"edits-{mode.lower()}.db", synchronous=mode)
    try:
        started = time.perf_counter()
        watchlist = await build_watchlist(replica, "Bench watchlist", sizes.symbols)
        builds.add("watchlist", mode, sizes.symbols, 1, (time.perf_counter() - started) * 1000)
        assert len(watchlist.model) == sizes.symbols
        held = f"{sizes.symbols:,} symbols"

        fresh = iter(range(sizes.symbols, sizes.symbols + sizes.warmup + sizes.edits))

        async def add_symbol(_: int) -> str:
            new = symbol(next(fresh))
            await watchlist.add(new)
            return new

        async def remove_symbol(new: str) -> None:
            await watchlist.remove(new)

        result = await timed_edits(sizes.edits, sizes.warmup, add_symbol, remove_symbol)
        add_row(latency, "watchlist add", mode, held, result)
        assert len(watchlist.model) == sizes.symbols

        if all_cases:
            members = [symbol(i) for i in range(sizes.symbols)]

            async def move(_: int) -> None:
                await watchlist.move(rng.choice(members), rng.randrange(sizes.symbols))

            result = await timed_edits(sizes.edits, sizes.warmup, move)
            add_row(latency, "watchlist move", mode, held, result)

        started = time.perf_counter()
        portfolio = await build_portfolio(
            replica, "Bench portfolio", sizes.trades, sizes.trade_batch, rng
        )
        builds.add(
            "portfolio",
            mode,
            sizes.trades,
            -(-sizes.trades // sizes.trade_batch),
            (time.perf_counter() - started) * 1000,
        )
        assert len(portfolio.model) == sizes.trades
        held = f"{sizes.trades:,} trades"

        async def add_trade(_: int) -> str:
            trade = await portfolio.add_trade(
                rng.choice(("AAAAAA", "AAAAAB", "AAAAAC")), "10", "101.25"
            )
            return trade.id

        async def delete_trade(trade_id: str) -> None:
            await portfolio.delete_trade(trade_id)

        result = await timed_edits(sizes.edits, sizes.warmup, add_trade, delete_trade)
        add_row(latency, "portfolio add_trade", mode, held, result)
        assert len(portfolio.model) == sizes.trades

        if all_cases:
            ids = [t.id for t in portfolio.trades()]

            async def correct(_: int) -> None:
                await portfolio.correct_trade(
                    rng.choice(ids), price=f"{rng.randint(1, 900)}.{rng.randint(0, 99):02d}"
                )

            result = await timed_edits(sizes.edits, sizes.warmup, correct)
            add_row(latency, "portfolio correct_trade", mode, held, result)
    finally:
        await replica.close()


def add_row(table: Table, case: str, mode: str, held: str, result: Latencies) -> None:
    p50, p99, worst, rate = result.summary()
    table.add(
        case,
        mode,
        held,
        len(result.samples),
        p50,
        p99,
        worst,
        rate,
        f"p99 < {EDIT_TARGET_MS:g} ms",
        "yes" if p99 < EDIT_TARGET_MS else "NO",
    )


# -- loading a large replica -----------------------------------------------------------------


async def build_large_replica(path: Path, sizes: Sizes, builds: Table) -> None:
    rng = random.Random("load")
    started = time.perf_counter()
    replica = await Replica.open(path)
    try:
        for n in range(sizes.watchlists):
            await build_watchlist(replica, f"Watchlist {n + 1:03d}", sizes.symbols)
        for n in range(sizes.portfolios):
            await build_portfolio(
                replica, f"Portfolio {n + 1:03d}", sizes.trades, sizes.trade_batch, rng
            )
    finally:
        await replica.close()
    total = sizes.watchlists + sizes.portfolios
    builds.add(
        f"{total}-document replica",
        "NORMAL",
        sizes.watchlists * sizes.symbols + sizes.portfolios * sizes.trades,
        total + sizes.portfolios * (-(-sizes.trades // sizes.trade_batch)) + sizes.watchlists,
        (time.perf_counter() - started) * 1000,
    )


@dataclass(slots=True)
class LoadRun:
    open_ms: float
    list_ms: float
    load_ms: float  # every document into a pycrdt Doc
    read_ms: float  # the first read of each (entries / ledger and positions)
    close_ms: float
    per_watchlist_ms: list[float]
    per_portfolio_ms: list[float]

    @property
    def total_ms(self) -> float:
        return self.open_ms + self.list_ms + self.load_ms + self.read_ms


async def load_once(path: Path, expected: int) -> LoadRun:
    clock = time.perf_counter
    t0 = clock()
    replica = await Replica.open(path)
    t1 = clock()
    try:
        infos = replica.documents()
        t2 = clock()
        if len(infos) != expected:
            raise RuntimeError(f"expected {expected} documents, found {len(infos)}")
        handles: list[tuple[DocumentKind, Any, float]] = []
        for info in infos:
            started = clock()
            if info.kind == DocumentKind.WATCHLIST:
                handle: Any = await replica.watchlist(info.id)
            else:
                handle = await replica.portfolio(info.id)
            handles.append((info.kind, handle, clock() - started))
        t3 = clock()
        per_wl: list[float] = []
        per_pf: list[float] = []
        for kind, handle, load_s in handles:
            started = clock()
            if kind == DocumentKind.WATCHLIST:
                handle.entries()
                per_wl.append((load_s + clock() - started) * 1000)
            else:
                handle.positions()
                per_pf.append((load_s + clock() - started) * 1000)
        t4 = clock()
    finally:
        closing = clock()
        await replica.close()
        t5 = clock()
    return LoadRun(
        open_ms=(t1 - t0) * 1000,
        list_ms=(t2 - t1) * 1000,
        load_ms=(t3 - t2) * 1000,
        read_ms=(t4 - t3) * 1000,
        close_ms=(t5 - closing) * 1000,
        per_watchlist_ms=per_wl,
        per_portfolio_ms=per_pf,
    )


async def load_case(root: Path, sizes: Sizes, builds: Table) -> Table:
    path = root / "large.db"
    await build_large_replica(path, sizes, builds)
    total = sizes.watchlists + sizes.portfolios
    runs = [await load_once(path, total) for _ in range(sizes.load_repeats)]
    size_mb = sum(p.stat().st_size for p in root.iterdir() if p.name.startswith(path.name)) / (
        1 << 20
    )

    table = Table(
        f"Opening a replica of {total} documents ({sizes.watchlists} watchlists of "
        f"{sizes.symbols:,} symbols, {sizes.portfolios} portfolios of {sizes.trades:,} trades; "
        f"{size_mb:.1f} MB)",
        ["step", "median ms", "max ms", "target", "met"],
    )

    def row(step: str, values: list[float], target: float | None = None) -> None:
        median = statistics.median(values)
        table.add(
            step,
            median,
            max(values),
            f"< {target:g} ms" if target is not None else "",
            ("yes" if median < target else "NO") if target is not None else "",
        )

    row("Replica.open (names only)", [r.open_ms for r in runs], OPEN_TARGET_MS)
    row("documents() (list)", [r.list_ms for r in runs])
    row(f"load all {total} (pycrdt)", [r.load_ms for r in runs])
    row(f"first read of all {total}", [r.read_ms for r in runs])
    row(f"open + all {total} loaded and read", [r.total_ms for r in runs])
    row("one watchlist: load + read", [m for r in runs for m in r.per_watchlist_ms])
    row("one portfolio: load + read", [m for r in runs for m in r.per_portfolio_ms])
    row("close", [r.close_ms for r in runs])
    table.notes += [
        f"{sizes.load_repeats} runs, each a fresh Replica.open in this process, warm OS cache; "
        "median and max over the runs (per-document rows: over all documents of all runs).",
        "first read: entries() of a watchlist, positions() of a portfolio (decodes the ledger).",
        f"file size {size_mb:.1f} MB after close (database and any WAL left).",
    ]
    return table


# -- entry point -------------------------------------------------------------------------------


async def run(quick: bool) -> list[Table]:
    sizes = QUICK if quick else FULL
    latency = Table(
        "Local edit latency until durable (the awaited call returns after the SQLite commit)",
        [
            "case",
            "synchronous",
            "document",
            "edits",
            "p50 ms",
            "p99 ms",
            "max ms",
            "edits/s",
            "target",
            "met",
        ],
    )
    builds = Table(
        "Building the benchmark documents (public API, batch edits)",
        ["document", "synchronous", "items", "edit calls", "ms"],
    )
    with tempfile.TemporaryDirectory(prefix="foliosync-bench-") as tmp:
        root = Path(tmp)
        await edit_cases(root, "NORMAL", sizes, latency, builds, all_cases=True)
        await edit_cases(root, "FULL", sizes, latency, builds, all_cases=False)
        load = await load_case(root, sizes, builds)
        fs = filesystem_of(root)
    latency.notes += [
        f"{sizes.warmup} untimed edits before each case; edits/s = edits / summed latency "
        "(one at a time, back to back).",
        "add cases: the added symbol or trade is removed again after its timed call (untimed), "
        "so the document stays at its stated size.",
        "move: a random member to a random index; correct_trade: the price of a random trade.",
        f"replica files in {tempfile.gettempdir()} ({fs}); synchronous=FULL fsyncs every commit.",
        "background compaction on (after "
        f"{COMPACT_AFTER_ROWS} rows or {COMPACT_AFTER_BYTES >> 20} MB of updates of a document).",
    ]
    return [latency, load, builds]
