"""The replica's SQLite file: document snapshots, the update log and what the relay has not acked.

Tables (schema version 3, marked with ``PRAGMA user_version`` and our ``application_id`` so that a
file of another program is recognised and never written to):

- ``meta``: device id, the relay's address and token after a successful sync (a replica made
  before several processes could share it also holds the pycrdt client id then used by every
  document; nothing reads it now: see the replica module on client ids).
- ``documents``: one row per document: kind, name (so that listing needs no CRDT load), the
  compacted state and the last update seq it covers (``base_seq``), the *confirmed* state (below),
  the ``epoch`` (bumped by a rollback), and sync bookkeeping (last confirmed in sync, the relay's
  watermark).
- ``quotes``: the last price of each symbol seen from the relay (not CRDT data: newest wins).
- ``updates``: every delta since the last compaction, local and remote, in order. ``pending``
  rows are local changes the relay has not acknowledged; ``changes`` counts the user edits a row
  holds (merged rows hold many). A local edit is ONE insert, committed before the edit returns.
- ``refusals``: the last ``KEEP_REFUSALS`` changes the relay refused for good and the device rolled
  back (see :meth:`ReplicaStore.refuse`).

The confirmed state and rollbacks
---------------------------------
``documents.confirmed`` folds every *settled* row compaction deleted (or is the integer 0: the
same as ``state``, when nothing pending was folded into that) (remote updates, and local
rows the relay acknowledged), and nothing pending: the document as the relay has it is that state
plus the settled rows still in the log. A rollback of pending row N rebuilds the document from it
and the other pending rows, in one transaction that writes the new state and confirmed state,
replaces the rows that could not stand without N, records the refusal and bumps the epoch. A
process that sees the epoch move *replaces* its copy of the document instead of merging the new
state (a CRDT merge would bring the refused change back), and a local edit is committed only if
the epoch its document was read at is still the file's (else it is re-made on the new document).

A replica made before schema 3 has no confirmed state (NULL). Its snapshot holds only settled
content when no pending row lies at or below ``base_seq`` (pending rows are never deleted, so
none was folded): then the snapshot is the confirmed state. Otherwise it is unknown until
compaction finds no pending row left; a rollback meanwhile of a row newer than the snapshot uses
the snapshot (the older pending rows it holds stay anyway), and of a row folded into it starts
from the settled rows alone: the relay's next SyncReply brings back the rest (module
``foliosync.client.replica``, :meth:`Replica.refuse`).

Compaction writes the in-memory document as the new state and deletes the acknowledged rows it
covers; pending rows stay until the relay acks them (loading skips them: the state has them), and
long runs of them are merged into one row.

Several processes at once
-------------------------
Any number of processes (and connections of one process) may open the file together: SQLite's
WAL mode lets them read while one writes, and every write is one short transaction (a statement,
or ``BEGIN IMMEDIATE`` ... ``COMMIT``) that waits up to ``BUSY_TIMEOUT_MS`` for another's to end.
What keeps them consistent:

- **The log's order is the commit order.** ``seq`` is taken inside the writing transaction, and
  writing transactions are serialized, so a process that has read every row up to N has seen
  every change committed before row N+1. :meth:`ReplicaStore.changes_since` reads, in one read
  transaction (one snapshot), the rows after a seq, the document rows, pending counts, meta and
  quotes; ``PRAGMA data_version`` (:meth:`ReplicaStore.data_changed`) says cheaply, without
  reading a table, whether another connection committed anything since it was last asked.
- **Compaction never hides a row from a reader.** It runs in one ``BEGIN IMMEDIATE``
  transaction that first hands the compacting process every row it has not seen (so the state it
  writes holds every committed change), then writes the state and deletes rows. A reader learns of
  it by the document's ``base_seq``: if that passed the last seq it read, rows it never saw may be
  gone, so it merges the new state (a CRDT merge: what it has already stays, nothing doubles).
  Loading reads the state and the rows after it in one snapshot.
- **Quotes**, written by every process that follows prices, are upserted newest-wins in SQL: an
  older price of one process never overwrites a newer one of another.
- **Schema changes need the file alone**: a process of an older schema may have it open, so a
  migration takes SQLite's exclusive lock for its transaction and, if another process holds the
  file, fails with ReplicaLocked naming the reason. Creating a new replica re-checks, under the
  write lock, that no other process created it meanwhile.

A full disk: in WAL mode a read maps the shared-memory index (the ``-shm`` file), which the first
connection to open the file must create and size. On a full disk that fails ("disk I/O error",
``SQLITE_IOERR_SHMOPEN``), so listing would fail too. Only then the store reopens the file in
exclusive locking mode, where SQLite keeps that index in memory and reading needs no space: that
process then has the file to itself (another opening it gets ReplicaLocked) until it closes. When
another process already has the file open, its ``-shm`` exists and reading works in the normal
mode, shared, full disk or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiosqlite

from foliosync._sqlite import connect as sqlite_connect
from foliosync.sync.errors import (
    DocumentExists,
    ReplicaCorrupt,
    ReplicaError,
    ReplicaLocked,
    SchemaTooNew,
    StorageFull,
)

__all__ = [
    "APPLICATION_ID",
    "BUSY_TIMEOUT_MS",
    "KEEP_REFUSALS",
    "SCHEMA_VERSION",
    "DocumentLog",
    "DocumentRow",
    "LogRow",
    "PendingUpdate",
    "RebuiltDocument",
    "RefusalPlan",
    "RefusalRow",
    "ReplicaStore",
    "StoreChanges",
]

APPLICATION_ID = 0x466F6C53  # "FolS"
SCHEMA_VERSION = 3
# ``documents.confirmed`` holding this integer instead of a state: the same as ``state`` (nothing
# pending was folded into it), which spares the file a second copy of every settled document.
_SAME_AS_STATE = 0
# How many refusals the file keeps (the newest).
KEEP_REFUSALS = 100
# How long a write waits for another connection's write transaction (they last milliseconds).
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    state BLOB NOT NULL,
    base_seq INTEGER NOT NULL DEFAULT 0,
    confirmed BLOB,
    epoch INTEGER NOT NULL DEFAULT 0,
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
CREATE TABLE refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    changes INTEGER NOT NULL,
    summary TEXT NOT NULL,
    rebased TEXT NOT NULL
)
"""

_REFUSALS_TABLE = (
    "CREATE TABLE IF NOT EXISTS refusals (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "doc_id TEXT NOT NULL, seq INTEGER NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL, "
    "at_ms INTEGER NOT NULL, changes INTEGER NOT NULL, summary TEXT NOT NULL, "
    "rebased TEXT NOT NULL)"
)

# Upgrades, by the version they start from; each runs in the transaction that opens the file.
_MIGRATIONS: dict[int, list[str]] = {
    # 1 -> 2: the snapshot's covered seq (loading skips those rows), and the quotes table.
    1: [
        "ALTER TABLE documents ADD COLUMN base_seq INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE IF NOT EXISTS quotes (symbol TEXT PRIMARY KEY, price TEXT NOT NULL, "
        "time_ms INTEGER NOT NULL, seq INTEGER NOT NULL, previous_close TEXT)",
    ],
    # 2 -> 3: the confirmed state (NULL: unknown, see the module docstring), the epoch that a
    # rollback bumps, and the refusals.
    2: [
        "ALTER TABLE documents ADD COLUMN confirmed BLOB",
        "ALTER TABLE documents ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        _REFUSALS_TABLE,
    ],
}

_DOCUMENT_COLUMNS = (
    "id, kind, name, created_at, last_synced_at, remote_changed_at, remote_changed_by"
)

T = TypeVar("T")
QuoteRow = tuple[str, str, int, int, str | None]


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


@dataclass(frozen=True, slots=True)
class LogRow:
    """One row of the update log, as another process committed it."""

    seq: int
    doc_id: str
    data: bytes
    pending: bool


@dataclass(frozen=True, slots=True)
class RefusalRow:
    """One change the relay refused for good, as the file keeps it (newest id last)."""

    id: int
    doc_id: str
    seq: int
    code: str
    message: str
    at_ms: int
    changes: int
    summary: str
    rebased: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RebuiltDocument:
    """A document rolled back since the caller read it: its copy must be replaced with this
    (state, then the rows after ``base_seq``), not merged with it."""

    state: bytes
    rows: list[bytes]
    base_seq: int
    max_seq: int
    epoch: int


@dataclass(frozen=True, slots=True)
class DocumentLog:
    """What a rollback rebuilds a document from, read inside its write transaction."""

    kind: str
    name: str
    state: bytes
    base_seq: int
    confirmed: bytes | None  # None: not known (a replica older than schema 3, see above)
    settled: list[bytes]  # the settled rows still in the log, in order
    pending: list[PendingUpdate]  # in seq order


@dataclass(frozen=True, slots=True)
class RefusalPlan:
    """The rolled-back document, as the caller computed it from a :class:`DocumentLog`."""

    state: bytes
    confirmed: bytes | None
    replaced: list[int]  # pending seqs (besides the refused one) re-made as ``rebased``
    rebased: list[tuple[bytes, int]]  # (update, changes) of the new pending rows, in order
    summary: str
    changes: int
    drop: bool = False
    """Nothing is left of the document, on the relay or pending: its row and log go too."""


@dataclass(frozen=True, slots=True)
class StoreChanges:
    """What the file holds beyond a seq, read in one snapshot (see :meth:`changes_since`)."""

    rows: list[LogRow]  # in seq order
    documents: list[DocumentRow]
    bases: dict[str, int]  # document -> base_seq
    states: dict[str, bytes]  # compacted past the seq given: merge these first
    pending: dict[str, int]  # document -> pending changes
    meta: dict[str, str]
    quotes: list[QuoteRow]
    pending_rows: list[PendingUpdate]  # of the document asked for, if any
    rebuilt: dict[str, RebuiltDocument]  # rolled back past the epoch given: replace these
    refusals: list[RefusalRow]  # recorded after the refusal id given, oldest first


def _translate(exc: sqlite3.Error, path: Path) -> ReplicaError:
    """One place where sqlite3's errors become foliosync's."""
    message = str(exc).lower()
    if "locked" in message or "busy" in message:
        return ReplicaLocked(
            f"replica {path} is busy: another process held its write lock for more than "
            f"{BUSY_TIMEOUT_MS / 1000:g} s"
        )
    if "full" in message:
        return StorageFull(
            f"the disk is full: no space left for replica {path}, so the change was not saved "
            "(reading still works)"
        )
    if "not a database" in message or "malformed" in message or "corrupt" in message:
        return ReplicaCorrupt(f"replica {path} is damaged or not a foliosync replica: {exc}")
    return ReplicaError(f"replica {path}: {exc}")


def _no_space(exc: sqlite3.Error) -> bool:
    """Whether a first read failed because the shared-memory index could not get disk space."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL)
    return "disk i/o error" in str(exc).lower() or "full" in str(exc).lower()


class ReplicaStore:
    """Async access to one replica file. Use :meth:`open`; all writes are committed on return."""

    def __init__(self, path: Path, conn: aiosqlite.Connection) -> None:
        self.path = path
        self._conn = conn
        # One operation at a time on the connection: a statement of one coroutine run while
        # another's transaction is open would join that transaction (an accepted edit could be
        # rolled back with it), and a second BEGIN would fail.
        self._lock = asyncio.Lock()
        self._data_version = 0
        self.exclusive = False
        """True when opened in exclusive mode (a full disk): no other process can open it."""

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
        store = await cls._connect(file)
        try:
            await store._prepare(synchronous.upper())
        except BaseException:
            await store._conn.close()
            raise
        return store

    @classmethod
    async def _connect(cls, file: Path, *, exclusive: bool = False) -> ReplicaStore:
        timeout = 0.2 if exclusive else BUSY_TIMEOUT_MS / 1000
        try:
            conn = await sqlite_connect(str(file), isolation_level=None, timeout=timeout)
        except sqlite3.Error as exc:
            raise _translate(exc, file) from exc
        store = cls(file, conn)
        store.exclusive = exclusive
        return store

    async def _first_read(self) -> tuple[int, int, int]:
        if self.exclusive:
            await self._conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        # One statement, so one read snapshot: three could see the id before another process's
        # creation committed and its tables after, and take a replica being made for a foreign
        # file.
        async with self._conn.execute(
            "SELECT (SELECT application_id FROM pragma_application_id()),"
            " (SELECT user_version FROM pragma_user_version()),"
            " (SELECT count(*) FROM sqlite_master)"
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    async def _reopen(self, *, exclusive: bool) -> None:
        await self._conn.close()
        other = await self._connect(self.path, exclusive=exclusive)
        self._conn, self.exclusive = other._conn, exclusive

    async def _prepare(self, synchronous: str) -> None:
        try:
            try:
                app_id, version, tables = await self._first_read()
            except sqlite3.Error as exc:
                if "locked" in str(exc).lower():
                    raise ReplicaLocked(
                        f"replica {self.path} is held by another process that opened it alone "
                        "(on a full disk, or to upgrade its schema); try again once it closed it"
                    ) from exc
                if not _no_space(exc):
                    raise
                # A full disk, and no other process has the file open (else its -shm would
                # exist): keep the index in memory, which needs no space (module docstring).
                await self._reopen(exclusive=True)
                try:
                    app_id, version, tables = await self._first_read()
                except sqlite3.Error as again:
                    if "locked" in str(again).lower():
                        raise ReplicaLocked(
                            f"replica {self.path} cannot be read: the disk is full and another "
                            "process is opening it"
                        ) from again
                    raise
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        self._check_kind(app_id, version, tables)
        try:
            await self._conn.execute("PRAGMA journal_mode = WAL")
            await self._conn.execute(f"PRAGMA synchronous = {synchronous}")
            if app_id == 0:
                await self._create_schema()
            elif version < SCHEMA_VERSION:
                await self._migrate_alone(synchronous)
            await self._scalar("SELECT count(*) FROM documents")  # a damaged file fails here
            self._data_version = await self._scalar("PRAGMA data_version")
        except sqlite3.Error as exc:
            error = _translate(exc, self.path)
            if app_id == 0 and isinstance(error, StorageFull):  # a new replica, not an edit
                error = StorageFull(
                    f"the disk is full: no space left to create replica {self.path}"
                )
            raise error from exc

    def _check_kind(self, app_id: int, version: int, tables: int) -> None:
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise ReplicaCorrupt(f"{self.path} is not a foliosync replica; it was left untouched")
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"replica {self.path} has schema version {version}, newer than this foliosync "
                f"({SCHEMA_VERSION}); upgrade foliosync. The file was left untouched."
            )

    async def _create_schema(self) -> None:
        """Create the tables, unless another process created them since we looked."""
        async with self._atomic():
            app_id = await self._scalar("PRAGMA application_id")
            tables = await self._scalar("SELECT count(*) FROM sqlite_master")
            if app_id == 0 and not tables:
                for sql in _SCHEMA.split(";"):
                    await self._conn.execute(sql)
                await self._conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                await self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        app_id, version, tables = await self._first_read()
        self._check_kind(app_id, version, tables)

    async def _migrate_alone(self, synchronous: str) -> None:
        """Upgrade the schema with the file to ourselves, then reopen it shared."""
        exclusive = self.exclusive
        await self._reopen(exclusive=True)
        try:
            await self._conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            try:
                await self._conn.execute("BEGIN EXCLUSIVE")
            except sqlite3.Error as exc:
                if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
                    raise
                raise ReplicaLocked(
                    f"replica {self.path} needs an upgrade of its schema, which needs it closed "
                    "in every other process; close them and open it again"
                ) from exc
            try:
                version = await self._scalar("PRAGMA user_version")
                await self._migrate(version)
                await self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
                raise
        finally:
            if not exclusive:
                await self._reopen(exclusive=False)
                await self._conn.execute(f"PRAGMA synchronous = {synchronous}")

    async def _migrate(self, version: int) -> None:
        """Bring a replica of an older schema up to date (inside an exclusive transaction)."""
        for start in range(version, SCHEMA_VERSION):
            for sql in _MIGRATIONS.get(start, []):
                added = re.match(r"ALTER TABLE documents ADD COLUMN (\w+)", sql)
                if added is not None:
                    async with self._conn.execute("PRAGMA table_info(documents)") as cursor:
                        columns = [row[1] async for row in cursor]
                    if added.group(1) in columns:
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
        # BEGIN inside the try: a task cancelled while awaiting it leaves the BEGIN running in
        # aiosqlite's thread, and without the ROLLBACK the connection stayed in a transaction
        # that the next operation's BEGIN refused ("cannot start a transaction within a
        # transaction") and whose statements it would otherwise have joined.
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
            yield
            await self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("ROLLBACK")
            raise

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[None]:
        """BEGIN ... COMMIT around reads: one snapshot, whatever other processes commit."""
        try:
            await self._conn.execute("BEGIN")  # inside the try, as in _atomic
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("COMMIT")

    async def _transaction(self, statements: list[tuple[str, tuple[object, ...]]]) -> None:
        async def run() -> None:
            async with self._atomic():
                for sql, params in statements:
                    await self._conn.execute(sql, params)

        await self._guard(run)

    # -- other processes ---------------------------------------------------------------------

    async def data_changed(self) -> bool:
        """Whether another connection (another process, say) committed since the last call.

        ``PRAGMA data_version`` reads a counter in the shared-memory index: no table, no disk, a
        few microseconds, so it can be asked many times a second.
        """

        async def run() -> bool:
            version = await self._scalar("PRAGMA data_version")
            changed, self._data_version = version != self._data_version, version
            return changed

        return await self._guard(run)

    def forget_data_version(self) -> None:
        """Make the next :meth:`data_changed` answer True: a catch-up it announced failed, and
        the changes it would have read are still unread (the counter alone would not say so)."""
        self._data_version = -1  # PRAGMA data_version is never negative

    async def changes_since(
        self,
        seq: int,
        loaded_bases: dict[str, int],
        *,
        before: int | None = None,
        pending_of: str | None = None,
        loaded_epochs: dict[str, int] | None = None,
        refusals_after: int | None = None,
    ) -> StoreChanges:
        """Everything another process may have changed, read in one snapshot.

        ``rows`` are the log rows after ``seq`` (and before ``before``, if given); ``states`` the
        snapshot of each document of ``loaded_bases`` (document -> the base_seq the caller
        knows) that was compacted past ``seq``, which may have folded rows the caller never saw.
        ``pending_rows`` are the pending rows of ``pending_of``, from the same snapshot.
        ``rebuilt`` holds each document of ``loaded_epochs`` (document -> the epoch the caller
        read) that was rolled back since, and ``refusals`` the refusals after that id.
        """

        async def run() -> StoreChanges:
            async with self._read():
                return await self._changes(
                    seq, loaded_bases, before, pending_of, loaded_epochs, refusals_after
                )

        return await self._guard(run)

    async def _changes(
        self,
        seq: int,
        loaded_bases: dict[str, int],
        before: int | None,
        pending_of: str | None,
        loaded_epochs: dict[str, int] | None = None,
        refusals_after: int | None = None,
    ) -> StoreChanges:
        sql = "SELECT seq, doc_id, data, pending FROM updates WHERE seq > ?"
        params: tuple[object, ...] = (seq,)
        if before is not None:
            sql += " AND seq < ?"
            params = (seq, before)
        async with self._conn.execute(sql + " ORDER BY seq", params) as cursor:
            rows = [LogRow(int(s), str(d), bytes(b), bool(p)) async for s, d, b, p in cursor]
        async with self._conn.execute("SELECT id, base_seq, epoch FROM documents") as cursor:
            found = [(str(d), int(b), int(e)) async for d, b, e in cursor]
        bases = {d: b for d, b, _ in found}
        epochs = {d: e for d, _, e in found}
        rebuilt: dict[str, RebuiltDocument] = {}
        for doc_id, known in (loaded_epochs or {}).items():
            if epochs.get(doc_id, known) != known:
                stored = await self._load(doc_id)
                if stored is not None:
                    state, updates, top, base, epoch = stored
                    rebuilt[doc_id] = RebuiltDocument(state, updates, base, top, epoch)
        states: dict[str, bytes] = {}
        for doc_id, known in loaded_bases.items():
            base = bases.get(doc_id, known)
            if base != known and base > seq and doc_id not in rebuilt:
                async with self._conn.execute(
                    "SELECT state FROM documents WHERE id = ?", (doc_id,)
                ) as cursor:
                    row = await cursor.fetchone()
                if row is not None:
                    states[doc_id] = bytes(row[0])
        async with self._conn.execute("SELECT key, value FROM meta") as cursor:
            meta = {str(k): str(v) async for k, v in cursor}
        pending_rows = await self._pending_rows(pending_of) if pending_of is not None else []
        refusals = [] if refusals_after is None else await self._refusals(after=refusals_after)
        return StoreChanges(
            rows=rows,
            documents=await self._documents(),
            bases=bases,
            states=states,
            pending=await self._pending_counts(),
            meta=meta,
            quotes=await self._load_quotes(),
            pending_rows=pending_rows,
            rebuilt=rebuilt,
            refusals=refusals,
        )

    # -- meta --------------------------------------------------------------------------------

    async def get_meta(self) -> dict[str, str]:
        async def run() -> dict[str, str]:
            async with self._conn.execute("SELECT key, value FROM meta") as cursor:
                return {str(k): str(v) async for k, v in cursor}

        return await self._guard(run)

    async def set_meta_if_absent(self, values: dict[str, str]) -> None:
        """Set the keys not set yet (two processes creating one replica agree on the first)."""
        await self._transaction(
            [
                ("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (k, v))
                for k, v in values.items()
            ]
        )

    async def last_seq(self) -> int:
        """The highest seq the log has used (rows up to it may since be compacted away)."""
        return await self._guard(
            lambda: self._scalar("SELECT seq FROM sqlite_sequence WHERE name = 'updates'")
        )

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
            return await self._documents()

        return await self._guard(run)

    async def _documents(self) -> list[DocumentRow]:
        sql = f"SELECT {_DOCUMENT_COLUMNS} FROM documents ORDER BY id"
        async with self._conn.execute(sql) as cursor:
            return [DocumentRow(*row) async for row in cursor]

    async def pending_counts(self) -> dict[str, int]:
        return await self._guard(self._pending_counts)

    async def _pending_counts(self) -> dict[str, int]:
        sql = "SELECT doc_id, SUM(changes) FROM updates WHERE pending = 1 GROUP BY doc_id"
        async with self._conn.execute(sql) as cursor:
            return {str(d): int(n) async for d, n in cursor}

    async def create_document(
        self,
        row: DocumentRow,
        state: bytes,
        updates: list[tuple[str, bytes]],
        *,
        if_absent: bool = False,
        epochs: dict[str, int] | None = None,
    ) -> list[int] | None:
        """Insert a document and its first local updates (doc id, data) in one transaction;
        returns the updates' seqs.

        DocumentExists if another process inserted it since this one listed the documents;
        ``if_absent``: then do nothing instead (an empty row, the same wherever it was made).
        ``epochs``: the epochs the other documents updated were read at; None, and nothing
        written, if one of them was rolled back since (the edit must be made again on it).
        """

        async def run() -> list[int] | None:
            seqs = []
            async with self._atomic():
                for doc_id, epoch in (epochs or {}).items():
                    now = await self._scalar("SELECT epoch FROM documents WHERE id = ?", (doc_id,))
                    if now != epoch:
                        return None
                try:
                    await self._conn.execute(  # the state given holds nothing pending
                        f"INSERT {'OR IGNORE ' if if_absent else ''}INTO documents "
                        "(id, kind, name, state, confirmed, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (row.id, row.kind, row.name, state, state, row.created_at),
                    )
                except sqlite3.IntegrityError as exc:
                    raise DocumentExists(
                        f"a {row.kind} named {row.name!r} exists already (made by another "
                        "process on this replica)"
                    ) from exc
                for doc_id, data in updates:
                    cursor = await self._conn.execute(
                        "INSERT INTO updates (doc_id, data, pending, changes) VALUES (?, ?, 1, 1)",
                        (doc_id, data),
                    )
                    assert cursor.lastrowid is not None
                    seqs.append(cursor.lastrowid)
                    await cursor.close()
            return seqs

        return await self._guard(run)

    async def load(self, doc_id: str) -> tuple[bytes, list[bytes], int, int, int] | None:
        """(state, updates in order, highest seq, base seq, epoch) of a document, or None if there
        is none; read in one snapshot, so that another process's compaction cannot fall between."""

        async def run() -> tuple[bytes, list[bytes], int, int, int] | None:
            async with self._read():
                return await self._load(doc_id)

        return await self._guard(run)

    async def _load(self, doc_id: str) -> tuple[bytes, list[bytes], int, int, int] | None:
        async with self._conn.execute(
            "SELECT state, base_seq, epoch FROM documents WHERE id = ?", (doc_id,)
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
        top = max((s for s, _ in rows), default=base_seq)
        return bytes(row[0]), [d for _, d in rows], top, base_seq, int(row[2])

    async def rename(self, doc_id: str, name: str) -> None:
        await self._guard(
            lambda: self._conn.execute("UPDATE documents SET name = ? WHERE id = ?", (name, doc_id))
        )

    async def drop_if_empty(self, doc_id: str) -> bool:
        """Delete a document's row if it holds nothing at all (an empty state, no row in the
        log: neither content nor a pending change, of any process); whether it did."""

        async def run() -> bool:
            cursor = await self._conn.execute(
                "DELETE FROM documents WHERE id = ? AND length(state) <= 2 "
                "AND NOT EXISTS (SELECT 1 FROM updates WHERE doc_id = ?)",
                (doc_id, doc_id),
            )
            dropped = cursor.rowcount == 1
            await cursor.close()
            return dropped

        return await self._guard(run)

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
        return await self._guard(lambda: self._pending_rows(doc_id))

    async def pending_changes(self, doc_id: str) -> int:
        """How many edits the document's pending rows hold, without reading their bytes: an
        Ack's recount, which must not cost as much as reading every row when thousands wait."""
        return await self._guard(
            lambda: self._scalar(
                "SELECT sum(changes) FROM updates WHERE doc_id = ? AND pending = 1", (doc_id,)
            )
        )

    async def _pending_rows(self, doc_id: str | None) -> list[PendingUpdate]:
        sql = "SELECT seq, doc_id, data, changes FROM updates WHERE pending = 1"
        params: tuple[object, ...] = ()
        if doc_id is not None:
            sql += " AND doc_id = ?"
            params = (doc_id,)
        async with self._conn.execute(sql + " ORDER BY seq", params) as cursor:
            return [PendingUpdate(int(s), str(d), bytes(b), int(c)) async for s, d, b, c in cursor]

    async def append_local(self, doc_id: str, data: bytes, epoch: int) -> int | None:
        """Append one local edit made on the document as of ``epoch``, and commit it; None (and
        nothing written) if the document was rolled back since: the edit must be re-made on it."""

        async def run() -> int | None:
            cursor = await self._conn.execute(
                "INSERT INTO updates (doc_id, data, pending, changes) SELECT ?, ?, 1, 1 "
                "WHERE (SELECT epoch FROM documents WHERE id = ?) = ?",
                (doc_id, data, doc_id, epoch),
            )
            seq = cursor.lastrowid if cursor.rowcount == 1 else None
            await cursor.close()
            return seq

        return await self._guard(run)

    async def acknowledge(self, doc_id: str, seq: int, keep: Iterable[int] = ()) -> None:
        """The relay stored every pending update of ``doc_id`` up to ``seq`` but those of
        ``keep`` (it answered them with an error that leaves them pending)."""
        kept = sorted({int(k) for k in keep})
        sql = (
            "UPDATE updates SET pending = 0, changes = 0 "
            "WHERE doc_id = ? AND seq <= ? AND pending = 1"
        )
        if kept:
            sql += f" AND seq NOT IN ({', '.join('?' * len(kept))})"
        await self._guard(lambda: self._conn.execute(sql, (doc_id, seq, *kept)))

    async def compact(
        self,
        doc_id: str,
        seen_seq: int,
        loaded_bases: dict[str, int],
        fold: Callable[[StoreChanges], bytes],
        *,
        merge: Callable[[list[bytes]], bytes] | None = None,
        merge_after: int = 0,
        settle: Callable[[bytes, list[bytes]], bytes] | None = None,
        loaded_epochs: dict[str, int] | None = None,
        refusals_after: int | None = None,
    ) -> int:
        """Make the document's full state its new base, in one exclusive write transaction.

        ``fold`` receives what other processes committed since ``seen_seq`` (as
        :meth:`changes_since`), must apply it to the caller's document, and returns the
        document's whole state: with the write lock held, nothing can be committed between
        reading those rows and writing the state, so the state covers every row up to the
        document's highest seq, and the rows it covers can go. If more than ``merge_after``
        pending rows remain, ``merge`` folds them into one row, which takes the highest seq of
        those it replaces so that acknowledging the seqs a sync connection sent still settles it.
        Returns the new base seq.

        ``settle`` folds settled rows into a confirmed state (state, rows -> state): the settled
        rows deleted here are folded into the confirmed state first (module docstring).

        The merge is computed before the write transaction (it may take a while, and every other
        process waits for the write lock meanwhile): inside, the pending rows are replaced only
        if they are still exactly those merged; if any came or went since, the merge waits for
        the next compaction.
        """
        merged: tuple[list[int], bytes] | None = None
        if merge is not None:
            before = await self._guard(lambda: self._pending_rows(doc_id))
            if len(before) > merge_after:
                merged = ([p.seq for p in before], merge([p.data for p in before]))

        async def run() -> int:
            async with self._atomic():
                changes = await self._changes(
                    seen_seq, loaded_bases, None, None, loaded_epochs, refusals_after
                )
                state = fold(changes)
                up_to = await self._scalar(
                    "SELECT max(seq) FROM updates WHERE doc_id = ?", (doc_id,)
                )
                up_to = max(up_to, loaded_bases.get(doc_id, 0))
                confirmed = await self._confirmed(doc_id)
                settled = await self._settled_rows(doc_id, up_to)
                await self._conn.execute(
                    "DELETE FROM updates WHERE doc_id = ? AND seq <= ? AND pending = 0",
                    (doc_id, up_to),
                )
                pending = await self._pending_rows(doc_id)
                stored: bytes | int | None = confirmed
                if not pending:
                    stored = _SAME_AS_STATE  # nothing pending: the state is all settled
                elif confirmed is not None and settled:
                    stored = settle(confirmed, settled) if settle is not None else None
                await self._conn.execute(
                    "UPDATE documents SET state = ?, base_seq = ?, confirmed = ? WHERE id = ?",
                    (state, up_to, stored, doc_id),
                )
                if merged is not None and [p.seq for p in pending] == merged[0]:
                    await self._conn.executemany(
                        "DELETE FROM updates WHERE seq = ?", [(p.seq,) for p in pending]
                    )
                    await self._conn.execute(
                        "INSERT INTO updates (seq, doc_id, data, pending, changes) "
                        "VALUES (?, ?, ?, 1, ?)",
                        (
                            max(p.seq for p in pending),
                            doc_id,
                            merged[1],
                            sum(p.changes for p in pending),
                        ),
                    )
            return up_to

        return await self._guard(run)

    async def _settled_rows(self, doc_id: str, up_to: int | None = None) -> list[bytes]:
        sql = "SELECT data FROM updates WHERE doc_id = ? AND pending = 0"
        params: tuple[object, ...] = (doc_id,)
        if up_to is not None:
            sql += " AND seq <= ?"
            params = (doc_id, up_to)
        async with self._conn.execute(sql + " ORDER BY seq", params) as cursor:
            return [bytes(d) async for (d,) in cursor]

    async def _confirmed(self, doc_id: str) -> bytes | None:
        """The confirmed state of a document, or None if it is not known (module docstring)."""
        async with self._conn.execute(
            "SELECT confirmed, state, base_seq FROM documents WHERE id = ?", (doc_id,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        if row[0] == _SAME_AS_STATE:
            return bytes(row[1])
        if row[0] is not None:
            return bytes(row[0])
        # Made before schema 3: the snapshot is settled if it folded no row still pending.
        folded = await self._scalar(
            "SELECT count(*) FROM updates WHERE doc_id = ? AND pending = 1 AND seq <= ?",
            (doc_id, int(row[2])),
        )
        return bytes(row[1]) if folded == 0 else None

    # -- rollback ----------------------------------------------------------------------------

    async def confirmed_log(self, doc_id: str) -> tuple[bytes | None, list[bytes]]:
        """(the confirmed state or None if unknown, the settled rows after it), one snapshot:
        what the relay has of the document, as far as this device knows."""

        async def run() -> tuple[bytes | None, list[bytes]]:
            async with self._read():
                return await self._confirmed(doc_id), await self._settled_rows(doc_id)

        return await self._guard(run)

    async def refuse(
        self,
        doc_id: str,
        seq: int,
        plan: Callable[[StoreChanges, DocumentLog], RefusalPlan],
        *,
        seen_seq: int,
        loaded_bases: dict[str, int],
        loaded_epochs: dict[str, int],
        refusals_after: int,
        code: str,
        message: str,
        at_ms: int,
    ) -> tuple[RefusalRow, int, int] | None:
        """Roll back pending row ``seq`` of ``doc_id`` in one write transaction; None if there is
        no such pending row (acknowledged, rolled back or re-made already).

        ``plan`` receives what other processes committed since ``seen_seq`` (as
        :meth:`changes_since`, to apply first, as :meth:`compact`'s ``fold``) and the document's
        log, and returns the rolled-back document. Written together: its state (the new base,
        covering every row of the document), its confirmed state, the new pending rows in place
        of those it re-made, the refusal, and the epoch bumped. Returns (the refusal, the new base
        seq, the new epoch). A plan that drops the document (:attr:`RefusalPlan.drop`, checked
        here again: nothing may be left pending) deletes its row and log instead, and the epoch
        returned is -1; other processes find the row gone.
        """

        async def run() -> tuple[RefusalRow, int, int] | None:
            async with self._atomic():
                found = await self._scalar(
                    "SELECT count(*) FROM updates WHERE doc_id = ? AND seq = ? AND pending = 1",
                    (doc_id, seq),
                )
                if not found:
                    return None
                changes = await self._changes(
                    seen_seq, loaded_bases, None, None, loaded_epochs, refusals_after
                )
                async with self._conn.execute(
                    "SELECT kind, name, state, base_seq FROM documents WHERE id = ?", (doc_id,)
                ) as cursor:
                    row = await cursor.fetchone()
                assert row is not None  # a pending row never outlives its document
                log = DocumentLog(
                    kind=str(row[0]),
                    name=str(row[1]),
                    state=bytes(row[2]),
                    base_seq=int(row[3]),
                    confirmed=await self._confirmed(doc_id),
                    settled=await self._settled_rows(doc_id),
                    pending=await self._pending_rows(doc_id),
                )
                result = plan(changes, log)
                gone = [seq, *result.replaced]
                await self._conn.executemany(
                    "DELETE FROM updates WHERE seq = ? AND doc_id = ?", [(s, doc_id) for s in gone]
                )
                await self._conn.execute(
                    "DELETE FROM updates WHERE doc_id = ? AND pending = 0", (doc_id,)
                )
                new_seqs: list[int] = []
                for data, count in result.rebased:
                    cursor = await self._conn.execute(
                        "INSERT INTO updates (doc_id, data, pending, changes) VALUES (?, ?, 1, ?)",
                        (doc_id, data, count),
                    )
                    assert cursor.lastrowid is not None
                    new_seqs.append(cursor.lastrowid)
                    await cursor.close()
                top = await self._scalar("SELECT seq FROM sqlite_sequence WHERE name = 'updates'")
                left = await self._scalar(
                    "SELECT count(*) FROM updates WHERE doc_id = ? AND pending = 1", (doc_id,)
                )
                if result.drop and not left:
                    await self._conn.execute("DELETE FROM updates WHERE doc_id = ?", (doc_id,))
                    await self._conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
                    epoch = -1
                else:
                    confirmed = _SAME_AS_STATE if not left else result.confirmed
                    await self._conn.execute(
                        "UPDATE documents SET state = ?, confirmed = ?, base_seq = ?, "
                        "epoch = epoch + 1 WHERE id = ?",
                        (result.state, confirmed, top, doc_id),
                    )
                    epoch = await self._scalar(
                        "SELECT epoch FROM documents WHERE id = ?", (doc_id,)
                    )
                rebased = ",".join(str(s) for s in new_seqs)
                cursor = await self._conn.execute(
                    "INSERT INTO refusals (doc_id, seq, code, message, at_ms, changes, summary, "
                    "rebased) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (doc_id, seq, code, message, at_ms, result.changes, result.summary, rebased),
                )
                refusal_id = cursor.lastrowid
                await cursor.close()
                assert refusal_id is not None
                await self._conn.execute(
                    "DELETE FROM refusals WHERE id <= ?", (refusal_id - KEEP_REFUSALS,)
                )
            refusal = RefusalRow(
                refusal_id,
                doc_id,
                seq,
                code,
                message,
                at_ms,
                result.changes,
                result.summary,
                tuple(new_seqs),
            )
            return refusal, top, epoch

        return await self._guard(run)

    async def refusals(self, doc_id: str | None = None) -> list[RefusalRow]:
        """The refusals the file keeps, newest first."""

        async def run() -> list[RefusalRow]:
            return list(reversed(await self._refusals(after=0, doc_id=doc_id)))

        return await self._guard(run)

    async def last_refusal_id(self) -> int:
        return await self._guard(lambda: self._scalar("SELECT max(id) FROM refusals"))

    async def _refusals(self, *, after: int, doc_id: str | None = None) -> list[RefusalRow]:
        sql = (
            "SELECT id, doc_id, seq, code, message, at_ms, changes, summary, rebased "
            "FROM refusals WHERE id > ?"
        )
        params: tuple[object, ...] = (after,)
        if doc_id is not None:
            sql += " AND doc_id = ?"
            params = (after, doc_id)
        async with self._conn.execute(sql + " ORDER BY id", params) as cursor:
            return [
                RefusalRow(
                    int(i),
                    str(d),
                    int(s),
                    str(c),
                    str(m),
                    int(a),
                    int(n),
                    str(y),
                    tuple(int(x) for x in str(r).split(",") if x),
                )
                async for i, d, s, c, m, a, n, y, r in cursor
            ]

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

    async def load_quotes(self) -> list[QuoteRow]:
        return await self._guard(self._load_quotes)

    async def _load_quotes(self) -> list[QuoteRow]:
        sql = "SELECT symbol, price, time_ms, seq, previous_close FROM quotes"
        async with self._conn.execute(sql) as cursor:
            return [(str(a), str(b), int(c), int(d), e) async for a, b, c, d, e in cursor]

    async def save_quotes(self, rows: list[QuoteRow]) -> None:
        """Keep each quote unless the file holds a newer one (another process's, say)."""

        async def run() -> None:
            async with self._atomic():
                await self._conn.executemany(
                    "INSERT INTO quotes (symbol, price, time_ms, seq, previous_close) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (symbol) DO UPDATE SET "
                    "price = excluded.price, time_ms = excluded.time_ms, seq = excluded.seq, "
                    "previous_close = excluded.previous_close "
                    "WHERE excluded.time_ms >= quotes.time_ms",
                    rows,
                )

        await self._guard(run)

    async def set_size_limit(self, max_pages: int) -> None:
        """Cap the file at ``max_pages`` pages (used to exercise the disk-full path)."""
        await self._guard(lambda: self._conn.execute(f"PRAGMA max_page_count = {int(max_pages)}"))
