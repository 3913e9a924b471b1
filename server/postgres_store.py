"""Documents in PostgreSQL (asyncpg), so that several relays share one truth.

Any relay process on the same database serves any document, and an update is acknowledged only
once it is committed there: :meth:`PostgresRelayStore.append` returns after COMMIT.

Sequence numbers are per document and come from a counter in the document's row, bumped by the
appending transaction (``INSERT ... ON CONFLICT DO UPDATE SET last_seq = last_seq + n``). The
row lock that statement takes is held until COMMIT, so two relays appending to one document at
once queue on it: their seqs never collide, none is lost, and a document's updates commit in
seq order (a reader that sees seq n sees every seq below it). Appends are grouped as in the
SQLite store: those handed in while a transaction commits go together into the next one, each
document's rows locked in one sorted order so that two relays' groups cannot deadlock.

Compaction is where several relays could lose data: a relay's snapshot holds what it loaded and
what it appended, not an update another relay appended in between with a lower seq, nor a
snapshot another relay compacted meanwhile. So :meth:`~PostgresRelayStore.compact` deletes only
the rows up to ``up_to_seq`` that its snapshot surely covers (rows this store loaded or wrote),
and replaces the stored snapshot only if it is the one this store last saw; otherwise it keeps
the other relay's snapshot and stores its own as one more update (updates are CRDT updates:
applying one twice, or in another order, changes nothing). With one relay, that is exactly "the
rows up to ``up_to_seq`` are replaced by the snapshot".

While PostgreSQL is down every operation raises :class:`RelayStoreError` within the configured
timeouts (:class:`PostgresTimeouts`), ``load`` included. What the relay does then: an update is
refused (its fatal ``internal`` Error, "its store is unreachable"; nothing unstored is
acknowledged, the device resends after reconnecting); a new connection is refused at its Hello
(the document list cannot be read); a SyncRequest for a document not in memory gets the same
Error rather than a document that may lack committed updates. A document this relay holds in
memory is still served from there to connections already open: it holds everything this relay
stored and every peer's change the bus brought, which is all there is, since nothing is stored
while the database is down. Nothing else is needed to recover: the pool replaces a
lost connection at the next use, and an operation whose connection was lost under it is retried
once on a new one (an append retried after a COMMIT whose answer was lost stores its update
twice, which changes nothing).

Tables are named with a prefix (``foliosync_`` by default) so that the relay can share a database;
they are created on open, with a schema version row that a newer layout would bump.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from foliosync.server.storage import StoredDocument, Watermark
from foliosync.sync.errors import ConfigError, RelayStoreError, StorageFullError

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "DEFAULT_TIMEOUTS",
    "SCHEMA_VERSION",
    "PostgresRelayStore",
    "PostgresTimeouts",
]

SCHEMA_VERSION = 1
"""The layout this module writes; a database marked with a higher one is refused."""

DEFAULT_TABLE_PREFIX = "foliosync_"

_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")
_MAX_GROUP = 512
_MAX_SEEN = 65_536  # documents whose last load this store remembers for compaction


@dataclass(frozen=True, slots=True)
class PostgresTimeouts:
    """How long the store waits for PostgreSQL, in seconds, before it raises RelayStoreError.

    ``connect`` bounds opening one connection (a host that drops packets), ``acquire`` waiting
    for a free connection of the pool, ``command`` one statement, ``ping`` the whole readiness
    query, so that ``/readyz`` answers before its own deadline.
    """

    connect: float = 5.0
    acquire: float = 10.0
    command: float = 30.0
    ping: float = 1.5

    def __post_init__(self) -> None:
        for name in ("connect", "acquire", "command", "ping"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"the PostgreSQL {name} timeout must be positive, not {value!r}")


DEFAULT_TIMEOUTS = PostgresTimeouts()

_T = TypeVar("_T")

_FOREIGN_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
    UnicodeError,
)
_CLOSE_ERRORS: tuple[type[BaseException], ...] = (*_FOREIGN_ERRORS, RuntimeError)

# Errors that mean the connection, not the statement, failed: the work is retried on a new one.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)


def _describe(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "PostgreSQL"
    database = parts.path.lstrip("/")
    return f"PostgreSQL at {host}:{port}" + (f"/{database}" if database else "")


def _translate(exc: BaseException, doing: str, where: str) -> RelayStoreError:
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return StorageFullError(f"{where} is full: {doing} failed: {exc}")
    if isinstance(exc, TimeoutError):
        return RelayStoreError(f"{where} did not answer in time: {doing} failed")
    if isinstance(exc, OSError):
        return RelayStoreError(f"cannot reach {where}: {doing} failed: {exc}")
    return RelayStoreError(f"{where}: {doing} failed: {type(exc).__name__}: {exc}")


def _is_lost(conn: Any, exc: BaseException) -> bool:
    if isinstance(exc, _CONNECTION_LOST):
        return True
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # the pool let go of it already: it was lost
        return True


def _drop(conn: Any) -> None:
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


@dataclass(slots=True)
class _Append:
    user: str
    doc_id: str
    update: bytes
    changed_at: int
    changed_by: str
    done: asyncio.Future[int]


class PostgresRelayStore:
    """The relay's documents in PostgreSQL: the store for several relays on one database."""

    def __init__(self, pool: Any, *, where: str, prefix: str, timeouts: PostgresTimeouts) -> None:
        self._pool = pool
        self._where = where
        self._timeouts = timeouts
        self._writer_id = uuid.uuid4().hex
        """Marks the rows this store wrote: its compactions may delete them (see the module)."""
        self.store_id = ""
        """These tables' own id, made once with them: every relay on them reads the same."""
        # (user, doc) -> (highest seq loaded, generation of the snapshot loaded or written).
        self._seen: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._queue: asyncio.Queue[_Append | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        p = prefix
        self._documents_table = f"{p}documents"
        # One statement per document of a group: its count raised and its rows written,
        # numbered from the count it returns. Alone in a group (a busy document's commits), it
        # needs no transaction around it: one round trip, where BEGIN, two statements and
        # COMMIT took four.
        self._sql_append = (
            f"WITH d AS (INSERT INTO {p}documents (owner, doc_id, last_seq, changed_at, "
            "changed_by) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, doc_id) DO UPDATE SET "
            f"last_seq = {p}documents.last_seq + EXCLUDED.last_seq, "
            "changed_at = EXCLUDED.changed_at, changed_by = EXCLUDED.changed_by "
            "RETURNING last_seq), "
            f"r AS (INSERT INTO {p}updates (owner, doc_id, seq, data, writer) "
            "SELECT $1, $2, d.last_seq - $3 + t.n, t.data, $7 "
            "FROM d, unnest($6::bytea[]) WITH ORDINALITY AS t(data, n)) "
            "SELECT last_seq FROM d"
        )
        self._sql_load = (
            "SELECT d.snapshot, d.snapshot_gen, d.last_seq, d.changed_at, d.changed_by, "
            f"ARRAY(SELECT u.data FROM {p}updates u WHERE u.owner = d.owner "
            "AND u.doc_id = d.doc_id ORDER BY u.seq) AS updates "
            f"FROM {p}documents d WHERE d.owner = $1 AND d.doc_id = $2"
        )
        self._sql_lock_doc = (
            f"SELECT snapshot_gen FROM {p}documents WHERE owner = $1 AND doc_id = $2 FOR UPDATE"
        )
        self._sql_delete_covered = (
            f"DELETE FROM {p}updates WHERE owner = $1 AND doc_id = $2 AND ("
            "(seq <= $3 AND (seq <= $4 OR writer = $5)) OR (writer = $5 AND is_snapshot))"
        )
        self._sql_replace_snapshot = (
            f"UPDATE {p}documents SET snapshot = $3, snapshot_gen = snapshot_gen + 1 "
            "WHERE owner = $1 AND doc_id = $2 RETURNING snapshot_gen"
        )
        self._sql_next_seq = (
            f"UPDATE {p}documents SET last_seq = last_seq + 1 "
            "WHERE owner = $1 AND doc_id = $2 RETURNING last_seq"
        )
        self._sql_snapshot_row = (
            f"INSERT INTO {p}updates (owner, doc_id, seq, data, writer, is_snapshot) "
            "VALUES ($1, $2, $3, $4, $5, true)"
        )
        self._sql_documents = (
            f'SELECT doc_id FROM {p}documents WHERE owner = $1 ORDER BY doc_id COLLATE "C"'
        )
        self._sql_ping = f"SELECT 1 FROM {p}documents LIMIT 1"

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        prefix: str = DEFAULT_TABLE_PREFIX,
        timeouts: PostgresTimeouts = DEFAULT_TIMEOUTS,
    ) -> PostgresRelayStore:
        """Connect a pool to ``dsn`` (``postgresql://user@host:port/database``) and create the
        tables if they are missing. Raises ConfigError for bad arguments, RelayStoreError if
        PostgreSQL cannot be reached within ``timeouts.connect`` or its tables are newer."""
        if not isinstance(min_size, int) or not isinstance(max_size, int):
            raise ConfigError("the PostgreSQL pool sizes must be integers")
        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ConfigError(
                f"bad PostgreSQL pool sizes min={min_size} max={max_size}: "
                "0 <= min <= max and max >= 1"
            )
        if not _PREFIX.fullmatch(prefix):
            raise ConfigError(
                f"bad table prefix {prefix!r}: lower-case letters, digits and _, at most 41"
            )
        where = _describe(dsn)
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    dsn,
                    min_size=min_size,
                    max_size=max_size,
                    timeout=timeouts.connect,
                    command_timeout=timeouts.command,
                ),
                timeouts.connect + timeouts.command,
            )
        except _FOREIGN_ERRORS as exc:
            raise _translate(exc, "opening the relay store", where) from exc
        except ValueError as exc:  # asyncpg's reading of a malformed DSN
            raise ConfigError(f"bad PostgreSQL address: {exc}") from exc
        store = cls(pool, where=where, prefix=prefix, timeouts=timeouts)
        try:
            await store._run("creating the tables", lambda c: _create_schema(c, prefix))
            store.store_id = await store._run(
                "reading the store's id",
                lambda c: c.fetchval(f"SELECT value FROM {prefix}meta WHERE key = 'store_id'"),
            )
        except BaseException:
            pool.terminate()
            raise
        store._writer = asyncio.get_running_loop().create_task(store._write_loop())
        return store

    # -- plumbing --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._writer is None or self._writer.done():
            raise RelayStoreError("the relay store is closed")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        async with self._pool.acquire(timeout=self._timeouts.acquire) as conn:
            yield conn

    async def _run(self, doing: str, work: Callable[[Any], Awaitable[_T]]) -> _T:
        """``work`` on a pooled connection, foreign errors translated.

        A connection that was lost under it (a terminated backend, a restarted server) means
        the others are likely lost too: the pool is told to replace them all, and the work is
        retried once. A connection whose command timed out or was cancelled is dropped, not
        handed back: resetting it would wait on the very server that did not answer."""
        for attempt in (1, 2):
            lost = False
            try:
                async with self._connection() as conn:
                    try:
                        return await work(conn)
                    except asyncio.CancelledError:
                        _drop(conn)
                        raise
                    except _FOREIGN_ERRORS as exc:
                        lost = _is_lost(conn, exc)
                        if lost or isinstance(exc, TimeoutError):
                            _drop(conn)
                        if lost:
                            await self._pool.expire_connections()
                        raise
            except _FOREIGN_ERRORS as exc:
                if attempt == 1 and lost and not self._closing:
                    continue
                raise _translate(exc, doing, self._where) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _saw(self, key: tuple[str, str], through: int, generation: int) -> None:
        old_through, old_generation = self._seen.pop(key, (0, 0))
        self._seen[key] = (max(through, old_through), max(generation, old_generation))
        while len(self._seen) > _MAX_SEEN:  # forgetting is safe: compaction then keeps more
            self._seen.popitem(last=False)

    # -- the port --------------------------------------------------------------------------------

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        self._check_open()
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
        by_doc: dict[tuple[str, str], list[_Append]] = {}
        for item in group:
            by_doc.setdefault((item.user, item.doc_id), []).append(item)
        keys = sorted(by_doc)  # one lock order for every relay: no deadlock between groups

        async def append(conn: Any, key: tuple[str, str]) -> int:
            items = by_doc[key]
            return int(
                await conn.fetchval(
                    self._sql_append,
                    key[0],
                    key[1],
                    len(items),
                    items[-1].changed_at,
                    items[-1].changed_by,
                    [i.update for i in items],
                    self._writer_id,
                )
            )

        async def work(conn: Any) -> dict[tuple[str, str], int]:
            if len(keys) == 1:  # one statement: atomic by itself
                return {keys[0]: await append(conn, keys[0])}
            async with conn.transaction():
                return {key: await append(conn, key) for key in keys}

        try:
            last_seqs = await self._run("storing updates", work)
        except RelayStoreError as exc:
            for item in group:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        except BaseException as exc:  # the writer must outlive one bad group
            error = RelayStoreError(f"storing updates failed: {type(exc).__name__}: {exc}")
            for item in group:
                if not item.done.done():
                    item.done.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for key in keys:
            items = by_doc[key]
            first = last_seqs[key] - len(items) + 1
            for offset, item in enumerate(items):
                if not item.done.done():
                    item.done.set_result(first + offset)

    async def load(self, user: str, doc_id: str) -> StoredDocument | None:
        """The document as one statement reads it (one snapshot of the database: its snapshot,
        updates and watermark agree); None if it was never stored. Raises RelayStoreError while
        PostgreSQL is down: a document read partly, or not at all, is never served as empty."""
        self._check_open()
        row = await self._run(
            f"reading {doc_id}", lambda c: c.fetchrow(self._sql_load, user, doc_id)
        )
        if row is None:
            return None
        last_seq = int(row["last_seq"])
        self._saw((user, doc_id), last_seq, int(row["snapshot_gen"]))
        return StoredDocument(
            snapshot=bytes(row["snapshot"]),
            updates=[bytes(u) for u in row["updates"]],
            last_seq=last_seq,
            watermark=Watermark(row["changed_at"], row["changed_by"]),
        )

    async def compact(self, user: str, doc_id: str, snapshot: bytes, up_to_seq: int) -> None:
        """Replace the updates up to ``up_to_seq`` by ``snapshot``, which covers what this store
        loaded and appended of the document; a row another relay appended that this store never
        loaded is kept, whatever its seq, and so is a snapshot another relay wrote since this
        store's last load (this one then becomes an update beside it). One transaction."""
        self._check_open()
        key = (user, doc_id)
        through, known_generation = self._seen.get(key, (0, 0))

        async def work(conn: Any) -> int | None:
            async with conn.transaction():
                generation = await conn.fetchval(self._sql_lock_doc, user, doc_id)
                if generation is None:
                    return None
                await conn.execute(
                    self._sql_delete_covered, user, doc_id, up_to_seq, through, self._writer_id
                )
                if generation == known_generation:
                    return int(
                        await conn.fetchval(self._sql_replace_snapshot, user, doc_id, snapshot)
                    )
                seq = await conn.fetchval(self._sql_next_seq, user, doc_id)
                await conn.execute(
                    self._sql_snapshot_row, user, doc_id, seq, snapshot, self._writer_id
                )
                return known_generation

        generation = await self._run(f"compacting {doc_id}", work)
        if generation is not None:
            self._saw(key, through, generation)

    async def documents(self, user: str) -> list[str]:
        self._check_open()
        rows = await self._run("listing documents", lambda c: c.fetch(self._sql_documents, user))
        return [str(r["doc_id"]) for r in rows]

    async def ping(self) -> None:
        """A query on the documents table, bounded by ``timeouts.ping`` as a whole."""
        self._check_open()
        try:
            await asyncio.wait_for(
                self._run("answering", lambda c: c.fetchval(self._sql_ping)), self._timeouts.ping
            )
        except TimeoutError as exc:
            raise RelayStoreError(f"the relay store does not answer: {self._where}") from exc
        except RelayStoreError as exc:
            raise RelayStoreError(f"the relay store does not answer: {exc}") from exc

    async def close(self) -> None:
        """Store what was handed in, then close the pool (idempotent)."""
        self._closing = True  # no append may queue behind the writer's stop marker
        if self._writer is not None and not self._writer.done():
            self._queue.put_nowait(None)
            await self._writer
        try:
            await asyncio.wait_for(self._pool.close(), self._timeouts.command)
        except _CLOSE_ERRORS:
            self._pool.terminate()  # a connection that would not close in time is dropped


async def _create_schema(conn: Any, p: str) -> None:
    """Create the tables once, whichever of several relays starting together gets there first
    (an advisory lock: ``CREATE TABLE IF NOT EXISTS`` alone races on the catalog)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{p}schema")
        await conn.execute(
            f"""
            CREATE TABLE IF NOT EXISTS {p}meta (key text PRIMARY KEY, value text NOT NULL);
            CREATE TABLE IF NOT EXISTS {p}documents (
                owner text NOT NULL,
                doc_id text NOT NULL,
                snapshot bytea NOT NULL DEFAULT '',
                snapshot_gen bigint NOT NULL DEFAULT 0,
                last_seq bigint NOT NULL DEFAULT 0,
                changed_at bigint,
                changed_by text,
                PRIMARY KEY (owner, doc_id)
            );
            CREATE TABLE IF NOT EXISTS {p}updates (
                owner text NOT NULL,
                doc_id text NOT NULL,
                seq bigint NOT NULL,
                data bytea NOT NULL,
                writer text NOT NULL,
                is_snapshot boolean NOT NULL DEFAULT false,
                PRIMARY KEY (owner, doc_id, seq)
            );
            """
        )
        # A name for these tables that no other store shares: a relay group on Redis is bound to
        # it, so two groups with different stores on one Redis prefix are told apart.
        await conn.execute(
            f"INSERT INTO {p}meta (key, value) VALUES ('store_id', $1) ON CONFLICT DO NOTHING",
            uuid.uuid4().hex,
        )
        version = await conn.fetchval(f"SELECT value FROM {p}meta WHERE key = 'schema_version'")
        if version is None:
            await conn.execute(
                f"INSERT INTO {p}meta (key, value) VALUES ('schema_version', $1)",
                str(SCHEMA_VERSION),
            )
        elif not version.isdigit() or int(version) > SCHEMA_VERSION:
            raise RelayStoreError(
                f"the tables {p}* hold schema version {version}, newer than this foliosync's "
                f"{SCHEMA_VERSION}: upgrade foliosync"
            )
