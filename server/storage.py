"""Where the relay keeps documents: a small port and two adapters (SQLite, memory).

The port speaks bytes only (pycrdt updates and snapshots) so that an adapter never needs to know
the document model. Every adapter runs the same contract tests (tests/test_relay_storage.py).

The SQLite adapter commits in groups: appends queue up while the previous transaction commits,
and the writer commits everything queued in one transaction. An append returns only after its
transaction committed (so the relay acknowledges only what is stored) while a burst of a thousand
updates costs a handful of commits instead of a thousand. WAL with ``synchronous=NORMAL`` keeps
every committed update through a ``kill -9`` of the relay; ``durability="full"`` adds an fsync
per group for power loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from foliosync.sync.errors import RelayStoreError, StorageFullError

__all__ = [
    "MemoryRelayStore",
    "RelayStore",
    "RelayStoreError",
    "SQLiteRelayStore",
    "StorageFullError",
    "StoredDocument",
    "Watermark",
]


@dataclass(frozen=True, slots=True)
class Watermark:
    """When a document last changed on the relay, and from which device."""

    changed_at: int | None
    changed_by: str | None


@dataclass(frozen=True, slots=True)
class StoredDocument:
    snapshot: bytes
    updates: list[bytes]
    last_seq: int
    watermark: Watermark


class RelayStore(Protocol):
    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        """Store an update durably; returns its sequence number. Raises RelayStoreError."""
        ...

    async def load(self, user: str, doc_id: str) -> StoredDocument | None: ...

    async def compact(self, user: str, doc_id: str, snapshot: bytes, up_to_seq: int) -> None:
        """Replace the updates up to ``up_to_seq`` by ``snapshot`` (which covers them)."""
        ...

    async def documents(self, user: str) -> list[str]: ...

    async def ping(self) -> None:
        """A cheap real query: returns if the store answers, else raises RelayStoreError.

        What ``/readyz`` asks: a store that is closed, lost its database or cannot read it is
        not ready, even if the process still runs."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Append:
    user: str
    doc_id: str
    update: bytes
    changed_at: int
    changed_by: str
    done: asyncio.Future[int]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    user TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    snapshot BLOB NOT NULL,
    changed_at INTEGER,
    changed_by TEXT,
    PRIMARY KEY (user, doc_id)
);
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_by_doc ON updates (user, doc_id, seq);
"""

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_CHECKPOINT_EVERY = 200  # inline commits between two checkpoints (each ~1-4 WAL pages)
_INLINE_BUSY_MS = 200
_MAX_GROUP = 512  # 1,536 parameters in one INSERT: within SQLite's 32,766 since 3.32
_RETURNING = sqlite3.sqlite_version_info >= (3, 35)


class SQLiteRelayStore:
    """The default store: one SQLite file in the relay's data directory.

    Reads (loads, listings, pings) run as ONE call each on the store's own thread (a
    single-thread executor with its own ``sqlite3`` connection), a whole transaction in it.

    Writes (group commits, compactions) with ``durability="normal"`` run on the event loop's
    thread itself, on a connection of their own: WAL with ``synchronous=NORMAL`` writes a commit
    into the operating system's page cache and syncs nothing, a few hundred microseconds for a
    group, where handing it to a thread cost the relay its Acks' latency: on a busy machine the
    store's thread waited tens of milliseconds for a core and for the interpreter's lock, at
    every statement (measured: a 0.1 ms commit taking 60 ms, every Ack behind it waiting). What
    does sync, the WAL checkpoint, is taken off the commit (``wal_autocheckpoint = 0``) and run
    on the store's thread every ``_CHECKPOINT_EVERY`` commits (a few milliseconds, appends
    queueing meanwhile). With ``durability="full"`` every commit syncs, so writes go to the
    store's thread too.
    """

    def __init__(
        self,
        path: Path,
        db: sqlite3.Connection,
        thread: ThreadPoolExecutor,
        inline: sqlite3.Connection | None = None,
    ) -> None:
        self.path = path
        self._db = db  # used on the store's thread only
        self._thread = thread
        self._inline = inline  # the writes' connection on the loop's thread (normal durability)
        self._queue: asyncio.Queue[_Append | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._commits = 0

    @classmethod
    async def open(cls, path: str | Path, *, durability: str = "normal") -> SQLiteRelayStore:
        synchronous = {"normal": "NORMAL", "full": "FULL"}.get(durability)
        if synchronous is None:
            raise RelayStoreError(f"unknown durability {durability!r}: normal or full")
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foliosync-relay-store")

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(str(file), isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute(f"PRAGMA synchronous = {synchronous}")
                db.execute("PRAGMA busy_timeout = 5000")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            return db

        inline: sqlite3.Connection | None = None
        try:
            db = await asyncio.get_running_loop().run_in_executor(thread, connect)
            if durability == "normal":
                inline = sqlite3.connect(str(file), isolation_level=None, check_same_thread=False)
                inline.execute("PRAGMA synchronous = NORMAL")
                inline.execute("PRAGMA wal_autocheckpoint = 0")
                # Nothing else writes while the relay holds its data directory: a lock held
                # long would be a bug, and the loop must not wait seconds for it.
                inline.execute(f"PRAGMA busy_timeout = {_INLINE_BUSY_MS}")
        except sqlite3.Error as exc:
            thread.shutdown(wait=False)
            raise RelayStoreError(f"cannot open relay store {file}: {exc}") from exc
        store = cls(file, db, thread, inline)
        store._writer = asyncio.get_running_loop().create_task(store._write_loop())
        return store

    async def _call(self, function: Callable[[], _T]) -> _T:
        """``function`` on the store's thread; RelayStoreError once the store is closed."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, function)
        except RuntimeError as exc:  # the executor was shut down: the store is closed
            raise RelayStoreError("the relay store is closed") from exc

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        if self._closing or self._writer is None or self._writer.done():
            raise RelayStoreError("the relay store is closed")
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Append(user, doc_id, update, changed_at, changed_by, done))
        return await done

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < _MAX_GROUP and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    await self._commit(group)
                    return
                group.append(item)
            await self._commit(group)

    async def _commit(self, group: list[_Append]) -> None:
        rows = [(i.user, i.doc_id, i.update) for i in group]
        marks = [(i.user, i.doc_id, i.changed_at, i.changed_by) for i in group]
        try:
            if self._inline is not None:
                seqs = _commit_group(self._inline, rows, marks)
            else:
                seqs = await self._call(functools.partial(_commit_group, self._db, rows, marks))
        except (sqlite3.Error, RelayStoreError) as exc:
            error: RelayStoreError = (
                StorageFullError(f"relay storage is full: {exc}")
                if "full" in str(exc).lower()
                else exc
                if isinstance(exc, RelayStoreError)
                else RelayStoreError(f"relay storage failed: {exc}")
            )
            for item in group:
                if not item.done.done():
                    item.done.set_exception(error)
            return
        for item, seq in zip(group, seqs, strict=True):
            if not item.done.done():
                item.done.set_result(seq)
        if self._inline is not None:
            await self._after_inline_commit()

    async def _after_inline_commit(self) -> None:
        """Every ``_CHECKPOINT_EVERY`` commits, a checkpoint on the store's thread, where its
        sync waits for the disk instead of the event loop. The writer waits for it (appends
        queue meanwhile, for the next group): a checkpoint that writes race never completes,
        and the WAL, never restarted, would grow by every commit."""
        self._commits += 1
        if self._commits % _CHECKPOINT_EVERY:
            return

        def checkpoint() -> object:
            return self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

        try:
            await self._call(checkpoint)
        except (sqlite3.Error, RelayStoreError) as exc:  # the next commits tell if it matters
            log.warning("a checkpoint of %s failed: %s", self.path, exc)

    def _check_open(self) -> None:
        if self._closing:
            raise RelayStoreError("the relay store is closed")

    async def load(self, user: str, doc_id: str) -> StoredDocument | None:
        self._check_open()
        try:
            return await self._call(functools.partial(_load, self._db, user, doc_id))
        except sqlite3.Error as exc:
            raise RelayStoreError(f"cannot read {doc_id}: {exc}") from exc

    async def compact(self, user: str, doc_id: str, snapshot: bytes, up_to_seq: int) -> None:
        self._check_open()
        try:
            if self._inline is not None:
                _compact(self._inline, user, doc_id, snapshot, up_to_seq)
            else:
                await self._call(
                    functools.partial(_compact, self._db, user, doc_id, snapshot, up_to_seq)
                )
        except sqlite3.Error as exc:
            raise RelayStoreError(f"cannot compact {doc_id}: {exc}") from exc

    async def documents(self, user: str) -> list[str]:
        self._check_open()

        def listed() -> list[str]:
            rows = self._db.execute(
                "SELECT doc_id FROM documents WHERE user = ? ORDER BY doc_id", (user,)
            ).fetchall()
            return [str(d) for (d,) in rows]

        try:
            return await self._call(listed)
        except sqlite3.Error as exc:
            raise RelayStoreError(f"cannot list documents: {exc}") from exc

    async def ping(self) -> None:
        if self._closing or self._writer is None or self._writer.done():
            raise RelayStoreError("the relay store is closed")
        try:
            await self._call(lambda: self._db.execute("SELECT 1 FROM updates LIMIT 1").fetchone())
        except sqlite3.Error as exc:
            raise RelayStoreError(f"the relay store does not answer: {exc}") from exc

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True  # no append may queue behind the writer's stop marker
        if self._writer is not None and not self._writer.done():
            self._queue.put_nowait(None)
            await self._writer
        if self._inline is not None:
            with contextlib.suppress(sqlite3.Error):
                self._inline.close()
        with contextlib.suppress(RelayStoreError, sqlite3.Error):
            await self._call(self._db.close)
        self._thread.shutdown(wait=False)


def _commit_group(
    db: sqlite3.Connection,
    rows: list[tuple[str, str, bytes]],
    marks: list[tuple[str, str, int, str]],
) -> list[int]:
    """One group commit, in one transaction on ``db``: the updates, the documents'
    watermarks; the updates' seqs, in order."""
    db.execute("BEGIN IMMEDIATE")
    try:
        seqs = _insert_updates(db, rows)
        db.executemany(
            "INSERT INTO documents (user, doc_id, snapshot, changed_at, changed_by) "
            "VALUES (?, ?, x'', ?, ?) ON CONFLICT (user, doc_id) DO UPDATE SET "
            "changed_at = excluded.changed_at, changed_by = excluded.changed_by",
            marks,
        )
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return seqs


def _insert_updates(db: sqlite3.Connection, rows: list[tuple[str, str, bytes]]) -> list[int]:
    """The rows inserted in order; their seqs. One statement for all where SQLite has RETURNING
    (3.35)."""
    if not _RETURNING:
        return [
            db.execute("INSERT INTO updates (user, doc_id, data) VALUES (?, ?, ?)", row).lastrowid
            or 0
            for row in rows
        ]
    values = ", ".join(["(?, ?, ?)"] * len(rows))
    params = [field for row in rows for field in row]
    found = db.execute(
        f"INSERT INTO updates (user, doc_id, data) VALUES {values} RETURNING seq", params
    ).fetchall()
    # RETURNING's order is SQLite's to choose; the rows' seqs are not: one writer (BEGIN
    # IMMEDIATE) and AUTOINCREMENT number them in the order of the VALUES, one after another.
    return sorted(int(seq) for (seq,) in found)


def _load(db: sqlite3.Connection, user: str, doc_id: str) -> StoredDocument | None:
    """The document's row and its updates, read in one transaction: a compaction committed
    between the two reads would otherwise pair an old snapshot with a log it already trimmed."""
    db.execute("BEGIN")
    try:
        row = db.execute(
            "SELECT snapshot, changed_at, changed_by FROM documents WHERE user = ? AND doc_id = ?",
            (user, doc_id),
        ).fetchone()
        if row is None:
            return None
        rows = db.execute(
            "SELECT seq, data FROM updates WHERE user = ? AND doc_id = ? ORDER BY seq",
            (user, doc_id),
        ).fetchall()
    finally:
        db.execute("COMMIT")
    return StoredDocument(
        snapshot=bytes(row[0]),
        updates=[bytes(d) for _, d in rows],
        last_seq=max((int(s) for s, _ in rows), default=0),
        watermark=Watermark(row[1], row[2]),
    )


def _compact(
    db: sqlite3.Connection, user: str, doc_id: str, snapshot: bytes, up_to_seq: int
) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "UPDATE documents SET snapshot = ? WHERE user = ? AND doc_id = ?",
            (snapshot, user, doc_id),
        )
        db.execute(
            "DELETE FROM updates WHERE user = ? AND doc_id = ? AND seq <= ?",
            (user, doc_id, up_to_seq),
        )
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


class MemoryRelayStore:
    """An in-memory store for tests and demos: same contract, nothing survives a restart."""

    def __init__(self) -> None:
        self._docs: dict[tuple[str, str], tuple[bytes, Watermark]] = {}
        self._updates: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        self._seq = 0
        self._closed = False

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        if self._closed:
            raise RelayStoreError("the relay store is closed")
        self._seq += 1
        key = (user, doc_id)
        snapshot, _ = self._docs.get(key, (b"", Watermark(None, None)))
        self._docs[key] = (snapshot, Watermark(changed_at, changed_by))
        self._updates.setdefault(key, []).append((self._seq, update))
        return self._seq

    def _check_open(self) -> None:
        if self._closed:
            raise RelayStoreError("the relay store is closed")

    async def load(self, user: str, doc_id: str) -> StoredDocument | None:
        self._check_open()
        key = (user, doc_id)
        if key not in self._docs:
            return None
        snapshot, watermark = self._docs[key]
        rows = self._updates.get(key, [])
        return StoredDocument(
            snapshot, [d for _, d in rows], max((s for s, _ in rows), default=0), watermark
        )

    async def compact(self, user: str, doc_id: str, snapshot: bytes, up_to_seq: int) -> None:
        self._check_open()
        key = (user, doc_id)
        if key in self._docs:
            self._docs[key] = (snapshot, self._docs[key][1])
            self._updates[key] = [(s, d) for s, d in self._updates.get(key, []) if s > up_to_seq]

    async def documents(self, user: str) -> list[str]:
        self._check_open()
        return sorted(d for u, d in self._docs if u == user)

    async def ping(self) -> None:
        if self._closed:
            raise RelayStoreError("the relay store is closed")

    async def close(self) -> None:
        self._closed = True
