from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from foliosync.client.replica import DocumentChange, Replica
from foliosync.sync.errors import (
    DocumentExists,
    DocumentNotFound,
    InvalidNumber,
    InvalidSymbol,
    ValidationError,
)
from foliosync.sync.model import INDEX_DOCUMENT_ID, DocumentKind, document_id


def update_rows(path: Path, doc_id: str | None = None) -> int:
    """Rows of the update log, read with plain sqlite3 (the replica must be closed)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        if doc_id is None:
            return int(conn.execute("SELECT count(*) FROM updates").fetchone()[0])
        sql = "SELECT count(*) FROM updates WHERE doc_id = ?"
        return int(conn.execute(sql, (doc_id,)).fetchone()[0])


def file_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def triples(changes: list[DocumentChange]) -> list[tuple[str, DocumentKind, str]]:
    return [(c.doc_id, c.kind, c.origin) for c in changes]


async def exchange(a: Replica, b: Replica, doc_ids: list[str]) -> None:
    """Sync documents between two replicas by hand, both ways, with the sync-support API."""
    for doc_id in doc_ids:
        for source, target in ((a, b), (b, a)):
            update = await source.diff(doc_id, await target.state_vector(doc_id))
            await target.apply_remote(doc_id, update)


async def test_edits_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        device = replica.device_id
        wl = await replica.create_watchlist("Tech")
        await wl.add(["AAPL", "msft", "GOOG"], note="core")
        await wl.set_note("GOOG", "search")
        await wl.move("GOOG", 0)
        await wl.remove("MSFT")
        pf = await replica.create_portfolio("Main")
        t1 = await pf.add_trade("AAPL", "10", "100")
        t2 = await pf.add_trade("AAPL", "10", "110")
        await pf.add_trade("MSFT", "3", "400.25", note="starter")
        await pf.correct_trade(t1.id, note="first lot")
        await pf.delete_trade(t2.id)
        entries = [(e.symbol, e.note) for e in wl.entries()]
        trades = [t.to_json() for t in pf.trades()]
        positions = {s: p.to_json() for s, p in pf.positions().items()}
    assert entries == [("GOOG", "search"), ("AAPL", "core")]

    async with await Replica.open(path) as replica:
        assert replica.device_id == device
        wl = await replica.watchlist("tech")
        pf = await replica.portfolio(" MAIN ")
        assert wl.name == "Tech"
        assert [(e.symbol, e.note) for e in wl.entries()] == entries
        assert [t.to_json() for t in pf.trades()] == trades
        assert {s: p.to_json() for s, p in pf.positions().items()} == positions
        assert [t["note"] for t in trades] == ["first lot", "starter"]


async def test_pending_counts_and_acknowledge(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        wl = await replica.create_watchlist("Tech")
        base = wl.pending
        assert base >= 1  # the creation itself is a change to send
        for symbol in ["AAPL", "MSFT", "GOOG", "TSLA"]:
            await wl.add([symbol])
        await wl.add(["AAPL"])  # no change: nothing to send
        assert wl.pending == base + 4
        assert replica.info(wl.id).pending == base + 4
        pending = await replica.pending_updates(wl.id)
        assert sum(p.changes for p in pending) == base + 4
        seqs = [p.seq for p in pending]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(p.doc_id == wl.id for p in pending)
        # the relay stored everything up to the third pending row
        await replica.acknowledge(wl.id, seqs[2])
        left = await replica.pending_updates(wl.id)
        assert [p.seq for p in left] == seqs[3:]
        assert wl.pending == sum(p.changes for p in left)
        # other documents are not acknowledged by it
        assert replica.info(INDEX_DOCUMENT_ID).pending >= 1
    async with await Replica.open(path) as replica:
        wl = await replica.watchlist("Tech")
        assert [p.seq for p in await replica.pending_updates(wl.id)] == seqs[3:]
        assert wl.pending == len(seqs) - 3
        await replica.acknowledge(wl.id, seqs[-1])
        assert wl.pending == 0
        assert await replica.pending_updates(wl.id) == []
        assert wl.symbols == ["AAPL", "MSFT", "GOOG", "TSLA"]


async def test_pending_updates_carry_the_changes(tmp_path: Path) -> None:
    # what is pending, applied to an empty replica, gives the document
    async with (
        await Replica.open(tmp_path / "a.db") as a,
        await Replica.open(tmp_path / "b.db") as b,
    ):
        wl = await a.create_watchlist("Tech")
        await wl.add(["AAPL", "MSFT"], note="x")
        await wl.move("MSFT", 0)
        for doc_id in (INDEX_DOCUMENT_ID, wl.id):
            for update in await a.pending_updates(doc_id):
                await b.apply_remote(doc_id, update.data)
        copy = await b.watchlist("Tech")
        assert copy.id == wl.id
        assert [(e.symbol, e.note) for e in copy.entries()] == [("MSFT", "x"), ("AAPL", "x")]
        assert copy.pending == 0  # remote changes are not ours to send


async def test_forced_compaction_keeps_content_and_bounds_the_log(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        wl = await replica.create_watchlist("Tech")
        for i in range(60):
            await wl.add([f"S{i}"], note=f"n{i}")
        for i in range(0, 60, 3):
            await wl.remove([f"S{i}"])
        await wl.move("S59", 0)
        expected = [(e.symbol, e.note) for e in wl.entries()]
        pending = await replica.pending_updates(wl.id)
        await replica.acknowledge(wl.id, pending[-1].seq)
        await replica.compact(wl.id)
        assert [(e.symbol, e.note) for e in wl.entries()] == expected
        await wl.add(["LAST"])
    assert update_rows(path, wl.id) == 1  # only the edit made after the compaction
    async with await Replica.open(path) as replica:
        wl = await replica.watchlist("Tech")
        assert [(e.symbol, e.note) for e in wl.entries()] == [*expected, ("LAST", None)]
        assert wl.pending == 1


async def test_compaction_without_acknowledgement_keeps_pending_changes(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        pf = await replica.create_portfolio("Main")
        for i in range(20):
            await pf.add_trade("AAPL", str(i + 1), "10")
        before = pf.pending
        await replica.compact(pf.id)
        assert pf.pending == before
        data = [p.data for p in await replica.pending_updates(pf.id)]
    async with await Replica.open(path) as replica:
        pf = await replica.portfolio("Main")
        assert pf.pending == before
        assert [p.data for p in await replica.pending_updates(pf.id)] == data
        assert pf.positions()["AAPL"].quantity == sum(range(1, 21))


async def test_acknowledging_what_was_sent_settles_it_even_after_a_merge(tmp_path: Path) -> None:
    # A sync connection reads the pending updates, sends them, and acknowledges the last seq it
    # sent once the relay confirms. A compaction in between merges long runs of pending rows:
    # the acknowledgement must still settle every change it covers.
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        wl = await replica.create_watchlist("Tech")
        await wl.add(["AAPL"])
        for i in range(250):
            await wl.set_note("AAPL", f"n{i}")
        sent = await replica.pending_updates(wl.id)
        assert len(sent) > 200
        await replica.compact(wl.id)  # merges the pending rows
        assert sum(p.changes for p in await replica.pending_updates(wl.id)) == wl.pending
        await replica.acknowledge(wl.id, sent[-1].seq)
        assert wl.pending == 0
        assert await replica.pending_updates(wl.id) == []
        await wl.set_note("AAPL", "after")
        assert wl.pending == 1
    async with await Replica.open(path) as replica:
        wl = await replica.watchlist("Tech")
        assert wl.pending == 1
        assert wl.entries()[0].note == "after"


async def test_many_edits_compact_by_themselves(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        wl = await replica.create_watchlist("Tech")
        await wl.add(["AAPL", "MSFT", "GOOG"])
        for i in range(1200):
            await wl.set_note("AAPL", f"note {i}")
            if i == 700:
                await replica.acknowledge(wl.id, (await replica.pending_updates(wl.id))[-1].seq)
        expected = [(e.symbol, e.note) for e in wl.entries()]
        pending_changes = wl.pending
        assert pending_changes == 1200 - 701
    assert update_rows(path, wl.id) < 600
    async with await Replica.open(path) as replica:
        wl = await replica.watchlist("Tech")
        assert [(e.symbol, e.note) for e in wl.entries()] == expected
        assert expected[0] == ("AAPL", "note 1199")
        assert wl.pending == pending_changes
        assert sum(p.changes for p in await replica.pending_updates(wl.id)) == pending_changes


async def test_file_size_stays_bounded_under_many_edits(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    sizes = []
    for round_ in range(2):
        async with await Replica.open(path) as replica:
            wl = (
                await replica.create_watchlist("Tech")
                if round_ == 0
                else await replica.watchlist("Tech")
            )
            if round_ == 0:
                await wl.add([f"S{i}" for i in range(20)])
            for i in range(1500):
                if i % 2:
                    await wl.move(f"S{i % 20}", 0)
                else:
                    await wl.set_note(f"S{i % 20}", f"round {round_} edit {i}")
            await replica.compact(wl.id)
            pending = await replica.pending_updates(wl.id)
            await replica.acknowledge(wl.id, pending[-1].seq)
            await replica.compact(wl.id)
            symbols = wl.symbols
        sizes.append(file_size(path))
        assert update_rows(path) <= 5
    async with await Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == symbols
    # twice the edits, not twice the file: the second round reuses the space of the first (while
    # its rows were pending, the file also held the confirmed state: one more snapshot's pages)
    assert sizes[1] <= sizes[0] * 1.5 + 16_384, sizes


async def test_exact_decimals_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        pf = await replica.create_portfolio("Main")
        await pf.add_trade("BTC-USD", "0.1", "64000.123456789012")
        await pf.add_trade("BTC-USD", "0.2", "64000.123456789012")
        await pf.add_trade("AAPL", "123456789012345678", "0.000000000001")
        before = pf.pending
        for qty, price in [(0.1, "1"), ("1", 0.2), ("nan", "1"), ("1", "inf"), ("x", "1")]:
            with pytest.raises(InvalidNumber):
                await pf.add_trade("AAPL", qty, price)
        assert pf.pending == before
    async with await Replica.open(path) as replica:
        pf = await replica.portfolio("Main")
        btc = pf.positions()["BTC-USD"]
        assert btc.quantity == Decimal("0.3")
        assert btc.average_cost == Decimal("64000.123456789012")
        assert pf.positions()["AAPL"].quantity == Decimal("123456789012345678")
        assert {t.price for t in pf.trades()} == {
            Decimal("64000.123456789012"),
            Decimal("0.000000000001"),
        }
        shown = {s: p.to_json() for s, p in pf.positions().items()}
        assert shown["BTC-USD"]["qty"] == "0.3"


async def test_an_invalid_symbol_in_a_batch_creates_no_pending_update(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        wl = await replica.create_watchlist("Tech")
        await wl.add(["AAPL"])
        seqs = [p.seq for p in await replica.pending_updates()]
        state = await replica.state_vector(wl.id)
        for batch in (["MSFT", "A B"], ["GOOG", "TOO-LONG-SYMBOL-X"], ["IBM", 123], ["$$$"]):
            with pytest.raises(InvalidSymbol):
                await wl.add(batch)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await wl.add([])
        assert [p.seq for p in await replica.pending_updates()] == seqs
        assert await replica.state_vector(wl.id) == state
        assert wl.symbols == ["AAPL"]
        # the handle still works afterwards
        assert await wl.add(["brk.b", "RDS-A", "7203.T"]) == ["BRK.B", "RDS-A", "7203.T"]
    async with await Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == ["AAPL", "BRK.B", "RDS-A", "7203.T"]


async def test_index_and_listing(tmp_path: Path) -> None:
    async with await Replica.open(tmp_path / "r.db") as replica:
        assert replica.documents() == []
        wl = await replica.create_watchlist("Tech")
        pf = await replica.create_portfolio("Main")
        with pytest.raises(DocumentExists):
            await replica.create_watchlist(" tech ")
        with pytest.raises(DocumentNotFound):
            await replica.watchlist("Nope")
        with pytest.raises(DocumentNotFound):
            await replica.portfolio("Tech")  # a watchlist, not a portfolio
        listed = {(d.id, d.kind, d.name) for d in replica.documents()}
        assert listed == {
            (wl.id, DocumentKind.WATCHLIST, "Tech"),
            (pf.id, DocumentKind.PORTFOLIO, "Main"),
        }
        assert [d.id for d in replica.documents(DocumentKind.PORTFOLIO)] == [pf.id]
        index = await replica.index()
        assert {(e.id, e.kind, e.name) for e in index.entries()} == listed
        assert wl.id == document_id(DocumentKind.WATCHLIST, "Tech")
        assert set(replica.document_ids()) == {wl.id, pf.id, INDEX_DOCUMENT_ID}


async def test_two_replicas_creating_the_same_name_end_with_one_document(tmp_path: Path) -> None:
    async with (
        await Replica.open(tmp_path / "a.db") as a,
        await Replica.open(tmp_path / "b.db") as b,
    ):
        wa = await a.create_watchlist("Tech")
        await wa.add(["AAPL", "MSFT"])
        wb = await b.create_watchlist(" tech ")
        await wb.add(["GOOG", "AAPL"])
        pa = await a.create_portfolio("Main")
        await pa.add_trade("AAPL", "1", "100")
        pb = await b.create_portfolio("MAIN")
        await pb.add_trade("AAPL", "3", "120")
        assert wa.id == wb.id and pa.id == pb.id
        await exchange(a, b, [wa.id, pa.id, INDEX_DOCUMENT_ID])
        for replica in (a, b):
            watchlists = replica.documents(DocumentKind.WATCHLIST)
            assert [d.id for d in watchlists] == [wa.id]
            wl = await replica.watchlist(wa.id)
            assert sorted(wl.symbols) == ["AAPL", "GOOG", "MSFT"]
            assert len((await replica.index()).entries()) == 2
            pos = (await replica.portfolio(pa.id)).positions()["AAPL"]
            assert (pos.quantity, pos.average_cost) == (4, 115)  # (100 + 360) / 4
        assert (await a.watchlist("Tech")).symbols == (await b.watchlist("Tech")).symbols


async def test_a_document_known_only_from_the_index_is_adopted(tmp_path: Path) -> None:
    async with (
        await Replica.open(tmp_path / "a.db") as a,
        await Replica.open(tmp_path / "b.db") as b,
    ):
        wa = await a.create_watchlist("Tech")
        await wa.add(["AAPL"])
        await exchange(a, b, [INDEX_DOCUMENT_ID])
        assert [d.name for d in b.documents()] == ["Tech"]
        await exchange(a, b, [wa.id])
        assert (await b.watchlist("Tech")).symbols == ["AAPL"]
        with pytest.raises(DocumentExists):
            await b.create_watchlist("Tech")


async def test_change_notifications(tmp_path: Path) -> None:
    async with (
        await Replica.open(tmp_path / "a.db") as a,
        await Replica.open(tmp_path / "b.db") as b,
    ):
        seen: list[DocumentChange] = []
        unsubscribe = a.subscribe(seen.append)
        wl = await a.create_watchlist("Tech")
        assert (wl.id, DocumentKind.WATCHLIST, "local") in triples(seen)
        seen.clear()
        await wl.add(["AAPL"])
        assert triples(seen) == [(wl.id, DocumentKind.WATCHLIST, "local")]
        seen.clear()
        await wl.add(["AAPL"])  # nothing changed, nothing to tell
        assert seen == []

        other = await b.create_watchlist("Tech")
        await other.add(["MSFT"])
        update = await b.diff(wl.id, await a.state_vector(wl.id))
        assert await a.apply_remote(wl.id, update) is True
        assert triples(seen) == [(wl.id, DocumentKind.WATCHLIST, "remote")]
        seen.clear()
        assert await a.apply_remote(wl.id, update) is False  # a duplicate changes nothing
        assert seen == []

        unsubscribe()
        await wl.add(["GOOG"])
        assert seen == []

        def broken(_change: DocumentChange) -> None:
            raise RuntimeError("listener bug")

        stop_broken = a.subscribe(broken)
        await wl.add(["TSLA"])  # a failing listener does not fail the edit
        assert "TSLA" in wl.symbols
        stop_broken()

        changes = a.changes()
        pf = await a.create_portfolio("Main")
        next_change = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0)
        await pf.add_trade("AAPL", "1", "1")
        got = await asyncio.wait_for(next_change, timeout=5)
        assert (got.doc_id, got.kind, got.origin) == (pf.id, DocumentKind.PORTFOLIO, "local")
        remote = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0)
        await other.add(["IBM"])
        await a.apply_remote(wl.id, await b.diff(wl.id, await a.state_vector(wl.id)))
        got = await asyncio.wait_for(remote, timeout=5)
        assert (got.doc_id, got.kind, got.origin) == (wl.id, DocumentKind.WATCHLIST, "remote")
        await changes.aclose()


async def test_garbage_from_the_relay_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        wl = await replica.create_watchlist("Tech")
        await wl.add(["AAPL", "MSFT"])
        state = await replica.state_vector(wl.id)
        full = await replica.diff(wl.id, b"\x00")
        seen: list[DocumentChange] = []
        replica.subscribe(seen.append)
        for garbage in (b"\xff\xfe\xfd\xfc" * 8, b"garbage", b"\x01\x01\x01", b""):
            with pytest.raises(ValidationError):
                await replica.apply_remote(wl.id, garbage)
        with pytest.raises(ValidationError):
            await replica.apply_remote("not-an-id", b"")
        with pytest.raises(ValidationError):
            await replica.diff(wl.id, b"\xff\xff\xff")
        assert seen == []
        assert await replica.state_vector(wl.id) == state
        assert await replica.diff(wl.id, b"\x00") == full
        assert wl.symbols == ["AAPL", "MSFT"]
        await wl.add(["GOOG"])  # the handle still works
        local_rows = len(await replica.pending_updates(wl.id))
    assert update_rows(path, wl.id) == local_rows  # nothing of the garbage was stored
    async with await Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == ["AAPL", "MSFT", "GOOG"]


async def test_overlapping_writers_share_the_file_safely(tmp_path: Path) -> None:
    """Quotes flushed in the background, settings and edits may overlap in time: each must get
    its own transaction, and no accepted edit may ride along in another's (and be rolled back)."""
    from foliosync.sync.prices import PricePoint

    replica = await Replica.open(tmp_path / "r.db")
    watchlist = await replica.create_watchlist("Busy")

    async def prices() -> None:
        for i in range(100):
            points = [PricePoint(f"S{j}X", Decimal(i + 1), i, i + 1) for j in range(100)]
            await replica.apply_prices(points)
            await replica._flush_quotes(delay=0)

    async def settings() -> None:
        for i in range(100):
            await replica.set_meta(note=str(i))

    async def edits() -> None:
        for i in range(100):
            await watchlist.add([f"A{i}X"])

    await asyncio.gather(prices(), settings(), edits())
    await replica.close()

    reopened = await Replica.open(tmp_path / "r.db")
    try:
        assert len((await reopened.watchlist("Busy")).symbols) == 100
        assert reopened.meta["note"] == "99"
        quote = reopened.quotes.get("S0X")
        assert quote is not None and quote.price == Decimal(100)
    finally:
        await reopened.close()


@pytest.mark.parametrize("cancelled", ["write", "read"])
async def test_an_operation_cancelled_at_its_begin_leaves_no_transaction_open(
    tmp_path: Path, cancelled: str
) -> None:
    """A task cancelled while its BEGIN runs (a sync client stopped while it records an error,
    say): the next write must not find the connection inside that transaction. It did: the
    quotes' flush then failed with "cannot start a transaction within a transaction"."""
    from foliosync.client.store import ReplicaStore

    store = await ReplicaStore.open(tmp_path / "r.db")
    try:
        operation = store.set_meta({"a": "1"}) if cancelled == "write" else store.load("none")
        task = asyncio.get_running_loop().create_task(operation)
        await asyncio.sleep(0)  # the task holds the connection and awaits its BEGIN
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.set_meta({"b": "2"})
        await store.save_quotes([("AAPL", "187.25", 1_700_000_000_000, 1, None)])
        assert [row[0] for row in await store.load_quotes()] == ["AAPL"]
    finally:
        await store.close()
