"""The replica's SQLite file: document snapshots, the update log and what the relay has not acked.

Tables (schema version 1, marked with ``PRAGMA user_version`` and our ``application_id`` so that a
file of another program is recognised and never written to):

- ``meta``: device id, pycrdt client id, the relay's address and token after a successful sync.
- ``documents``: one row per document: kind, name (so that listing needs no CRDT load), the
  compacted state and the last update seq it covers (``base_seq``), and sync bookkeeping (last
  confirmed in sync, the relay's watermark).
- ``quotes``: the last price of each symbol seen from the relay (not CRDT data: newest wins).
- ``updates``: every delta since the last compaction, local and remote, in order. ``pending``
  rows are local changes the relay has not acknowledged; ``changes`` counts the user edits a row
  holds (merged rows hold many). A local edit is ONE insert, committed before the edit returns.

Compaction writes the in-memory document as the new state and deletes the acknowledged rows it
covers; pending rows stay until the relay acks them (loading skips them: the state has them), and
long runs of them are merged into one row. The file is opened with an exclusive lock: two processes
writing as the same device would fork its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiosqlite

from foliosync._sqlite import connect as sqlite_connect
from foliosync.sync.errors import (
    ReplicaCorrupt,
    ReplicaError,
    ReplicaLocked,
    SchemaTooNew,
    StorageFull,
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "DocumentRow", "PendingUpdate", "ReplicaStore"]

APPLICATION_ID = 0x466F6C53  # "FolS"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    state BLOB NOT NULL,
    base_seq INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    last_synced_at INTEGER,
    remote_changed_at INTEGER,
    remote_changed_by TEXT
);
CREATE TABLE updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    data BLOB NOT NULL,
    pending INTEGER NOT NULL,
    changes INTEGER NOT NULL
);
CREATE INDEX updates_by_doc ON updates (doc_id, seq);
CREATE TABLE quotes (
    symbol TEXT PRIMARY KEY,
    price TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    previous_close TEXT
);
"""

# Upgrades, by the version they start from; each runs in the transaction that opens the file.
_MIGRATIONS: dict[int, list[str]] = {
    # 1 -> 2: the snapshot's covered seq (loading skips those rows), and the quotes table.
    1: [
        "ALTER TABLE documents ADD COLUMN base_seq INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE IF NOT EXISTS quotes (symbol TEXT PRIMARY KEY, price TEXT NOT NULL, "
        "time_ms INTEGER NOT NULL, seq INTEGER NOT NULL, previous_close TEXT)",
    ],
}

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DocumentRow:
    id: str
    kind: str
    name: str
    created_at: int
    last_synced_at: int | None
    remote_changed_at: int | None
    remote_changed_by: str | None


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    seq: int
    doc_id: str
    data: bytes
    changes: int


def _translate(exc: sqlite3.Error, path: Path) -> ReplicaError:
    """One place where sqlite3's errors become foliosync's."""
    message = str(exc).lower()
    if "locked" in message or "busy" in message:
        return ReplicaLocked(f"replica {path} is open in another process")
    if "full" in message:
        return StorageFull(
            f"the disk is full: no space left for replica {path}, so the change was not saved "
            "(reading still works)"
        )
    if "not a database" in message or "malformed" in message or "corrupt" in message:
        return ReplicaCorrupt(f"replica {path} is damaged or not a foliosync replica: {exc}")
    return ReplicaError(f"replica {path}: {exc}")


class ReplicaStore:
    """Async access to one replica file. Use :meth:`open`; all writes are committed on return."""

    def __init__(self, path: Path, conn: aiosqlite.Connection) -> None:
        self.path = path
        self._conn = conn
        # One operation at a time on the connection: a statement of one coroutine run while
        # another's transaction is open would join that transaction (an accepted edit could be
        # rolled back with it), and a second BEGIN would fail.
        self._lock = asyncio.Lock()

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, synchronous: str = "NORMAL"
    ) -> ReplicaStore:
        """Open or create a replica; never writes to a file that is not a foliosync replica.

        ``synchronous``: "NORMAL" (WAL default) keeps every committed edit through a crash of the
        app; "FULL" also through a power loss, at the cost of an fsync per edit.
        """
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ReplicaError(f"unknown synchronous mode {synchronous!r}")
        file = Path(path)
        if file.exists() and not file.is_file():
            raise ReplicaError(f"replica path {file} is not a file")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReplicaError(f"cannot create the folder of replica {file}: {exc}") from exc
        connecting = sqlite_connect(str(file), isolation_level=None, timeout=0.2)
        try:
            conn = await connecting
        except sqlite3.Error as exc:
            raise _translate(exc, file) from exc
        store = cls(file, conn)
        try:
            await store._prepare(synchronous.upper())
        except BaseException:
            await conn.close()
            raise
        return store

    async def _prepare(self, synchronous: str) -> None:
        try:
            # Exclusive locking before the first read: in WAL mode, a read in the default mode
            # maps the shared-memory index (the -shm file), which needs disk space, so that on a
            # full disk even listing failed with "disk I/O error". In exclusive mode SQLite keeps
            # that index in memory, and reading needs no space at all. The first write takes the
            # lock and keeps it until close.
            await self._conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            app_id = await self._scalar("PRAGMA application_id")
            version = await self._scalar("PRAGMA user_version")
            tables = await self._scalar("SELECT count(*) FROM sqlite_master")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise ReplicaCorrupt(f"{self.path} is not a foliosync replica; it was left untouched")
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"replica {self.path} has schema version {version}, newer than this foliosync "
                f"({SCHEMA_VERSION}); upgrade foliosync. The file was left untouched."
            )
        try:
            await self._conn.execute("PRAGMA journal_mode = WAL")
            await self._conn.execute(f"PRAGMA synchronous = {synchronous}")
            await self._conn.execute("BEGIN IMMEDIATE")
            if app_id == 0:
                await self._conn.executescript(
                    "BEGIN;" + _SCHEMA + f"PRAGMA application_id = {APPLICATION_ID};"
                    f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            else:
                await self._migrate(version)
                await self._conn.execute("COMMIT")
            await self._conn.execute("PRAGMA busy_timeout = 5000")
            if app_id != 0:
                await self._scalar("SELECT count(*) FROM documents")  # a damaged file fails here
        except sqlite3.Error as exc:
            error = _translate(exc, self.path)
            if app_id == 0 and isinstance(error, StorageFull):  # a new replica, not an edit
                error = StorageFull(
                    f"the disk is full: no space left to create replica {self.path}"
                )
            raise error from exc

    async def _migrate(self, version: int) -> None:
        """Bring a replica of an older schema up to date (inside the opening transaction)."""
        for start in range(version, SCHEMA_VERSION):
            for sql in _MIGRATIONS.get(start, []):
                if sql.startswith("ALTER TABLE documents ADD COLUMN base_seq"):
                    async with self._conn.execute("PRAGMA table_info(documents)") as cursor:
                        columns = [row[1] async for row in cursor]
                    if "base_seq" in columns:
                        continue
                await self._conn.execute(sql)
        if version < SCHEMA_VERSION:
            await self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def close(self) -> None:
        async with self._lock:  # never in the middle of another operation's transaction
            await self._conn.close()

    # -- helpers -----------------------------------------------------------------------------

    async def _scalar(self, sql: str, params: Iterable[object] = ()) -> int:
        async with self._conn.execute(sql, tuple(params)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def _guard(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one operation (a statement or a whole transaction) alone on the connection."""
        async with self._lock:
            try:
                return await operation()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc

    @contextlib.asynccontextmanager
    async def _atomic(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error.

        A failed ROLLBACK never replaces the error that caused it: SQLite may already have rolled
        back (a full disk at COMMIT), or the COMMIT ran anyway (aiosqlite finishes a call in its
        thread after the awaiting task was cancelled) and there is nothing to roll back.
        """
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            await self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("ROLLBACK")
            raise

    async def _transaction(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        async def run() -> None:
            async with self._atomic():
                for sql, params in statements:
                    await self._conn.execute(sql, params)

        await self._guard(run)

    # -- meta --------------------------------------------------------------------------------

    async def get_meta(self) -> dict[str, str]:
        async def run() -> dict[str, str]:
            async with self._conn.execute("SELECT key, value FROM meta") as cursor:
                return {str(k): str(v) async for k, v in cursor}

        return await self._guard(run)

    async def set_meta(self, values: dict[str, str]) -> None:
        await self._transaction(
            [
                ("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (k, v))
                for k, v in values.items()
            ]
        )

    # -- documents ---------------------------------------------------------------------------

    async def documents(self) -> list[DocumentRow]:
        async def run() -> list[DocumentRow]:
            sql = (
                "SELECT id, kind, name, created_at, last_synced_at, remote_changed_at, "
                "remote_changed_by FROM documents ORDER BY id"
            )
            async with self._conn.execute(sql) as cursor:
                return [DocumentRow(*row) async for row in cursor]

        return await self._guard(run)

    async def pending_counts(self) -> dict[str, int]:
        async def run() -> dict[str, int]:
            sql = "SELECT doc_id, SUM(changes) FROM updates WHERE pending = 1 GROUP BY doc_id"
            async with self._conn.execute(sql) as cursor:
                return {str(d): int(n) async for d, n in cursor}

        return await self._guard(run)

    async def create_document(
        self, row: DocumentRow, state: bytes, updates: list[tuple[str, bytes]]
    ) -> None:
        """Insert a document and its first local updates (doc id, data) in one transaction."""
        statements: list[tuple[str, tuple[object, ...]]] = [
            (
                "INSERT INTO documents (id, kind, name, state, created_at) VALUES (?, ?, ?, ?, ?)",
                (row.id, row.kind, row.name, state, row.created_at),
            )
        ]
        statements += [
            ("INSERT INTO updates (doc_id, data, pending, changes) VALUES (?, ?, 1, 1)", (d, u))
            for d, u in updates
        ]
        await self._transaction(statements)

    async def load(self, doc_id: str) -> tuple[bytes, list[bytes], int] | None:
        """(state, updates in order, highest seq) of a document, or None if there is none."""

        async def run() -> tuple[bytes, list[bytes], int] | None:
            async with self._conn.execute(
                "SELECT state, base_seq FROM documents WHERE id = ?", (doc_id,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                return None
            base_seq = int(row[1])
            async with self._conn.execute(
                "SELECT seq, data FROM updates WHERE doc_id = ? AND seq > ? ORDER BY seq",
                (doc_id, base_seq),
            ) as cursor:
                rows = [(int(s), bytes(d)) async for s, d in cursor]
            return bytes(row[0]), [d for _, d in rows], max((s for s, _ in rows), default=base_seq)

        return await self._guard(run)

    async def rename(self, doc_id: str, name: str) -> None:
        await self._guard(
            lambda: self._conn.execute("UPDATE documents SET name = ? WHERE id = ?", (name, doc_id))
        )

    # -- updates -----------------------------------------------------------------------------

    async def append(self, doc_id: str, data: bytes, *, pending: bool, changes: int = 1) -> int:
        """Append one update and commit it (a single statement: one durable transaction)."""

        async def run() -> int:
            cursor = await self._conn.execute(
                "INSERT INTO updates (doc_id, data, pending, changes) VALUES (?, ?, ?, ?)",
                (doc_id, data, int(pending), changes if pending else 0),
            )
            seq = cursor.lastrowid
            await cursor.close()
            assert seq is not None
            return seq

        return await self._guard(run)

    async def pending(self, doc_id: str | None = None) -> list[PendingUpdate]:
        async def run() -> list[PendingUpdate]:
            sql = "SELECT seq, doc_id, data, changes FROM updates WHERE pending = 1"
            params: tuple[object, ...] = ()
            if doc_id is not None:
                sql += " AND doc_id = ?"
                params = (doc_id,)
            async with self._conn.execute(sql + " ORDER BY seq", params) as cursor:
                return [
                    PendingUpdate(int(s), str(d), bytes(b), int(c)) async for s, d, b, c in cursor
                ]

        return await self._guard(run)

    async def acknowledge(self, doc_id: str, seq: int) -> None:
        """The relay stored every pending update of ``doc_id`` up to ``seq``."""
        await self._guard(
            lambda: self._conn.execute(
                "UPDATE updates SET pending = 0, changes = 0 "
                "WHERE doc_id = ? AND seq <= ? AND pending = 1",
                (doc_id, seq),
            )
        )

    async def compact(self, doc_id: str, state: bytes, up_to_seq: int) -> None:
        """Make ``state`` (which covers every update up to ``up_to_seq``) the document's base."""
        await self._transaction(
            [
                (
                    "UPDATE documents SET state = ?, base_seq = ? WHERE id = ?",
                    (state, up_to_seq, doc_id),
                ),
                (
                    "DELETE FROM updates WHERE doc_id = ? AND seq <= ? AND pending = 0",
                    (doc_id, up_to_seq),
                ),
            ]
        )

    async def replace_pending(self, doc_id: str, old: list[PendingUpdate], merged: bytes) -> int:
        """Swap pending rows for one merged row holding all their changes; returns its seq.

        The merged row takes the highest seq of the rows it replaces, so that acknowledging the
        seqs a sync connection read before the merge still settles them.
        """
        seq = max(p.seq for p in old)

        async def run() -> int:
            async with self._atomic():
                await self._conn.executemany(
                    "DELETE FROM updates WHERE seq = ? AND pending = 1", [(p.seq,) for p in old]
                )
                await self._conn.execute(
                    "INSERT INTO updates (seq, doc_id, data, pending, changes) "
                    "VALUES (?, ?, ?, 1, ?)",
                    (seq, doc_id, merged, sum(p.changes for p in old)),
                )
            return seq

        return await self._guard(run)

    async def update_sync_info(
        self,
        doc_id: str,
        *,
        last_synced_at: int | None = None,
        remote_changed_at: int | None = None,
        remote_changed_by: str | None = None,
    ) -> None:
        sets, params = [], []
        for column, value in (
            ("last_synced_at", last_synced_at),
            ("remote_changed_at", remote_changed_at),
            ("remote_changed_by", remote_changed_by),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        if sets:
            await self._guard(
                lambda: self._conn.execute(
                    f"UPDATE documents SET {', '.join(sets)} WHERE id = ?", (*params, doc_id)
                )
            )

    # -- quotes ------------------------------------------------------------------------------

    async def load_quotes(self) -> list[tuple[str, str, int, int, str | None]]:
        async def run() -> list[tuple[str, str, int, int, str | None]]:
            sql = "SELECT symbol, price, time_ms, seq, previous_close FROM quotes"
            async with self._conn.execute(sql) as cursor:
                return [(str(a), str(b), int(c), int(d), e) async for a, b, c, d, e in cursor]

        return await self._guard(run)

    async def save_quotes(self, rows: list[tuple[str, str, int, int, str | None]]) -> None:
        async def run() -> None:
            async with self._atomic():
                await self._conn.executemany(
                    "INSERT OR REPLACE INTO quotes (symbol, price, time_ms, seq, previous_close) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )

        await self._guard(run)

    async def set_size_limit(self, max_pages: int) -> None:
        """Cap the file at ``max_pages`` pages (used to exercise the disk-full path)."""
        await self._guard(lambda: self._conn.execute(f"PRAGMA max_page_count = {int(max_pages)}"))
