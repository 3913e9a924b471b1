"""The RelayStore contract, run against every adapter (SQLite in tmp_path, memory)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from foliosync.server.storage import (
    MemoryRelayStore,
    RelayStore,
    RelayStoreError,
    SQLiteRelayStore,
    Watermark,
)

WL = "wl-" + "a" * 24
PF = "pf-" + "b" * 24
WL2 = "wl-" + "c" * 24


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RelayStore]:
    opened: RelayStore
    if request.param == "sqlite":
        opened = await SQLiteRelayStore.open(tmp_path / "relay.db")
    else:
        opened = MemoryRelayStore()
    yield opened
    with contextlib.suppress(Exception):
        await opened.close()


async def test_append_returns_increasing_seqs(store: RelayStore) -> None:
    seqs = [
        await store.append("alice", WL, b"u1", 1000, "d1"),
        await store.append("alice", PF, b"u2", 1001, "d1"),
        await store.append("bob", WL, b"u3", 1002, "d2"),
        await store.append("alice", WL, b"u4", 1003, "d2"),
    ]
    assert all(isinstance(s, int) and s > 0 for s in seqs)
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)


async def test_load_returns_snapshot_updates_in_order_and_watermark(store: RelayStore) -> None:
    assert await store.load("alice", WL) is None
    seqs = [await store.append("alice", WL, f"u{i}".encode(), 1000 + i, f"d{i}") for i in range(5)]
    await store.append("alice", PF, b"other document", 5000, "dx")

    loaded = await store.load("alice", WL)
    assert loaded is not None
    assert loaded.snapshot == b""
    assert loaded.updates == [b"u0", b"u1", b"u2", b"u3", b"u4"]
    assert loaded.last_seq == seqs[-1]
    assert loaded.watermark == Watermark(1004, "d4")
    assert await store.load("bob", WL) is None


async def test_compact_replaces_updates_up_to_seq_and_keeps_later_ones(store: RelayStore) -> None:
    seqs = [await store.append("alice", WL, f"u{i}".encode(), 1000 + i, "d1") for i in range(4)]
    other = await store.append("alice", WL2, b"untouched", 2000, "d2")

    await store.compact("alice", WL, b"SNAPSHOT(u0..u2)", seqs[2])
    later = await store.append("alice", WL, b"u4", 3000, "d3")

    loaded = await store.load("alice", WL)
    assert loaded is not None
    assert loaded.snapshot == b"SNAPSHOT(u0..u2)"
    assert loaded.updates == [b"u3", b"u4"]
    assert loaded.last_seq == later
    assert loaded.watermark == Watermark(3000, "d3")
    # compacting one document leaves the others alone
    untouched = await store.load("alice", WL2)
    assert untouched is not None
    assert (untouched.snapshot, untouched.updates, untouched.last_seq) == (
        b"",
        [b"untouched"],
        other,
    )

    # compacting everything leaves a snapshot and no log, and the seq counter keeps rising
    await store.compact("alice", WL, b"SNAPSHOT(all)", later)
    loaded = await store.load("alice", WL)
    assert loaded is not None
    assert (loaded.snapshot, loaded.updates) == (b"SNAPSHOT(all)", [])
    assert await store.append("alice", WL, b"u5", 4000, "d1") > later


async def test_documents_are_listed_per_user_only(store: RelayStore) -> None:
    await store.append("alice", WL, b"a1", 1, "d1")
    await store.append("alice", PF, b"a2", 2, "d1")
    await store.append("bob", WL2, b"b1", 3, "d2")
    await store.append("bob", WL, b"bob's own wl", 4, "d2")

    assert await store.documents("alice") == sorted([WL, PF])
    assert await store.documents("bob") == sorted([WL, WL2])
    assert await store.documents("carol") == []
    # the same id under two users names two documents
    alice_wl, bob_wl = await store.load("alice", WL), await store.load("bob", WL)
    assert alice_wl is not None and bob_wl is not None
    assert alice_wl.updates == [b"a1"]
    assert bob_wl.updates == [b"bob's own wl"]
    assert await store.load("bob", PF) is None


async def test_concurrent_appends_are_all_stored_and_visible_once_awaited(
    store: RelayStore,
) -> None:
    async def append_then_read(i: int) -> int:
        update = f"update-{i}".encode()
        seq = await store.append("alice", WL, update, 1000 + i, f"d{i % 3}")
        loaded = await store.load("alice", WL)
        assert loaded is not None and update in loaded.updates, f"update {i} not visible"
        assert loaded.last_seq >= seq
        return seq

    seqs = await asyncio.gather(*(append_then_read(i) for i in range(200)))

    assert len(set(seqs)) == 200
    assert seqs == sorted(seqs)  # stored in the order they were handed in
    loaded = await store.load("alice", WL)
    assert loaded is not None
    assert loaded.updates == [f"update-{i}".encode() for i in range(200)]
    assert loaded.last_seq == max(seqs)


async def test_compaction_while_other_appends_commit_loses_nothing(store: RelayStore) -> None:
    seqs = [await store.append("alice", WL, f"u{i}".encode(), i, "d1") for i in range(5)]

    results = await asyncio.gather(
        store.compact("alice", WL, b"SNAPSHOT", seqs[-1]),
        *(store.append("alice", WL2, f"v{i}".encode(), i, "d2") for i in range(50)),
        *(store.append("alice", WL, f"late{i}".encode(), 100 + i, "d3") for i in range(5)),
    )

    assert all(isinstance(r, int) for r in results[1:])
    compacted = await store.load("alice", WL)
    assert compacted is not None
    assert compacted.snapshot == b"SNAPSHOT"
    assert compacted.updates == [f"late{i}".encode() for i in range(5)]
    other = await store.load("alice", WL2)
    assert other is not None
    assert other.updates == [f"v{i}".encode() for i in range(50)]


async def test_append_after_close_raises(store: RelayStore) -> None:
    await store.append("alice", WL, b"u", 1, "d1")
    await store.close()
    with pytest.raises(RelayStoreError):
        await store.append("alice", WL, b"too late", 2, "d1")


async def test_append_racing_close_settles_instead_of_hanging(store: RelayStore) -> None:
    await store.append("alice", WL, b"u", 1, "d1")
    outcome = await asyncio.wait_for(
        asyncio.gather(
            store.close(), store.append("alice", WL, b"v", 2, "d1"), return_exceptions=True
        ),
        timeout=5,
    )
    assert outcome[0] is None
    assert isinstance(outcome[1], int | RelayStoreError)


# -- SQLite only -------------------------------------------------------------------------------


async def test_sqlite_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "relay.db"
    store = await SQLiteRelayStore.open(path)
    seqs = [await store.append("alice", WL, f"u{i}".encode(), 1000 + i, "d1") for i in range(3)]
    await store.compact("alice", WL, b"SNAPSHOT", seqs[0])
    await store.append("bob", PF, b"bob", 2000, "d9")
    await store.close()

    store = await SQLiteRelayStore.open(path)
    try:
        loaded = await store.load("alice", WL)
        assert loaded is not None
        assert loaded.snapshot == b"SNAPSHOT"
        assert loaded.updates == [b"u1", b"u2"]
        assert loaded.last_seq == seqs[2]
        assert loaded.watermark == Watermark(1002, "d1")
        assert await store.documents("alice") == [WL]
        assert await store.documents("bob") == [PF]
        assert await store.append("alice", WL, b"u3", 3000, "d2") > seqs[2]
    finally:
        await store.close()


async def test_sqlite_rejects_an_unknown_durability(tmp_path: Path) -> None:
    with pytest.raises(RelayStoreError, match="durability"):
        await SQLiteRelayStore.open(tmp_path / "relay.db", durability="sometimes")


async def test_ping_answers_while_open_and_fails_once_closed(store: RelayStore) -> None:
    """What /readyz asks of every adapter: a real query while open, RelayStoreError after."""
    await store.ping()
    await store.append("alice", WL, b"u1", 1000, "d1")
    await store.ping()
    await store.close()
    with pytest.raises(RelayStoreError, match="closed"):
        await store.ping()


async def test_sqlite_checkpoints_off_the_commit_path_keep_the_wal_small(tmp_path: Path) -> None:
    """Commits made on the loop's thread never checkpoint (no sync there): the store's thread
    does, every few hundred commits, so the WAL file stops growing instead of holding every
    commit since the store opened."""
    path = tmp_path / "relay.db"
    store = await SQLiteRelayStore.open(path)
    update = bytes(2000)  # about one page per commit
    wal = path.with_name("relay.db-wal")
    try:
        for i in range(400):
            await store.append("alice", WL, update, i, "d1")
        await asyncio.sleep(0.2)  # the last checkpoint ends
        size_after_400 = wal.stat().st_size
        for i in range(1600):
            await store.append("alice", WL, update, i, "d1")
        await asyncio.sleep(0.2)
        # Without checkpoints the WAL would hold 2,000 commits (> 8 MB); with them its pages
        # are reused and it grows by far less than the 1,600 commits added.
        assert wal.stat().st_size < size_after_400 + 1600 * 2000 // 4
        loaded = await store.load("alice", WL)
        assert loaded is not None and len(loaded.updates) == 2000
    finally:
        await store.close()
    reopened = await SQLiteRelayStore.open(path)
    try:
        again = await reopened.load("alice", WL)
        assert again is not None and len(again.updates) == 2000
    finally:
        await reopened.close()


async def test_sqlite_full_durability_commits_on_the_stores_thread(tmp_path: Path) -> None:
    store = await SQLiteRelayStore.open(tmp_path / "relay.db", durability="full")
    try:
        assert store._inline is None  # every commit syncs: never on the loop's thread
        seqs = await asyncio.gather(
            *(store.append("alice", WL, bytes([i]), i, "d") for i in range(50))
        )
        assert seqs == sorted(seqs) and len(set(seqs)) == 50
    finally:
        await store.close()
