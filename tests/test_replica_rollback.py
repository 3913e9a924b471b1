"""Rolling back a change the relay refused for good: the document is what it would be without it,
in this process and in every other with the file open; the other pending changes stay and sync."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from foliosync.client import Refusal
from foliosync.client.replica import DocumentChange, Replica
from foliosync.client.sync import SyncClient
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.extensions import Extension, ProposedUpdate, default_extensions
from foliosync.sync.errors import DocumentNotFound, StorageFull, UpdateRefused
from foliosync.sync.model import EditContext, Portfolio, Watchlist

from .conftest import run_cli


async def seqs(replica: Replica, doc_id: str) -> list[int]:
    return [p.seq for p in await replica.pending_updates(doc_id)]


READ_SYMBOLS = textwrap.dedent(
    """
    import asyncio, json, sys
    from foliosync.client.replica import Replica

    async def main() -> None:
        async with Replica.open(sys.argv[1], watch_interval=None) as replica:
            wl = await replica.watchlist(sys.argv[2])
            print(json.dumps({"symbols": wl.symbols,
                              "refusals": [r.summary for r in replica.refusals()]}))

    asyncio.run(main())
    """
)


async def read_in_another_process(path: Path, name: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        READ_SYMBOLS,
        str(path),
        name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_a_refused_change_between_two_accepted_ones_leaves_a_and_c(tmp_path: Path) -> None:
    """B refused, C made by the same client right after it (its clocks follow B's): C is re-made
    on top of A as a new row; A keeps its seq and bytes. Another replica of the file (a second
    connection, reading by the watcher) and another process see A and C, never B."""
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica, Replica.open(path) as other:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])  # A
        await tech.add(["NVDA"])  # B
        await tech.add(["MSFT"])  # C
        before = await replica.pending_updates(tech.id)
        a, b, c = before[-3:]
        await other.refresh()
        assert (await other.watchlist("Tech")).symbols == ["AAPL", "NVDA", "MSFT"]
        heard: list[Refusal] = []
        other.on_refusal(heard.append)
        changes: list[DocumentChange] = []
        replica.subscribe(changes.append)

        refusal = await replica.refuse(tech.id, b.seq, "refused", "no more than 1 symbol")

        assert refusal is not None
        assert refusal.summary == "add NVDA to Tech" and refusal.changes == 1
        assert refusal.code == "refused" and refusal.message == "no more than 1 symbol"
        assert len(refusal.rebased) == 1 and refusal.rebased[0] > c.seq  # C re-made: a new seq
        assert tech.symbols == ["AAPL", "MSFT"]  # the handle the app holds shows it
        after = await replica.pending_updates(tech.id)
        assert [p.seq for p in after] == [*[p.seq for p in before[:-2]], *refusal.rebased]
        assert after[-2].data == a.data  # A untouched
        assert tech.pending == sum(p.changes for p in after)
        assert changes[-1] == DocumentChange(tech.id, tech.model.KIND, "local")  # read unsent
        assert replica.refusals() == [refusal] == replica.refusals(tech.id)
        assert 'the relay refused "add NVDA to Tech" (seq' in refusal.describe("Tech")

        await asyncio.wait_for(_until(lambda: bool(heard)), 10)  # the watcher read the file
        assert heard == [refusal]
        assert (await other.watchlist("Tech")).symbols == ["AAPL", "MSFT"]
        assert other.refusals() == [refusal]
        seen = await read_in_another_process(path, "Tech")
        assert seen == {"symbols": ["AAPL", "MSFT"], "refusals": ["add NVDA to Tech"]}

        # the same row again, an acknowledged one, an unknown one: nothing to roll back
        assert await replica.refuse(tech.id, b.seq, "refused", "again") is None
        await replica.acknowledge(tech.id, a.seq)
        assert await replica.refuse(tech.id, a.seq, "refused", "settled") is None
        assert await replica.refuse(tech.id, 10_000, "refused", "unknown") is None
        assert await replica.refuse("wl-" + "0" * 24, 1, "refused", "no such document") is None
        assert tech.symbols == ["AAPL", "MSFT"] and len(replica.refusals()) == 1

        # edits go on, on both, and stay
        await tech.add(["TSLA"])
        await (await other.watchlist("Tech")).add(["AMD"])
        await replica.refresh()
        symbols = tech.symbols  # (the two additions may be concurrent: either order)
        assert sorted(symbols) == ["AAPL", "AMD", "MSFT", "TSLA"]
    async with Replica.open(path) as replica:  # across a close and a reopen
        assert (await replica.watchlist("Tech")).symbols == symbols
        assert [r.summary for r in replica.refusals()] == ["add NVDA to Tech"]


async def _until(check: Any, interval: float = 0.02) -> None:
    while not check():
        await asyncio.sleep(interval)


async def test_an_independent_later_change_keeps_its_seq_and_bytes(tmp_path: Path) -> None:
    """C made after a reopen (a new client id, on other keys): it stands without B as it is."""
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await tech.add(["NVDA"])
        b = (await replica.pending_updates(tech.id))[-1]
    async with Replica.open(path) as replica:
        tech = await replica.watchlist("Tech")
        await tech.add(["MSFT"])
        c = (await replica.pending_updates(tech.id))[-1]
        refusal = await replica.refuse(tech.id, b.seq, "bad_update", "not a valid update")
        assert refusal is not None and refusal.rebased == ()
        assert tech.symbols == ["AAPL", "MSFT"]
        after = await replica.pending_updates(tech.id)
        assert after[-1] == c  # same seq, same bytes
    async with Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == ["AAPL", "MSFT"]


async def test_a_later_change_that_overwrites_the_refused_one_is_remade(tmp_path: Path) -> None:
    """C (another client) sets the note B wrote: its item refers to B's, so it is re-made."""
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await replica.acknowledge(tech.id, (await seqs(replica, tech.id))[-1])
        await tech.set_note("AAPL", "refused note")
        b = (await seqs(replica, tech.id))[-1]
    async with Replica.open(path) as replica:
        tech = await replica.watchlist("Tech")
        await tech.move("AAPL", 0)  # independent of B: a slot of its own
        c_seq = (await seqs(replica, tech.id))[-1]
        await tech.set_note("AAPL", "kept note")
        refusal = await replica.refuse(tech.id, b, "refused", "notes are read-only")
        assert refusal is not None and refusal.summary == "change the note of AAPL in Tech"
        assert tech.entries()[0].note == "kept note"
        assert c_seq in await seqs(replica, tech.id)


async def test_compaction_keeps_each_pending_row_and_a_refusal_takes_only_its_own(
    tmp_path: Path,
) -> None:
    """Hundreds of offline edits and a compaction: every pending row stays its own until it is
    acknowledged, so refusing one rolls back that edit alone and the others are kept."""
    path = tmp_path / "r.db"
    symbols = [f"S{i:03d}" for i in range(250)]
    async with Replica.open(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await replica.acknowledge(tech.id, (await seqs(replica, tech.id))[-1])
        for symbol in symbols:
            await tech.add([symbol])
        await replica.compact(tech.id)
        pending = await replica.pending_updates(tech.id)
        assert len(pending) == 250 and all(p.changes == 1 for p in pending)
        refusal = await replica.refuse(tech.id, pending[100].seq, "refused", "not S100")
        assert refusal is not None and refusal.changes == 1
        assert refusal.summary == "add S100 to Tech"
        kept = [s for s in symbols if s != "S100"]
        assert tech.symbols == ["AAPL", *kept] and tech.pending == 249
        await replica.compact(tech.id)
    async with Replica.open(path) as replica:
        tech = await replica.watchlist("Tech")
        assert tech.symbols == ["AAPL", *kept] and tech.pending == 249


async def test_a_portfolio_trade_is_rolled_back_and_the_others_stay(tmp_path: Path) -> None:
    async with Replica.open(tmp_path / "r.db") as replica:
        main = await replica.create_portfolio("Main")
        await main.add_trade("AAPL", "10", "150")
        await main.add_trade("MSFT", "5", "300")
        refused = (await seqs(replica, main.id))[-1]
        await main.add_trade("AAPL", "-4", "160")
        refusal = await replica.refuse(main.id, refused, "refused", "MSFT is not allowed")
        assert refusal is not None
        assert refusal.summary == "record a trade of 5 MSFT in Main"
        assert {s: str(p.quantity) for s, p in main.positions().items()} == {"AAPL": "6"}


async def test_another_replica_editing_the_document_remakes_its_edit(tmp_path: Path) -> None:
    """A second replica of the file (no watcher: it has not read the rollback) edits the document
    right after it: the edit is not committed on top of the refused change, but made again on the
    rolled-back document, so that nothing of B comes back and no clock follows B's."""
    path = tmp_path / "r.db"
    async with (
        Replica.open(path) as syncer,
        Replica.open(path, watch_interval=None) as app,
    ):
        tech = await app.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await tech.add(["NVDA"])
        b = (await seqs(app, tech.id))[-1]
        await syncer.refresh()
        refusal = await syncer.refuse(tech.id, b, "forbidden", "read-only share")
        assert refusal is not None
        assert tech.symbols == ["AAPL", "NVDA"]  # not read yet
        await tech.add(["MSFT"])  # on the stale copy: re-made on the file's
        assert tech.symbols == ["AAPL", "MSFT"]
        await syncer.refresh()
        assert (await syncer.watchlist("Tech")).symbols == ["AAPL", "MSFT"]
        fresh = Doc()
        for update in [p.data for p in await app.pending_updates(tech.id)]:
            fresh.apply_update(update)
        # pending rows alone hold no NVDA: nothing of B is sent
        assert "NVDA" not in Watchlist(fresh, EditContext("x")).symbols


async def test_a_refusal_while_another_process_edits_converges(tmp_path: Path) -> None:
    """A process adds symbols in a loop while this one refuses one of its rows: both end with the
    same document, without the refused symbol, and every other edit is kept."""
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
    script = textwrap.dedent(
        """
        import asyncio, sys
        from foliosync.client.replica import Replica

        async def main() -> None:
            async with Replica.open(sys.argv[1]) as replica:
                wl = await replica.watchlist("Tech")
                for i in range(40):
                    await wl.add([f"S{i}"])
                    await asyncio.sleep(0.005)
                print("done", flush=True)

        asyncio.run(main())
        """
    )
    async with Replica.open(path) as replica:
        tech = await replica.watchlist("Tech")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(path), stdout=asyncio.subprocess.PIPE
        )
        refused: str | None = None
        for _ in range(400):
            await replica.refresh()
            if len(tech.symbols) > 10:
                rows = await replica.pending_updates(tech.id)
                symbols_before = set(tech.symbols)
                refusal = await replica.refuse(tech.id, rows[5].seq, "refused", "no")
                assert refusal is not None
                refused = refusal.summary.removeprefix("add ").removesuffix(" to Tech")
                assert refused not in tech.symbols
                assert symbols_before - {refused} <= set(tech.symbols)
                break
            await asyncio.sleep(0.01)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0 and out.strip() == b"done"
        assert refused is not None
        await replica.refresh()
        expected = {"AAPL", *(f"S{i}" for i in range(40))} - {refused}
        assert set(tech.symbols) == expected
        seen = await read_in_another_process(path, "Tech")
        assert set(seen["symbols"]) == expected


async def test_a_full_disk_refuses_the_rollback_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add([f"S{i}" for i in range(200)])
        await tech.add(["NVDA"])
        for i in range(20):
            await tech.set_note(f"S{i}", "x" * 200)
        rows = await replica.pending_updates(tech.id)
        pages = await replica._store._scalar("PRAGMA page_count")
        await replica._store.set_size_limit(pages)
        with pytest.raises(StorageFull):
            await replica.refuse(tech.id, rows[-21].seq, "refused", "no")
        assert "NVDA" in tech.symbols and await replica.pending_updates(tech.id) == rows
        assert replica.refusals() == []
        await replica._store.set_size_limit(1 << 30)
        assert await replica.refuse(tech.id, rows[-21].seq, "refused", "no") is not None
        assert "NVDA" not in tech.symbols


KILLED_MIDWAY = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from foliosync.client import replica as replica_module
    from foliosync.client.replica import Replica

    real = replica_module.plan_rollback

    def plan_then_die(log, seq, **options):
        result = real(log, seq, **options)
        if sys.argv[3] == "inside":
            os.kill(os.getpid(), signal.SIGKILL)  # inside the write transaction
        return result

    replica_module.plan_rollback = plan_then_die

    async def main() -> None:
        async with Replica.open(sys.argv[1]) as replica:
            wl = await replica.watchlist("Tech")
            await replica.refuse(wl.id, int(sys.argv[2]), "refused", "no")
            os.kill(os.getpid(), signal.SIGKILL)  # after COMMIT, before closing

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("when", ["inside", "after"])
async def test_a_process_killed_during_a_rollback_leaves_all_or_nothing(
    tmp_path: Path, when: str
) -> None:
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await tech.add(["NVDA"])
        b = (await seqs(replica, tech.id))[-1]
        await tech.add(["MSFT"])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_MIDWAY, str(path), str(b), when
    )
    assert await asyncio.wait_for(process.wait(), 60) == -signal.SIGKILL
    async with Replica.open(path) as replica:
        tech = await replica.watchlist("Tech")
        if when == "inside":
            assert tech.symbols == ["AAPL", "NVDA", "MSFT"] and replica.refusals() == []
            assert b in await seqs(replica, tech.id)
        else:
            assert tech.symbols == ["AAPL", "MSFT"] and len(replica.refusals()) == 1
            assert b not in await seqs(replica, tech.id)


async def test_a_replica_of_schema_2_rolls_back_what_its_snapshot_did_not_fold(
    tmp_path: Path,
) -> None:
    """Schema 2 kept no confirmed state: a row newer than the snapshot is rolled back exactly."""
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await replica.compact(tech.id)  # AAPL pending, folded into the snapshot
        await tech.add(["NVDA"])
        b = (await seqs(replica, tech.id))[-1]
        await tech.add(["MSFT"])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE documents SET confirmed = NULL")
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    async with Replica.open(path) as replica:
        tech = await replica.watchlist("Tech")
        assert await replica.refuse(tech.id, b, "refused", "no") is not None
        assert tech.symbols == ["AAPL", "MSFT"]
    async with Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == ["AAPL", "MSFT"]


async def test_the_kept_rows_sync_to_a_relay_and_reach_a_second_device(
    tmp_path: Path, relay: Any, sync_clients: Any, helpers: Any
) -> None:
    async with Replica.open(tmp_path / "laptop.db") as laptop:
        tech = await laptop.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await tech.add(["NVDA"])
        b = (await seqs(laptop, tech.id))[-1]
        await tech.add(["MSFT"])
        refusal = await laptop.refuse(tech.id, b, "refused", "no NVDA")
        assert refusal is not None
        client = sync_clients(laptop, relay.url, relay.token("alice", "laptop"))
        client.start()
        await client.wait_in_sync(timeout=20)
        assert await laptop.pending_updates(tech.id) == []
        await client.stop()
    async with Replica.open(tmp_path / "phone.db") as phone:
        await SyncClient(phone, relay.url, relay.token("alice", "phone")).sync_once(timeout=20)
        assert (await phone.watchlist("Tech")).symbols == ["AAPL", "MSFT"]


async def test_outgoing_sends_each_pending_row_unless_the_relay_lacks_more(
    tmp_path: Path,
) -> None:
    async with Replica.open(tmp_path / "r.db") as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        await replica.acknowledge(tech.id, (await seqs(replica, tech.id))[-1])
        relay = Doc()
        relay.apply_update(tech.model.doc.get_update())  # the relay has what was acknowledged
        await tech.add(["NVDA"])
        await tech.add(["MSFT"])
        rows = await replica.pending_updates(tech.id)
        sent = await replica.outgoing(tech.id, relay.get_state(), relay.get_update())
        assert sent == [(p.seq, p.data, (p.seq,)) for p in rows]
        merged = await replica.outgoing(tech.id, relay.get_state(), merged=True)
        assert [(m.seq, m.rows) for m in merged] == [(rows[-1].seq, (rows[0].seq, rows[1].seq))]
        # A relay restored from a backup older than AAPL: first what it lacks of the confirmed
        # content (carrying no row, under a seq below them), then each row on its own.
        restored = Doc()
        lacking = await replica.outgoing(tech.id, restored.get_state(), restored.get_update())
        assert [(m.seq, m.rows) for m in lacking] == [
            (rows[0].seq - 1, ()),
            *[(p.seq, (p.seq,)) for p in rows],
        ]
        restored.apply_update(lacking[0].update)
        assert Watchlist(restored, EditContext("x")).symbols == ["AAPL"]
        # the retry-later row stays pending through an Ack of a later one
        await replica.acknowledge(tech.id, rows[-1].seq, keep={rows[0].seq})
        assert await seqs(replica, tech.id) == [rows[0].seq]
        await replica.acknowledge(tech.id, rows[-1].seq)
        assert await seqs(replica, tech.id) == []
        relay.apply_update(tech.model.doc.get_update(relay.get_state()))
        assert await replica.outgoing(tech.id, relay.get_state(), relay.get_update()) == []


# -- the law: the rolled-back document is built of the other edits' effects -------------------

SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMD"]

watchlist_edits = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(SYMBOLS)),
    st.tuples(st.just("remove"), st.sampled_from(SYMBOLS)),
    st.tuples(st.just("note"), st.sampled_from(SYMBOLS), st.sampled_from(["a", "b", None])),
    st.tuples(st.just("move"), st.sampled_from(SYMBOLS), st.integers(0, 3)),
    st.tuples(st.just("reopen")),
)
portfolio_edits = st.one_of(
    st.tuples(st.just("buy"), st.sampled_from(SYMBOLS), st.integers(1, 9)),
    st.tuples(st.just("correct"), st.integers(0, 5), st.integers(1, 9)),
    st.tuples(st.just("delete"), st.integers(0, 5)),
    st.tuples(st.just("reopen")),
)


def roots_of(doc: Doc[Any], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {name: doc.get(name, type=Map).to_py() or {} for name in names}


def effect_of(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> Any:
    """(root, key) -> value or None for a deletion: an edit's effect, from plain snapshots."""
    changes = {}
    for name in after:
        for key in set(before[name]) | set(after[name]):
            if before[name].get(key, ...) != after[name].get(key, ...):
                changes[(name, key)] = after[name].get(key, ...)
    return changes


def built_from(effects: list[Any], names: tuple[str, ...]) -> Doc[Any]:
    plain: dict[str, dict[str, Any]] = {name: {} for name in names}
    for effect in effects:
        for (name, key), value in effect.items():
            if value is ...:
                plain[name].pop(key, None)
            else:
                plain[name][key] = value
    doc: Doc[Any] = Doc()
    with doc.transaction():
        for name, values in plain.items():
            root = doc.get(name, type=Map)
            for key, value in values.items():
                root[key] = value
    return doc


async def run_edits(path: Path, kind: str, edits: list[Any], refused: list[int]) -> tuple[Any, Any]:
    names = ("meta", "symbols", "fields") if kind == "wl" else ("meta", "trades", "fields")
    replica = await Replica.open(path, watch_interval=None)
    try:
        handle: Any = await (
            replica.create_watchlist("L") if kind == "wl" else replica.create_portfolio("P")
        )
        doc_id = handle.id
        await replica.acknowledge(doc_id, max(await seqs(replica, doc_id)))
        made: list[tuple[int, Any]] = []  # (seq, effect) of each edit that wrote a row
        base = roots_of(handle.model.doc, names)
        for edit in edits:
            if edit[0] == "reopen":
                await replica.close()
                replica = await Replica.open(path, watch_interval=None)
                handle = await (replica.watchlist("L") if kind == "wl" else replica.portfolio("P"))
                continue
            before = roots_of(handle.model.doc, names)
            top = max([0, *await seqs(replica, doc_id)])
            try:
                if edit[0] == "add":
                    await handle.add([edit[1]])
                elif edit[0] == "remove":
                    await handle.remove([edit[1]])
                elif edit[0] == "note":
                    await handle.set_note(edit[1], edit[2])
                elif edit[0] == "move":
                    await handle.move(edit[1], min(edit[2], len(handle.symbols) - 1))
                elif edit[0] == "buy":
                    await handle.add_trade(edit[1], str(edit[2]), "10")
                elif edit[0] == "correct":
                    trades = handle.trades()
                    await handle.correct_trade(
                        trades[edit[1] % len(trades)].id, quantity=str(edit[2])
                    )
                elif edit[0] == "delete":
                    trades = handle.trades()
                    await handle.delete_trade(trades[edit[1] % len(trades)].id)
            except (KeyError, LookupError, ValueError, ZeroDivisionError):
                continue  # not applicable now (no such symbol or trade): nothing written
            rows = await seqs(replica, doc_id)
            if rows and rows[-1] > top:
                made.append((rows[-1], effect_of(before, roots_of(handle.model.doc, names))))
        chosen = sorted({made[i % len(made)][0] for i in refused} if made else set())
        for seq in reversed(chosen):  # the latest first: re-made rows take new seqs
            assert await replica.refuse(doc_id, seq, "refused", "no") is not None
        kept = [effect for seq, effect in made if seq not in chosen]
        expected_doc = built_from([effect_of({n: {} for n in names}, base), *kept], names)
        model_type = Watchlist if kind == "wl" else Portfolio
        expected = model_type(expected_doc, EditContext("x"))
        got = handle.model
        if kind == "wl":
            view = [(e.symbol, e.note, e.position) for e in got.entries()]
            assert view == [(e.symbol, e.note, e.position) for e in expected.entries()]
        else:
            assert got.trades() == expected.trades()
            assert got.positions() == expected.positions()
        result = roots_of(got.doc, names)
    finally:
        await replica.close()
    async with Replica.open(path, watch_interval=None) as again:  # and so in the file
        reread: Any = await (again.watchlist("L") if kind == "wl" else again.portfolio("P"))
        assert roots_of(reread.model.doc, names) == result
    return result, expected


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(watchlist_edits, min_size=1, max_size=12),
    refused=st.lists(st.integers(0, 20), min_size=1, max_size=3),
)
def test_a_rolled_back_watchlist_is_built_of_the_other_edits(
    tmp_path_factory: pytest.TempPathFactory, edits: list[Any], refused: list[int]
) -> None:
    path = tmp_path_factory.mktemp("wl") / "r.db"
    asyncio.run(run_edits(path, "wl", edits, refused))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(portfolio_edits, min_size=1, max_size=10),
    refused=st.lists(st.integers(0, 20), min_size=1, max_size=3),
)
def test_a_rolled_back_portfolio_is_built_of_the_other_edits(
    tmp_path_factory: pytest.TempPathFactory, edits: list[Any], refused: list[int]
) -> None:
    path = tmp_path_factory.mktemp("pf") / "r.db"
    asyncio.run(run_edits(path, "pf", edits, refused))


async def test_refuse_on_a_watchlist_of_200_symbols_with_50_pending_rows(tmp_path: Path) -> None:
    """The figure the README quotes (printed with -s): a rollback costs milliseconds."""
    async with Replica.open(tmp_path / "r.db") as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add([f"S{i:03d}" for i in range(200)])
        await replica.acknowledge(tech.id, max(await seqs(replica, tech.id)))
        for i in range(50):
            await tech.set_note(f"S{i:03d}", f"note {i}")
        rows = await seqs(replica, tech.id)
        assert len(rows) == 50
        started = time.perf_counter()
        refusal = await replica.refuse(tech.id, rows[10], "refused", "no")
        elapsed = time.perf_counter() - started
        assert refusal is not None and len(refusal.rebased) == 39  # the same client after it
        assert tech.entries()[10].note is None and tech.entries()[11].note == "note 11"
        print(f"refuse(): 200 symbols, 50 pending rows: {elapsed * 1000:.1f} ms")
        assert elapsed < 5, elapsed


class NoNvda(Extension):
    """An app's rule on the relay: NVDA may not be in a watchlist."""

    async def before_apply(self, change: ProposedUpdate) -> None:
        model = change.candidate.model()
        if isinstance(model, Watchlist) and "NVDA" in model:
            raise UpdateRefused("NVDA may not be followed here")


async def test_a_relay_rule_refuses_a_change_and_the_device_rolls_it_back(
    tmp_path: Path, relay_server: Any
) -> None:
    """End to end: the relay refuses B (its rule), the device rolls it back, sends C re-made,
    and `foliosync sync` says so; `foliosync status` lists it afterwards."""
    secret = load_or_create_secret(tmp_path / "relay")
    async with relay_server(
        tmp_path / "relay", extensions=[*default_extensions(secret), NoNvda()]
    ) as relay:
        path = tmp_path / "laptop.db"
        async with Replica.open(path) as laptop:
            tech = await laptop.create_watchlist("Tech")
            await tech.add(["AAPL"])
            await tech.add(["NVDA"])
            await tech.add(["MSFT"])
        code, out, err = await run_cli(
            "--db",
            str(path),
            "sync",
            "--server",
            relay.url,
            "--token",
            issue_token(relay.secret, "alice", device="laptop"),
            "--timeout",
            "20",
        )
        assert code == 0, err
        assert 'Tech: the relay refused "add NVDA to Tech" (seq ' in out, out
        assert "refused): NVDA may not be followed here; rolled back" in out, out
        async with Replica.open(path) as laptop:
            assert (await laptop.watchlist("Tech")).symbols == ["AAPL", "MSFT"]
            assert await laptop.pending_updates() == []
        async with Replica.open(tmp_path / "phone.db") as phone:
            token = issue_token(relay.secret, "alice", device="phone")
            await SyncClient(phone, relay.url, token).sync_once(timeout=20)
            assert (await phone.watchlist("Tech")).symbols == ["AAPL", "MSFT"]
        code, out, err = await run_cli("--db", str(path), "status")
        assert code == 0, err
        assert 'Tech: the relay refused "add NVDA to Tech"' in out, out
        code, out, err = await run_cli("--db", str(path), "status", "--json")
        report = json.loads(out)
        assert report["refusals"][0]["summary"] == "add NVDA to Tech"
        assert report["last_refusal"]["code"] == "refused"
        assert 'refused "add NVDA to Tech", rolled back' in report["status_line"]


async def test_a_document_created_on_a_stale_index_is_listed_on_the_rolled_back_one(
    tmp_path: Path,
) -> None:
    """The index (the list of documents) rolled back by another replica of the file: a document
    created on the stale copy is listed again on the file's, and the refused entry stays out."""
    path = tmp_path / "r.db"
    async with (
        Replica.open(path) as syncer,
        Replica.open(path, watch_interval=None) as app,
    ):
        await app.create_watchlist("Tech")
        await app.create_watchlist("Refused")
        index_rows = await app.pending_updates("index")
        await syncer.refresh()
        assert await syncer.refuse("index", index_rows[-1].seq, "forbidden", "no") is not None
        await app.create_portfolio("Main")
        await syncer.refresh()
        names = [e.name for e in (await syncer.index()).entries()]
        assert sorted(names) == ["Main", "Tech"]
        assert [e.name for e in (await app.index()).entries()] == names


async def test_a_document_refused_as_a_whole_goes_with_its_index_entry_everywhere(
    tmp_path: Path,
) -> None:
    """too_many_documents: the relay takes no change of the document. Every pending change of it
    is rolled back at once (one refusal naming them), and a document of which nothing is left,
    on the relay or pending, is removed with its index entry, here and in another replica of
    the file; the refusal stays. Creating it again makes it anew."""
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica, Replica.open(path) as other:
        keep = await replica.create_watchlist("Keep")
        await keep.add(["AAPL"])
        tech = await replica.create_watchlist("Tech")
        await tech.add(["NVDA"])
        await tech.add(["MSFT"])
        await other.refresh()
        seen_there = await other.watchlist("Tech")
        first = (await replica.pending_updates(tech.id))[0]
        message = "the relay keeps at most 3 documents per user"

        refusal = await replica.refuse(
            tech.id, first.seq, "too_many_documents", message, whole=True
        )

        assert refusal is not None and refusal.code == "too_many_documents"
        assert refusal.summary == "create watchlist Tech; add NVDA to Tech; add MSFT to Tech"
        assert refusal.changes == 3 and refusal.rebased == ()
        assert [d.name for d in replica.documents()] == ["Keep"]
        assert [e.name for e in (await replica.index()).entries()] == ["Keep"]
        assert await replica.pending_updates(tech.id) == []
        assert replica.refusals() == [refusal]
        with pytest.raises(DocumentNotFound):
            await tech.add(["TSLA"])
        with pytest.raises(DocumentNotFound):
            replica.info(tech.id)
        # the refusals of its other changes in flight: nothing left to roll back
        assert await replica.refuse(tech.id, first.seq + 1, "too_many_documents", message) is None

        await other.refresh()
        assert [d.name for d in other.documents()] == ["Keep"]
        assert [e.name for e in (await other.index()).entries()] == ["Keep"]
        assert other.refusals() == [refusal]
        with pytest.raises(DocumentNotFound):
            await seen_there.add(["AMD"])

        again = await replica.create_watchlist("Tech")  # made anew
        await again.add(["AMD"])
        assert again.symbols == ["AMD"]
        assert sorted(e.name for e in (await replica.index()).entries()) == ["Keep", "Tech"]
        assert keep.symbols == ["AAPL"]


async def test_a_document_the_relay_holds_is_rolled_back_as_a_whole_but_kept(
    tmp_path: Path,
) -> None:
    async with Replica.open(tmp_path / "r.db") as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL"])
        for row in await seqs(replica, tech.id):
            await replica.acknowledge(tech.id, row)  # the relay stored them
        await tech.add(["NVDA"])
        await tech.add(["MSFT"])
        first = (await seqs(replica, tech.id))[0]
        refusal = await replica.refuse(tech.id, first, "too_many_documents", "no", whole=True)
        assert refusal is not None and refusal.changes == 2
        assert tech.symbols == ["AAPL"] and replica.info(tech.id).pending == 0
        assert [e.name for e in (await replica.index()).entries()] == ["Tech"]


async def test_the_last_change_of_a_document_the_relay_never_took_refused_takes_it_away(
    tmp_path: Path,
) -> None:
    """Refused one by one (an app's rule on the document): the first refusal leaves its creation
    pending, so the document stays; the refusal of the creation leaves nothing, so it goes."""
    async with Replica.open(tmp_path / "r.db") as replica:
        secret = await replica.create_watchlist("Secret")
        await secret.add(["AAPL"])
        creation, addition = await seqs(replica, secret.id)
        assert await replica.refuse(secret.id, addition, "refused", "not this one") is not None
        assert [d.name for d in replica.documents()] == ["Secret"]
        (creation,) = await seqs(replica, secret.id)
        assert await replica.refuse(secret.id, creation, "refused", "not this one") is not None
        assert replica.documents() == []
        assert (await replica.index()).entries() == []
        assert [r.summary for r in replica.refusals()] == [
            "create watchlist Secret",
            "add AAPL to Secret",
        ]
