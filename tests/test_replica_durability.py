"""The replica file under stress: killed processes, foreign or damaged files, a second process,
a full disk."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from foliosync.client.replica import Replica
from foliosync.client.store import APPLICATION_ID, SCHEMA_VERSION
from foliosync.sync.errors import (
    ReplicaCorrupt,
    ReplicaError,
    ReplicaLocked,
    SchemaTooNew,
    StorageFull,
)
from foliosync.sync.model import DocumentKind

HOLDER = textwrap.dedent(
    """
    import asyncio, sys, time
    from foliosync.client.replica import Replica

    async def main(path, mode):
        replica = await Replica.open(path)
        if mode == "one":
            wl = await replica.create_watchlist("Tech")
            await wl.add(["AAPL", "brk.b"], note="kept")
            pf = await replica.create_portfolio("Main")
            await pf.add_trade("AAPL", "0.1", "187.25")
            print("ok", flush=True)
        elif mode == "stream":
            wl = await replica.create_watchlist("Stream")
            i = 0
            while True:
                await wl.add([f"S{i}"])
                print(f"ok {i}", flush=True)
                i += 1
        else:
            print("ok", flush=True)
        time.sleep(120)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@contextlib.contextmanager
def holder(path: Path, mode: str) -> Iterator[subprocess.Popen[str]]:
    """A second process that opens the replica, does ``mode`` and then blocks."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def read_ok(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ok"):
        assert proc.stderr is not None
        proc.kill()
        pytest.fail(f"holder failed: {line!r} {proc.stderr.read()}")
    return line.strip()


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def snapshot_dir(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_an_edit_survives_a_kill_of_the_process(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with holder(path, "one") as proc:
        assert read_ok(proc) == "ok"
        kill(proc)
    async with await Replica.open(path) as replica:
        wl = await replica.watchlist("Tech")
        assert [(e.symbol, e.note) for e in wl.entries()] == [("AAPL", "kept"), ("BRK.B", "kept")]
        pf = await replica.portfolio("Main")
        assert [(t.symbol, str(t.quantity), str(t.price)) for t in pf.trades()] == [
            ("AAPL", "0.1", "187.25")
        ]
        assert wl.pending > 0 and pf.pending > 0  # still to be sent
        await wl.add(["MSFT"])  # the file is fully usable
    async with await Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == ["AAPL", "BRK.B", "MSFT"]


async def test_every_confirmed_edit_survives_a_kill_mid_stream(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with holder(path, "stream") as proc:
        for _ in range(40):
            last = read_ok(proc)
        kill(proc)
    confirmed = int(last.split()[1])
    async with await Replica.open(path) as replica:
        symbols = (await replica.watchlist("Stream")).symbols
    assert symbols[: confirmed + 1] == [f"S{i}" for i in range(confirmed + 1)]
    assert len(symbols) <= confirmed + 2  # at most the edit under way when it died


async def test_a_replica_open_in_another_process_opens_here_too(tmp_path: Path) -> None:
    """Shared, not locked: while another process holds the replica, this one reads and edits
    it, and what both wrote is there once the other process is gone (killed, even)."""
    path = tmp_path / "r.db"
    with holder(path, "one") as proc:
        assert read_ok(proc) == "ok"
        async with Replica.open(path) as replica:
            tech = await replica.watchlist("Tech")
            assert tech.symbols == ["AAPL", "BRK.B"]
            await tech.add(["MSFT"])
        async with Replica.open(path) as again:  # and again: the first left nothing behind
            assert (await again.watchlist("Tech")).symbols == ["AAPL", "BRK.B", "MSFT"]
        assert proc.poll() is None
        proc.kill()
        proc.wait(timeout=30)
    async with Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == ["AAPL", "BRK.B", "MSFT"]
        assert len((await replica.portfolio("Main")).trades()) == 1


async def test_a_replica_opens_twice_in_one_process(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with Replica.open(path) as first, Replica.open(path, watch_interval=None) as second:
        await (await first.create_watchlist("Tech")).add(["AAPL"])
        await second.refresh()
        assert (await second.watchlist("Tech")).symbols == ["AAPL"]
        await (await second.watchlist("Tech")).add(["MSFT"])
        await first.refresh()
        assert (await first.watchlist("Tech")).symbols == ["AAPL", "MSFT"]


async def test_a_schema_upgrade_waits_until_no_other_process_has_the_file(tmp_path: Path) -> None:
    """A migration needs the file alone (a process of the older schema may be reading it)."""
    path = tmp_path / "r.db"
    async with Replica.open(path) as replica:
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
    with sqlite3.connect(path) as conn:  # as schema 1 had it: no base_seq, no quotes
        conn.execute("ALTER TABLE documents DROP COLUMN base_seq")
        conn.execute("DROP TABLE quotes")
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('SELECT count(*) FROM documents').fetchone()\n"
            "print('ok', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ok"
        with pytest.raises(ReplicaLocked, match="upgrade"):
            await Replica.open(path)
    finally:
        reader.kill()
        reader.wait(timeout=30)
        assert reader.stdout is not None
        reader.stdout.close()
    async with Replica.open(path) as replica:  # alone now: upgraded
        assert (await replica.watchlist("Tech")).symbols == ["AAPL"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_garbage_bytes_are_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    path.write_bytes(random.Random(7).randbytes(16_384))
    before = snapshot_dir(tmp_path)
    with pytest.raises(ReplicaCorrupt):
        await Replica.open(path)
    assert snapshot_dir(tmp_path) == before


async def test_a_text_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my portfolio notes\n" * 200)
    before = snapshot_dir(tmp_path)
    with pytest.raises(ReplicaCorrupt):
        await Replica.open(path)
    assert snapshot_dir(tmp_path) == before


async def test_another_apps_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE foo (id INTEGER PRIMARY KEY, name TEXT)")
        conn.executemany("INSERT INTO foo (name) VALUES (?)", [("a",), ("b",)])
        conn.commit()
    before = snapshot_dir(tmp_path)
    with pytest.raises(ReplicaCorrupt):
        await Replica.open(path)
    assert snapshot_dir(tmp_path) == before
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT name FROM foo ORDER BY id").fetchall() == [("a",), ("b",)]


async def test_a_replica_of_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 99")
        conn.execute("CREATE TABLE future (x)")
        conn.commit()
    assert APPLICATION_ID == 0x466F6C53
    before = snapshot_dir(tmp_path)
    with pytest.raises(SchemaTooNew):
        await Replica.open(path)
    assert snapshot_dir(tmp_path) == before


async def test_a_damaged_replica_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Replica.open(path) as replica:
        wl = await replica.create_watchlist("Tech")
        await wl.add([f"S{i}" for i in range(200)], note="x" * 200)
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 3 * page
    # keep the header (and so the application id), wreck every page after the first
    data[page:] = random.Random(3).randbytes(len(data) - page)
    path.write_bytes(bytes(data))
    before = snapshot_dir(tmp_path)
    with pytest.raises(ReplicaCorrupt):
        await Replica.open(path)
    assert snapshot_dir(tmp_path) == before


async def test_a_full_disk_refuses_the_edit_and_keeps_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    replica = await Replica.open(path)
    try:
        wl = await replica.create_watchlist("Tech")
        await wl.add(["AAPL", "MSFT"], note="before the limit")
        pf = await replica.create_portfolio("Main")
        await pf.add_trade("AAPL", "10", "100")
        pages = await replica._store._scalar("PRAGMA page_count")
        await replica._store.set_size_limit(pages + 3)

        failed = None
        for i in range(500):
            entries = [(e.symbol, e.note) for e in wl.entries()]
            pending = wl.pending
            state = await replica.state_vector(wl.id)
            try:
                await wl.add([f"S{i}"], note="n" * 900)
            except StorageFull:
                failed = f"S{i}"
                break
        assert failed is not None, "the size limit was never reached"
        assert i > 0  # some edits fitted before the disk was full

        # the failed edit is not in memory, through the handle held or a new one
        assert [(e.symbol, e.note) for e in wl.entries()] == entries
        assert failed not in wl.symbols
        fresh = await replica.watchlist("Tech")
        assert [(e.symbol, e.note) for e in fresh.entries()] == entries
        assert wl.pending == pending
        assert await replica.state_vector(wl.id) == state

        # other documents fail the same way, and cleanly
        trades = [t.to_json() for t in pf.trades()]
        with pytest.raises(StorageFull):
            for n in range(50):
                await pf.add_trade("MSFT", "1", "1", note="t" * 900 + str(n))
        assert [t.to_json() for t in pf.trades()][: len(trades)] == trades
        with pytest.raises(StorageFull):  # fill what is left with small edits
            for n in range(5000):
                await pf.add_trade("MSFT", "1", str(n + 1))
        kept_trades = [t.to_json() for t in pf.trades()]
        with pytest.raises(ReplicaError):
            await replica.create_watchlist("New")
        assert [d.name for d in replica.documents()] == ["Main", "Tech"]
        assert {e.name for e in (await replica.index()).entries()} == {"Main", "Tech"}
    finally:
        await replica.close()

    # after a restart (no limit), everything accepted is there and editing works again
    async with await Replica.open(path) as replica:
        wl = await replica.watchlist("Tech")
        assert [(e.symbol, e.note) for e in wl.entries()] == entries
        pf = await replica.portfolio("Main")
        assert [t.to_json() for t in pf.trades()] == kept_trades
        assert await wl.add([failed]) == [failed]
        await replica.create_watchlist("New")
    async with await Replica.open(path) as replica:
        assert failed in (await replica.watchlist("Tech")).symbols
        assert [d.name for d in replica.documents(DocumentKind.WATCHLIST)] == ["New", "Tech"]


async def test_editing_resumes_with_the_same_handle_once_space_is_back(tmp_path: Path) -> None:
    async with await Replica.open(tmp_path / "r.db") as replica:
        wl = await replica.create_watchlist("Tech")
        await wl.add(["AAPL"])
        pages = await replica._store._scalar("PRAGMA page_count")
        await replica._store.set_size_limit(pages + 2)
        with pytest.raises(StorageFull):
            for i in range(500):
                await wl.add([f"S{i}"], note="n" * 900)
        symbols = wl.symbols
        await replica._store.set_size_limit(1 << 30)  # space freed
        assert await wl.add(["LAST"]) == ["LAST"]
        assert wl.symbols == [*symbols, "LAST"]
