"""The local replica: a device's documents, editable offline, every accepted edit durable.

An edit runs against the in-memory pycrdt document, and the update it produced is committed to
SQLite before the call returns. Edits are serialized (one lock per replica): a failed commit
(disk full, say) reloads the document from the file, so memory never holds a change the file lacks
and the device's pycrdt clock never runs ahead of what is stored.

Documents load lazily: opening a replica reads names and counters only, so a device with a
hundred large portfolios opens in milliseconds and pays for a document when it is first used.

Several processes on one replica
--------------------------------
An app may hold a replica all day while the CLI, or a second app, reads and edits the same file
(the store's docstring says how the file stays consistent). Each process keeps its own documents
in memory and follows the others':

- **Learning of another process's edits.** A watcher task asks the store every
  ``watch_interval`` seconds (``WATCH_SECONDS``, 50 ms by default) whether another connection
  committed (``PRAGMA data_version``: a counter in shared memory, microseconds, no disk). Only then
  it reads, in one snapshot, the log rows after the last seq this process has seen and applies
  them to the documents it has loaded, merges the state of any document another process
  compacted past that seq, and refreshes names, sync bookkeeping, pending counts, device settings
  and quotes. An edit committed in another process is seen here within about one interval plus
  the read (measured: tests/test_replica_processes.py). :meth:`Replica.refresh` does it at once.
- **Change notifications** fire for those changes too, with ``origin="other-process"`` (besides
  ``"local"``: made by this process, and ``"remote"``: received from the relay by this
  process). An other-process change that is an unacknowledged local edit of this device carries
  its seq and update, like a local one, so that whichever process syncs sends it on.
- **Notifications follow the log's order.** A sync connection settles, by one Ack, every pending
  row up to a seq, so it must have sent every pending row below a seq before it sends that seq.
  When this process commits row N while rows it has not seen lie below N (another process wrote
  them since its last look), it reads and notifies those first, then N.
- **pycrdt client ids are per document instance**, never shared: two processes of one device
  each load their own Doc, and each Doc draws its own random id (pycrdt's default), so their
  edits can never claim the same (client, clock) pair. (A fixed id per device, as before, was
  only safe with one process.) The device id stays per replica: it is this device's identity at
  the relay and in the documents' per-device slots.
- **The hybrid logical clock is per process.** Each stamps its edits above every stamp it has
  read, and a process reads the others' edits within one interval, so "the later edit wins"
  holds across processes as across devices. Two processes writing the same per-device slot
  within that interval are concurrent writers of one map key: pycrdt keeps one of the two
  (by client id), the same one everywhere.
- **Compaction** takes the file's write lock and first catches up (the store's docstring), so
  the state it writes holds every committed edit of every process.

A change the relay refused for good
-----------------------------------
The relay checks every update and may refuse one (an app's rule, a read-only share, bytes it
cannot read). The device rolls that pending row back (:meth:`Replica.refuse`): the document
becomes the confirmed content (everything from the relay and everything it acknowledged, kept by
the store apart from the pending rows) plus the other pending rows, rebuilt in a fresh ``Doc``.
An undo update would not do: it would refer to items the relay never received. Later rows that
cannot stand without the refused one are re-made on the rebuilt document (module
:mod:`foliosync.client.rollback`). Every process that has the file open replaces its copy on its
next read (the document's epoch moved), rebinding the models, so that the handles an app holds
show the rolled-back document; an edit a process makes on its copy before it read the rollback
is not committed but made again on the new one. The refusal is kept in the file (the last 100)
and told to ``on_refusal`` listeners in every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Generator,
    Iterable,
)
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from pycrdt import Doc, TransactionEvent, get_update, merge_updates

from foliosync.client.documents import PortfolioHandle, WatchlistHandle
from foliosync.client.quotes import Quote, QuoteBook
from foliosync.client.rollback import decode_state_vector, plan_rollback
from foliosync.client.store import (
    DocumentLog,
    DocumentRow,
    PendingUpdate,
    RebuiltDocument,
    RefusalPlan,
    RefusalRow,
    ReplicaStore,
    StoreChanges,
)
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import (
    DocumentExists,
    DocumentNotFound,
    FolioSyncError,
    ReplicaCorrupt,
    ReplicaError,
    ValidationError,
)
from foliosync.sync.freshness import (
    DEFAULT_THRESHOLDS,
    Freshness,
    FreshnessThresholds,
    document_freshness,
)
from foliosync.sync.model import (
    INDEX_DOCUMENT_ID,
    DocumentKind,
    DocumentModel,
    EditContext,
    Portfolio,
    UserIndex,
    Watchlist,
    document_id,
    kind_of,
)
from foliosync.sync.prices import PricePoint
from foliosync.sync.validation import decimal_to_str, normalize_name

__all__ = [
    "SYNCED_AT_META",
    "DocumentChange",
    "DocumentInfo",
    "OpeningReplica",
    "OutgoingUpdate",
    "Refusal",
    "Replica",
]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=DocumentModel)
R = TypeVar("R")

# Fold the update log into the snapshot after this many rows or bytes of a document.
COMPACT_AFTER_ROWS = 500
COMPACT_AFTER_BYTES = 1 << 20
# Write changed quotes to the file at most this often.
QUOTE_FLUSH_SECONDS = 0.5
# How often to check whether another process committed to the file.
WATCH_SECONDS = 0.05
# The meta key of the syncing process's heartbeat: when, in ms, it was last connected and in sync
# with nothing in flight (see SyncClient; it counts as every settled document's last sync).
SYNCED_AT_META = "synced_at"

_MODELS: dict[DocumentKind, type[DocumentModel]] = {
    DocumentKind.WATCHLIST: Watchlist,
    DocumentKind.PORTFOLIO: Portfolio,
    DocumentKind.INDEX: UserIndex,
}


@dataclass(frozen=True, slots=True)
class DocumentChange:
    """A document changed: ``origin`` says who changed it.

    ``"local"``: this process, by an edit; ``"remote"``: another device, through a relay, received
    by this process; ``"other-process"``: another process on this replica file (an edit, or a
    change it received from the relay), seen here when this process read the file.

    A local change also carries the stored update and its sequence number, which is all a sync
    connection needs to send it on; so does an other-process change that is a local edit of this
    device not yet acknowledged by a relay (empty otherwise).
    """

    doc_id: str
    kind: DocumentKind
    origin: Literal["local", "remote", "other-process"]
    seq: int = 0
    update: bytes = b""


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    id: str
    kind: DocumentKind
    name: str
    pending: int  # local changes not yet acknowledged by a relay
    created_at: int
    last_synced_at: int | None  # ms: when this device last confirmed it in sync with the relay
    remote_changed_at: int | None  # ms: when the relay last saw it change
    remote_changed_by: str | None  # the device that made that change


class OutgoingUpdate(NamedTuple):
    """One Update for a relay (``Replica.outgoing``): its seq, its bytes and the pending rows it
    carries. A refusal of it names one change only if it carries exactly one row; one carrying
    several (a merged diff) names none of them, and one carrying none holds only what the relay
    lacks of what it had confirmed (its seq is the highest it may take: below every pending
    row, so that its Ack settles none)."""

    seq: int
    update: bytes
    rows: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A change the relay refused for good, rolled back on this device.

    ``seq`` is the refused pending row's seq, as sent in the Update; ``code`` and ``message`` are
    the relay's; ``changes`` counts the user edits the row held; ``summary`` says what the change
    did ("add NVDA, MSFT to Tech"); ``rebased`` are the seqs of the new pending rows that re-made
    later changes on top of the rolled-back document.
    """

    doc_id: str
    seq: int
    code: str
    message: str
    at_ms: int
    changes: int
    summary: str
    rebased: tuple[int, ...]

    def describe(self, name: str | None = None) -> str:
        """One line for a person: 'Tech: the relay refused "add NVDA" (seq 12, refused): no more
        than 500 symbols; rolled back'."""
        where = f"{name}: " if name else ""
        reason = f": {self.message}" if self.message else ""
        return (
            f'{where}the relay refused "{self.summary}" (seq {self.seq}, {self.code}){reason}; '
            "rolled back"
        )


def _refusal(row: RefusalRow) -> Refusal:
    return Refusal(
        row.doc_id, row.seq, row.code, row.message, row.at_ms, row.changes, row.summary, row.rebased
    )


@dataclass(slots=True)
class _Loaded:
    model: DocumentModel
    capture: list[bytes] | None = None
    rows_since_compaction: int = 0
    bytes_since_compaction: int = 0
    max_seq: int = 0
    base_seq: int = 0  # the snapshot it was loaded from, or merged last
    epoch: int = 0  # the rollback generation of the file it was read at
    subscription: Any = None


class OpeningReplica(Awaitable["Replica"], AbstractAsyncContextManager["Replica"]):
    """What :meth:`Replica.open` returns: await it for the replica, or use it in ``async with``
    (the replica is then closed when the block ends, by an exception too).

    Both forms in one object, as ``aiosqlite.connect`` does: ``async with Replica.open(p)`` reads
    better than ``async with await Replica.open(p)``, and ``await Replica.open(p)`` keeps working.
    It can be used once (like the coroutine it wraps: left unused, Python warns that it was
    never awaited).
    """

    __slots__ = ("_opening", "_replica")

    def __init__(self, opening: Coroutine[Any, Any, Replica]) -> None:
        self._opening = opening
        self._replica: Replica | None = None

    def __await__(self) -> Generator[Any, None, Replica]:
        return self._opening.__await__()

    async def __aenter__(self) -> Replica:
        self._replica = await self._opening
        return self._replica

    async def __aexit__(self, *exc_info: object) -> None:
        if self._replica is not None:
            await self._replica.close()


class Replica:
    """A device's replica of its user's documents. Open with :meth:`open`, close with
    :meth:`close` (or ``async with``)."""

    def __init__(self, store: ReplicaStore, meta: dict[str, str], rows: list[DocumentRow]) -> None:
        self._store = store
        self.device_id = meta["device_id"]
        self._meta = meta
        self._context = EditContext(self.device_id)
        self._rows = {row.id: row for row in rows}
        self._loaded: dict[str, _Loaded] = {}
        self._pending: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[DocumentChange], None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self.quotes = QuoteBook(())
        """The last known price of each symbol (kept in the replica file)."""
        self._dirty_quotes: dict[str, Quote] = {}
        self._quote_flush: asyncio.Task[None] | None = None
        self._quotes_unsaved = False
        self._seen_seq = 0  # every log row up to it is applied (or not loaded) and notified
        self._watcher: asyncio.Task[None] | None = None
        self._refusals: list[Refusal] = []  # newest first, as the file keeps them
        self._seen_refusal = 0  # the last refusal id notified (or there at opening)
        self._refusal_listeners: list[Callable[[Refusal], None]] = []

    # -- life cycle --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        synchronous: str = "NORMAL",
        watch_interval: float | None = WATCH_SECONDS,
    ) -> OpeningReplica:
        """Open (or create) the replica at ``path``: ``replica = await Replica.open(path)``, or
        ``async with Replica.open(path) as replica:`` to have it closed when the block ends.

        Other processes may have it open too; their changes are seen here within about
        ``watch_interval`` seconds (None: only when :meth:`refresh` is called).
        Raises ReplicaCorrupt, ReplicaLocked or SchemaTooNew without touching the file.
        """
        if watch_interval is not None and not watch_interval > 0:
            raise ValidationError("watch_interval must be a positive number of seconds or None")
        return OpeningReplica(cls._open(path, synchronous, watch_interval))

    @classmethod
    async def _open(cls, path: str | Path, synchronous: str, watch: float | None) -> Replica:
        store = await ReplicaStore.open(path, synchronous=synchronous)
        try:
            last_seq = await store.last_seq()  # before the rest: what follows is caught up
            meta = await store.get_meta()
            if "device_id" not in meta:
                meta = {"device_id": uuid.uuid4().hex[:16], "created_at": str(wall_ms())}
                await store.set_meta_if_absent(meta)  # another process may be creating it too
                meta = await store.get_meta()
            rows = await store.documents()
            replica = cls(store, meta, rows)
            replica.quotes = QuoteBook(_quotes_from_rows(await store.load_quotes()))
            replica._pending = await store.pending_counts()
            replica._seen_seq = last_seq
            rows_refused = await store.refusals()
            replica._refusals = [_refusal(r) for r in rows_refused]
            replica._seen_refusal = max((r.id for r in rows_refused), default=0)
            if INDEX_DOCUMENT_ID not in replica._rows:
                await replica._insert_row(INDEX_DOCUMENT_ID, DocumentKind.INDEX, "", [])
        except BaseException:
            await store.close()
            raise
        if watch is not None:
            replica._watcher = asyncio.get_running_loop().create_task(replica._watch_file(watch))
        return replica

    async def close(self) -> None:
        if self._closed:
            return
        async with self._lock:
            self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._quote_flush is not None and not self._quote_flush.done():
            self._quote_flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._quote_flush
        try:
            await self._flush_quotes(delay=0)
        finally:
            for loaded in self._loaded.values():
                loaded.model.close()
            self._loaded.clear()
            await self._store.close()

    async def __aenter__(self) -> Replica:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def meta(self) -> dict[str, str]:
        """Device settings kept in the replica (device id, remembered relay and token, ...)."""
        return dict(self._meta)

    async def set_meta(self, **values: str) -> None:
        await self._store.set_meta(values)
        self._meta.update(values)

    # -- listing -----------------------------------------------------------------------------

    def documents(self, kind: DocumentKind | None = None) -> list[DocumentInfo]:
        """Every watchlist and portfolio (not the index), sorted by kind and name."""
        infos = [
            self._info(row)
            for row in self._rows.values()
            if row.kind != DocumentKind.INDEX and (kind is None or row.kind == kind)
        ]
        return sorted(infos, key=lambda i: (i.kind, i.name.casefold(), i.id))

    def info(self, doc_id: str) -> DocumentInfo:
        row = self._rows.get(doc_id)
        if row is None:
            raise DocumentNotFound(f"no document {doc_id!r}")
        return self._info(row)

    def _info(self, row: DocumentRow) -> DocumentInfo:
        pending = self._pending.get(row.id, 0)
        synced = row.last_synced_at
        if pending == 0:
            # The syncing process (maybe another one) confirms, while connected and in sync with
            # nothing in flight, every few seconds: every document without pending rows was in
            # sync then, so that the processes beside it do not see their copies grow stale.
            with contextlib.suppress(KeyError, ValueError):
                beat = int(self._meta[SYNCED_AT_META])
                synced = beat if synced is None else max(synced, beat)
        return DocumentInfo(
            id=row.id,
            kind=DocumentKind(row.kind),
            name=row.name,
            pending=pending,
            created_at=row.created_at,
            last_synced_at=synced,
            remote_changed_at=row.remote_changed_at,
            remote_changed_by=row.remote_changed_by,
        )

    def freshness(
        self,
        doc_id: str,
        now: datetime | None = None,
        thresholds: FreshnessThresholds = DEFAULT_THRESHOLDS,
    ) -> Freshness:
        """How current this device's copy is: time since it was last confirmed in sync with the
        relay, with the pending local changes beside it. (A connected :class:`SyncClient`
        answers "live" for documents it keeps in sync.)"""
        info = self.info(doc_id)
        synced = (
            datetime.fromtimestamp(info.last_synced_at / 1000, tz=UTC)
            if info.last_synced_at is not None
            else None
        )
        return document_freshness(synced, now or datetime.now(tz=UTC), info.pending, thresholds)

    def document_ids(self) -> list[str]:
        """Every document id, the index included (what a sync covers)."""
        return sorted(self._rows)

    def resolve(self, kind: DocumentKind, name_or_id: str) -> str:
        """The id of a document given its name (any case) or its id."""
        if name_or_id in self._rows and self._rows[name_or_id].kind == kind:
            return name_or_id
        try:
            doc_id = document_id(kind, name_or_id)
        except ValidationError:
            doc_id = ""
        if doc_id in self._rows:
            return doc_id
        raise DocumentNotFound(f"no {kind.value} named {name_or_id!r}")

    # -- typed access ------------------------------------------------------------------------

    async def create_watchlist(self, name: str) -> WatchlistHandle:
        """Create a watchlist; DocumentExists if this device has one of that name already."""
        model = await self._create(DocumentKind.WATCHLIST, name, Watchlist)
        return WatchlistHandle(self, self._id_of(model), model)

    async def create_portfolio(self, name: str) -> PortfolioHandle:
        model = await self._create(DocumentKind.PORTFOLIO, name, Portfolio)
        return PortfolioHandle(self, self._id_of(model), model)

    async def watchlist(self, name_or_id: str) -> WatchlistHandle:
        doc_id = self.resolve(DocumentKind.WATCHLIST, name_or_id)
        return WatchlistHandle(self, doc_id, await self._model(doc_id, Watchlist))

    async def portfolio(self, name_or_id: str) -> PortfolioHandle:
        doc_id = self.resolve(DocumentKind.PORTFOLIO, name_or_id)
        return PortfolioHandle(self, doc_id, await self._model(doc_id, Portfolio))

    async def index(self) -> UserIndex:
        return await self._model(INDEX_DOCUMENT_ID, UserIndex)

    async def edit(self, model: M, change: Callable[[M], R]) -> R:
        """Apply ``change`` to a document and commit it before returning.

        ``change`` receives the model and may call its edit methods; validation errors raised
        before it writes leave everything unchanged. Example::

            wl = await replica.watchlist("Tech")
            await replica.edit(wl.model, lambda w: w.add(["AAPL", "MSFT"]))

        (the handles' methods, ``await wl.add(["AAPL"])``, do exactly this).
        """
        doc_id = self._id_of(model)
        async with self._lock:
            self._check_open()
            loaded = self._loaded.get(doc_id)
            if loaded is None or loaded.model is not model:
                raise DocumentNotFound(f"document {doc_id!r} is not open in this replica")
            result = await self._apply_local(doc_id, loaded, change)
        return result

    # -- sync support ------------------------------------------------------------------------

    async def state_vector(self, doc_id: str) -> bytes:
        async with self._lock:
            self._check_open()
            loaded = await self._load(doc_id)
            return loaded.model.doc.get_state()

    async def diff(self, doc_id: str, state_vector: bytes) -> bytes:
        """What this replica has of ``doc_id`` that a peer with ``state_vector`` lacks."""
        async with self._lock:
            self._check_open()
            loaded = await self._load(doc_id)
            try:
                return loaded.model.doc.get_update(state_vector)
            except ValueError as exc:
                raise ValidationError(f"invalid state vector for {doc_id}") from exc

    async def outgoing(
        self,
        doc_id: str,
        relay_state_vector: bytes,
        relay_update: bytes | None = None,
        *,
        merged: bool = False,
    ) -> list[OutgoingUpdate]:
        """The Updates to send a relay whose state vector is ``relay_state_vector`` (after its
        SyncReply), in order; empty: nothing to send. Each says which pending rows it carries.

        Normally each pending row on its own, so that a refusal names one change. When the relay
        lacks more than they bring (it was restored from an old backup: content or deletions no
        pending row holds), first one Update of what it lacks of the confirmed content (carrying
        no row, under the seq just below the first pending row), then each pending row on its
        own: a refusal still names one change. Where that cannot be (the confirmed content is
        unknown, in a replica older than schema 3; no seq is free below the first row), or when
        ``merged``: ONE diff of everything it lacks, with the highest pending seq (or max(highest
        seq loaded, 1) when nothing is pending), whose Ack settles every pending row. Taken under
        the lock, so that the rows and the diffs agree.

        ``relay_update`` is the relay's SyncReply (already applied here): it carries the relay's
        whole delete set, the one thing a state vector does not show. With it, deletions the
        relay lost (restored from a backup) and that nothing pending would bring are sent too.
        """
        async with self._lock:
            self._check_open()
            loaded = await self._load(doc_id)
            # What other processes committed, and the pending rows, from one snapshot: the Ack
            # of the seq returned settles every pending row up to it, so the diff must hold them.
            changes = await self._store.changes_since(
                self._seen_seq,
                self._bases(),
                pending_of=doc_id,
                loaded_epochs=self._epochs(),
                refusals_after=self._seen_refusal,
            )
            self._apply_changes(changes)
            loaded = self._loaded.get(doc_id, loaded)
            doc = loaded.model.doc
            try:
                diff = doc.get_update(relay_state_vector)
                theirs_state = decode_state_vector(relay_state_vector)
            except ValueError as exc:
                raise ValidationError(f"invalid state vector for {doc_id}") from exc
            pending = changes.pending_rows
            top = max(p.seq for p in pending) if pending else max(loaded.max_seq, 1)
            every = tuple(p.seq for p in pending)
            if merged:
                return [OutgoingUpdate(top, diff, every)]
            if pending:
                rows = [OutgoingUpdate(p.seq, p.data, (p.seq,)) for p in pending]
                confirmed, settled = await self._store.confirmed_log(doc_id)
                known = _confirmed_doc(confirmed, settled)
                if not _lacks_more(known, theirs_state, relay_update):
                    return rows
                below = min(every) - 1
                if known is None or below < 1:
                    return [OutgoingUpdate(top, diff, every)]
                try:
                    lacking = known.get_update(relay_state_vector)
                except ValueError as exc:
                    raise ValidationError(f"invalid state vector for {doc_id}") from exc
                return [OutgoingUpdate(below, lacking, ()), *rows]
            # Nothing pending, but the relay may have lost data (restored from a backup): send
            # what it lacks if that is more than the delete set every diff carries...
            deletions = doc.get_update(doc.get_state())
            if diff != deletions:
                return [OutgoingUpdate(top, diff, ())]
            # ... or if our delete set holds deletions the relay's lacks (a removal made after
            # the backup changes no state vector).
            if relay_update is not None and _deletions_missing(doc, relay_update):
                return [OutgoingUpdate(top, diff, ())]
            return []

    async def pending_updates(self, doc_id: str | None = None) -> list[PendingUpdate]:
        """Local changes not yet acknowledged by a relay, oldest first."""
        self._check_open()
        return await self._store.pending(doc_id)

    async def acknowledge(self, doc_id: str, seq: int, *, keep: Collection[int] = ()) -> None:
        """The relay stored every pending update of ``doc_id`` up to ``seq``, except the seqs in
        ``keep`` (answered by an error that leaves them pending: they are sent again later)."""
        async with self._lock:
            self._check_open()
            await self._store.acknowledge(doc_id, seq, keep)
            self._pending[doc_id] = await self._store.pending_changes(doc_id)

    # -- rollback ----------------------------------------------------------------------------

    async def refuse(
        self, doc_id: str, seq: int, code: str, message: str, *, whole: bool = False
    ) -> Refusal | None:
        """Roll back pending row ``seq`` of ``doc_id`` for good (durable before it returns);
        ``whole``: every pending row of it, the relay having refused the document as a whole
        (``too_many_documents``: no change of it is taken, whatever it holds).

        None if there is no such pending row any more (acknowledged, already rolled back, or
        replaced by a rebase). The document becomes what it would be without that row: the
        confirmed content (everything from the relay and everything acknowledged) plus the other
        pending rows, built in a fresh pycrdt ``Doc`` (a new client id). Later pending rows that
        cannot stand without it are re-made on top of it as new pending rows with new, higher
        seqs (``Refusal.rebased``); independent rows keep their seqs and bytes (module
        ``foliosync.client.rollback``). The snapshot, the rows and the refusal are written in
        one transaction; every process with the file open replaces its copy when it reads it.
        Notifies a ``DocumentChange(doc_id, kind, "local")`` without an update (a sync
        connection then reads and sends the unsent pending rows in seq order) and the refusal
        listeners. Handles the app holds keep working: their models are rebound.

        A document of which nothing is left, neither on the relay (nothing of it confirmed) nor
        pending, is one whose creation the relay refused: it is removed from this replica, with
        its entry in the index (a change the relay always takes), so that no device lists a
        document the relay never took; the refusal stays in :meth:`refusals`. A handle the app
        holds on it then raises DocumentNotFound; creating it again makes it anew.
        """
        async with self._lock:
            self._check_open()
            if doc_id not in self._rows:
                return None
            kind = DocumentKind(self._rows[doc_id].kind)
            loaded = await self._load(doc_id)
            built: list[Doc[Any]] = []
            announcements: list[Callable[[], None]] = []
            shared = "/" in doc_id  # another user's document: never in this user's index

            def plan(changes: StoreChanges, log: DocumentLog) -> RefusalPlan:
                self._apply_changes(changes, defer=announcements)
                result, doc = plan_rollback(log, seq, whole=whole)
                built.append(doc)
                return dataclasses.replace(result, drop=False) if shared else result

            try:
                done = await self._store.refuse(
                    doc_id,
                    seq,
                    plan,
                    seen_seq=self._seen_seq,
                    loaded_bases=self._bases(),
                    loaded_epochs=self._epochs(),
                    refusals_after=self._seen_refusal,
                    code=str(code)[:200],
                    message=str(message)[:500],
                    at_ms=wall_ms(),
                )
            finally:
                for announce in announcements:
                    announce()
            if done is None:
                return None
            row, base_seq, epoch = done
            self._seen_seq = max(self._seen_seq, base_seq)
            refusal = _refusal(row)
            self._remember_refusal(row)
            if epoch < 0:  # dropped: nothing of it anywhere
                self._forget(doc_id)
                await self._unlist(doc_id)
            else:
                loaded = self._loaded.get(doc_id, loaded)
                self._rebind(doc_id, loaded, built[-1])
                loaded.base_seq = base_seq
                loaded.max_seq = max(loaded.max_seq, base_seq)
                loaded.epoch = epoch
                loaded.rows_since_compaction = 0
                loaded.bytes_since_compaction = 0
                self._pending[doc_id] = sum(p.changes for p in await self._store.pending(doc_id))
        self._notify(DocumentChange(doc_id, kind, "local"))
        self._notify_refusal(refusal)
        return refusal

    def _forget(self, doc_id: str) -> None:
        """Drop what memory holds of a document the file no longer has."""
        self._rows.pop(doc_id, None)
        self._pending.pop(doc_id, None)
        loaded = self._loaded.pop(doc_id, None)
        if loaded is not None:
            loaded.model.doc.unobserve(loaded.subscription)
            loaded.model.close()

    async def _unlist(self, doc_id: str) -> None:
        """Remove ``doc_id``'s entry from the index, if it has one (a local change, sent)."""
        index = await self._load(INDEX_DOCUMENT_ID)
        model = index.model
        assert isinstance(model, UserIndex)
        if model.get(doc_id) is not None:
            await self._apply_local(INDEX_DOCUMENT_ID, index, lambda m: m.unregister(doc_id))

    def refusals(self, doc_id: str | None = None) -> list[Refusal]:
        """The changes the relay refused and this device rolled back, newest first (the file
        keeps the last 100, written by any process)."""
        return [r for r in self._refusals if doc_id is None or r.doc_id == doc_id]

    def on_refusal(self, listener: Callable[[Refusal], None]) -> Callable[[], None]:
        """Call ``listener`` with every refusal, made by this process or (when it reads the file)
        another one that has the replica open; returns a function that unsubscribes."""
        self._refusal_listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._refusal_listeners.remove(listener)

        return unsubscribe

    def _remember_refusal(self, row: RefusalRow) -> None:
        self._seen_refusal = max(self._seen_refusal, row.id)
        self._refusals.insert(0, _refusal(row))
        del self._refusals[100:]

    def _notify_refusal(self, refusal: Refusal) -> None:
        for listener in list(self._refusal_listeners):
            try:
                listener(refusal)
            except Exception:  # an app's listener must not break the engine
                log.exception("refusal listener failed")

    def _rebind(self, doc_id: str, loaded: _Loaded, doc: Doc[Any]) -> None:
        """Make ``doc`` the document of ``loaded``, keeping its model object (the handles the app
        holds) and the observers; the old document is dropped."""
        model = loaded.model
        model.doc.unobserve(loaded.subscription)
        model.close()
        type(model).__init__(model, doc, self._context)
        self._watch(loaded)

    def _epochs(self) -> dict[str, int]:
        return {doc_id: loaded.epoch for doc_id, loaded in self._loaded.items()}

    async def apply_remote(
        self,
        doc_id: str,
        update: bytes,
        *,
        changed_at: int | None = None,
        changed_by: str | None = None,
    ) -> bool:
        """Apply and store an update that came from the relay; True if the document changed.

        A document new to this replica gets a row, unless the update holds nothing of it (the
        relay's reply for a document it never stored, one this replica dropped meanwhile)."""
        kind = kind_of(doc_id)
        async with self._lock:
            self._check_open()
            if doc_id not in self._rows:
                if _holds_nothing(update):
                    return False
                await self._insert_row(doc_id, kind, "", [])
            loaded = await self._load(doc_id)
            listed = (
                {e.id for e in loaded.model.entries()}
                if isinstance(loaded.model, UserIndex)
                else set()
            )
            # Changed or not is told by the observer, not the state vector: a deletion moves no
            # clock, and pycrdt fires no event for an update it already has.
            captured: list[bytes] = []
            loaded.capture = captured
            try:
                loaded.model.doc.apply_update(update)
            except BaseException as exc:  # pycrdt panics derive from BaseException
                if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                    raise
                await self._reload(doc_id)
                raise ValidationError(f"the relay sent an unreadable update for {doc_id}") from exc
            finally:
                loaded.capture = None
            changed = bool(captured)
            if changed:
                try:
                    seq = await self._store.append(doc_id, update, pending=False)
                except BaseException:
                    await self._reload(doc_id)
                    raise
                self._account(doc_id, loaded, seq, len(update))
                await self._after_commit(seq, seq)
                name = loaded.model.name
                row = self._rows[doc_id]
                if name and name != row.name:
                    await self._store.rename(doc_id, name)
                    self._rows[doc_id] = _replace_row(row, name=name)
            if changed_at is not None or changed_by is not None:
                await self._store.update_sync_info(
                    doc_id, remote_changed_at=changed_at, remote_changed_by=changed_by
                )
                self._rows[doc_id] = _replace_row(
                    self._rows[doc_id], remote_changed_at=changed_at, remote_changed_by=changed_by
                )
            dropped: list[str] = []
            if doc_id == INDEX_DOCUMENT_ID and changed:
                await self._adopt_index_entries()
                dropped = await self._drop_unlisted(listed)
        if changed:
            self._notify(DocumentChange(doc_id, kind, "remote"))
        for gone in dropped:
            self._notify(DocumentChange(gone, kind_of(gone), "remote"))
        return changed

    async def mark_synced(self, doc_id: str, at_ms: int | None = None) -> None:
        """Record that this device confirmed ``doc_id`` in sync with the relay."""
        at = at_ms if at_ms is not None else wall_ms()
        async with self._lock:
            self._check_open()
            await self._store.update_sync_info(doc_id, last_synced_at=at)
            if doc_id in self._rows:
                self._rows[doc_id] = _replace_row(self._rows[doc_id], last_synced_at=at)

    async def record_watermark(self, doc_id: str, changed_at: int, changed_by: str) -> None:
        """Note the relay's last change of a document (e.g. our own, just acknowledged)."""
        async with self._lock:
            self._check_open()
            if doc_id not in self._rows:
                return
            await self._store.update_sync_info(
                doc_id, remote_changed_at=changed_at, remote_changed_by=changed_by
            )
            self._rows[doc_id] = _replace_row(
                self._rows[doc_id], remote_changed_at=changed_at, remote_changed_by=changed_by
            )

    async def ensure_document(self, doc_id: str) -> None:
        """Make an (empty) local copy of a document the relay told us about."""
        kind = kind_of(doc_id)
        async with self._lock:
            self._check_open()
            if doc_id not in self._rows:
                await self._insert_row(doc_id, kind, "", [])

    # -- prices ------------------------------------------------------------------------------

    async def apply_prices(
        self, points: Iterable[PricePoint], *, snapshot: bool = False
    ) -> list[Quote]:
        """Keep prices from the relay (newest wins); listeners of ``quotes`` hear at once.

        Quotes reach the file in the background, coalesced (at most every
        ``QUOTE_FLUSH_SECONDS`` and on close): a sync connection must read its next frame, which
        may be an acknowledgement, rather than wait for a disk write per price batch. A quote lost
        to a crash is only a cache entry; the relay sends the latest again on the next subscribe.
        """
        self._check_open()
        changed = self.quotes.merge(points, snapshot=snapshot)
        if changed:
            self._dirty_quotes.update((q.symbol, q) for q in changed)
            if self._quote_flush is None or self._quote_flush.done():
                self._quote_flush = asyncio.get_running_loop().create_task(self._flush_quotes())
            self.quotes.notify(changed)
        return changed

    async def _flush_quotes(self, delay: float | None = None) -> None:
        await asyncio.sleep(QUOTE_FLUSH_SECONDS if delay is None else delay)
        dirty, self._dirty_quotes = self._dirty_quotes, {}
        if not dirty:
            return
        try:
            await self._store.save_quotes(
                [
                    (
                        q.symbol,
                        decimal_to_str(q.price),
                        q.time_ms,
                        q.seq,
                        None if q.previous_close is None else decimal_to_str(q.previous_close),
                    )
                    for q in dirty.values()
                ]
            )
        except BaseException as exc:  # cancelled by close() or failed: the next flush saves them
            for symbol, quote in dirty.items():
                self._dirty_quotes.setdefault(symbol, quote)
            if not isinstance(exc, ReplicaError):
                raise
            # A full disk, say. Prices are a cache (the relay sends the latest again on the next
            # subscribe): showing them live matters more than keeping them, so no error.
            level = logging.DEBUG if self._quotes_unsaved else logging.WARNING
            self._quotes_unsaved = True  # said once, not at every flush
            log.log(level, "prices not saved in %s: %s", self.path, exc)

    async def followed_symbols(self) -> set[str]:
        """The symbols of every watchlist and every open position: what this device follows."""
        symbols: set[str] = set()
        for info in self.documents():
            if info.kind is DocumentKind.WATCHLIST:
                symbols.update((await self.watchlist(info.id)).symbols)
            elif info.kind is DocumentKind.PORTFOLIO:
                positions = (await self.portfolio(info.id)).positions()
                symbols.update(s for s, p in positions.items() if p.quantity)
        return symbols

    # -- other processes ---------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read what other processes committed to the file now (the watcher does it by itself
        every ``watch_interval``); their changes are notified with ``origin="other-process"``."""
        async with self._lock:
            self._check_open()
            await self._catch_up()

    async def _watch_file(self, interval: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                if not await self._store.data_changed():
                    continue
                async with self._lock:
                    if self._closed:
                        return
                    await self._catch_up()
            except FolioSyncError as exc:  # busy or unreadable for now: the next look tries again
                self._store.forget_data_version()  # ...and reads, though the counter moved on
                log.debug("reading other processes' changes of %s failed: %s", self.path, exc)
            except Exception:  # a bug must not stop the watching for good, nor end silently
                self._store.forget_data_version()
                log.exception("reading other processes' changes of %s failed", self.path)
                await asyncio.sleep(1)

    def _bases(self) -> dict[str, int]:
        return {doc_id: loaded.base_seq for doc_id, loaded in self._loaded.items()}

    async def _catch_up(self) -> None:
        self._apply_changes(
            await self._store.changes_since(
                self._seen_seq,
                self._bases(),
                loaded_epochs=self._epochs(),
                refusals_after=self._seen_refusal,
            )
        )

    async def _after_commit(self, first: int, last: int) -> bool:
        """Rows ``first``..``last`` were just committed by this process: rows of others below
        them are read and notified first, so that notifications keep the log's order.

        False if they could not be read: the watcher notifies them later, so the caller must
        not hand its rows out as the next to send (a sync connection then reads what is unsent).
        """
        if first > self._seen_seq + 1:
            try:
                changes = await self._store.changes_since(
                    self._seen_seq,
                    self._bases(),
                    before=first,
                    loaded_epochs=self._epochs(),
                    refusals_after=self._seen_refusal,
                )
            except FolioSyncError as exc:
                log.debug("reading other processes' changes of %s failed: %s", self.path, exc)
                return False
            self._apply_changes(changes)
        self._seen_seq = max(self._seen_seq, last)
        return True

    def _apply_changes(
        self, changes: StoreChanges, *, defer: list[Callable[[], None]] | None = None
    ) -> None:
        """Bring memory up to ``changes`` (read from the file in one snapshot) and notify.

        Called with the lock held. Nothing here awaits, so that the compaction that calls it
        inside its write transaction holds a consistent picture; that one passes ``defer``,
        which receives the notifying instead, to run after COMMIT (listeners' work must not
        lengthen the time every other process waits for the write lock).
        """
        self._rows = {row.id: row for row in changes.documents}
        self._pending = dict(changes.pending)
        self._meta.update(changes.meta)
        notices: list[DocumentChange] = []
        for doc_id in [d for d in self._loaded if d not in self._rows]:
            self._forget(doc_id)  # another process dropped it (a creation the relay refused)
            notices.append(DocumentChange(doc_id, kind_of(doc_id), "other-process"))
        for doc_id, rebuilt in changes.rebuilt.items():  # rolled back: replace, never merge
            loaded = self._loaded.get(doc_id)
            if loaded is not None and self._replace(doc_id, loaded, rebuilt):
                notices.append(DocumentChange(doc_id, kind_of(doc_id), "other-process"))
        refused = [_refusal(r) for r in changes.refusals if r.id > self._seen_refusal]
        for refusal_row in changes.refusals:
            if refusal_row.id > self._seen_refusal:
                self._remember_refusal(refusal_row)
        for doc_id, state in changes.states.items():  # compacted past what we saw: merge first
            loaded = self._loaded.get(doc_id)
            if loaded is not None and self._merge_into(doc_id, loaded, state):
                notices.append(DocumentChange(doc_id, kind_of(doc_id), "other-process"))
            if loaded is not None:
                loaded.base_seq = changes.bases.get(doc_id, loaded.base_seq)
        for row in changes.rows:
            self._seen_seq = max(self._seen_seq, row.seq)
            if row.doc_id not in self._rows:
                continue  # a document row always comes with its first updates; not this one
            kind = DocumentKind(self._rows[row.doc_id].kind)
            loaded = self._loaded.get(row.doc_id)
            changed = True
            if loaded is not None:
                changed = self._merge_into(row.doc_id, loaded, row.data)
                loaded.max_seq = max(loaded.max_seq, row.seq)
            if row.pending:
                notices.append(DocumentChange(row.doc_id, kind, "other-process", row.seq, row.data))
            elif changed:
                notices.append(DocumentChange(row.doc_id, kind, "other-process"))
        quotes = self.quotes.merge(_points_from_rows(changes.quotes))

        def announce() -> None:
            for notice in notices:
                self._notify(notice)
            for refusal in refused:
                self._notify_refusal(refusal)
            if quotes:
                self.quotes.notify(quotes)

        if defer is None:
            announce()
        else:
            defer.append(announce)

    def _replace(self, doc_id: str, loaded: _Loaded, rebuilt: RebuiltDocument) -> bool:
        """Replace a loaded document by the file's copy after another process rolled it back
        (merging would bring the refused change back); True if it could be read."""
        doc: Doc[Any] = Doc()  # a new client id: the old one's clocks may follow refused ones
        try:
            if rebuilt.state:
                doc.apply_update(rebuilt.state)
            for update in rebuilt.rows:
                doc.apply_update(update)
        except BaseException as exc:  # pycrdt panics derive from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                raise
            log.error("document %s in %s cannot be read after a rollback", doc_id, self.path)
            return False
        self._rebind(doc_id, loaded, doc)
        loaded.base_seq = rebuilt.base_seq
        loaded.max_seq = max(loaded.max_seq, rebuilt.max_seq)
        loaded.epoch = rebuilt.epoch
        return True

    def _merge_into(self, doc_id: str, loaded: _Loaded, update: bytes) -> bool:
        """Apply another process's update to a loaded document; True if it changed."""
        captured: list[bytes] = []
        loaded.capture = captured
        try:
            loaded.model.doc.apply_update(update)
        except BaseException as exc:  # pycrdt panics derive from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                raise
            log.error("an update of %s in %s cannot be read; skipped", doc_id, self.path)
            return False
        finally:
            loaded.capture = None
        return bool(captured)

    # -- notifications -----------------------------------------------------------------------

    def subscribe(self, listener: Callable[[DocumentChange], None]) -> Callable[[], None]:
        """Call ``listener`` after every committed change; returns a function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    async def changes(self) -> AsyncIterator[DocumentChange]:
        """Iterate over changes as they are committed (until the replica closes)."""
        queue: asyncio.Queue[DocumentChange] = asyncio.Queue()
        unsubscribe = self.subscribe(queue.put_nowait)
        try:
            while not self._closed:
                yield await queue.get()
        finally:
            unsubscribe()

    def _notify(self, change: DocumentChange) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # an app's listener must not break the engine
                log.exception("change listener failed")

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ReplicaCorrupt("the replica is closed")

    def _id_of(self, model: DocumentModel) -> str:
        for doc_id, loaded in self._loaded.items():
            if loaded.model is model:
                return doc_id
        raise DocumentNotFound("that document is not open in this replica")

    async def _create(self, kind: DocumentKind, name: str, model_type: type[M]) -> M:
        name = normalize_name(name)
        doc_id = document_id(kind, name)
        async with self._lock:
            self._check_open()
            index = await self._load(INDEX_DOCUMENT_ID)
            existing = self._rows.get(doc_id)
            if existing is not None and existing.name:
                raise DocumentExists(f"a {kind.value} named {existing.name!r} exists already")
            if existing is not None:
                # Known from the relay but not filled in yet: creating it merges with it.
                loaded = await self._load(doc_id)
                await self._apply_local(doc_id, loaded, lambda m: m.initialize(name))
                await self._store.rename(doc_id, name)
                self._rows[doc_id] = _replace_row(existing, name=name)
                await self._apply_local(
                    INDEX_DOCUMENT_ID, index, lambda m: m.register(doc_id, kind, name)
                )
            else:
                loaded = await self._create_new(doc_id, kind, name, model_type, index)
            model = loaded.model
        assert isinstance(model, model_type)
        return model

    async def _create_new(
        self, doc_id: str, kind: DocumentKind, name: str, model_type: type[M], index: _Loaded
    ) -> _Loaded:
        """A new document and its index entry, committed in one transaction."""
        for _attempt in range(3):
            loaded = _Loaded(model_type(Doc(), self._context))
            self._watch(loaded)
            captured = self._capture(loaded, lambda m: m.initialize(name))
            listed = self._capture(index, lambda m: m.register(doc_id, kind, name))
            row = DocumentRow(doc_id, kind.value, name, wall_ms(), None, None, None)
            updates = [(doc_id, u) for u in captured] + [(INDEX_DOCUMENT_ID, u) for u in listed]
            try:
                seqs = await self._store.create_document(
                    row, b"", updates, epochs={INDEX_DOCUMENT_ID: index.epoch} if listed else None
                )
            except BaseException:
                loaded.model.close()
                await self._reload(INDEX_DOCUMENT_ID)
                raise
            if seqs is None:  # another process rolled the index back: list it on the new one
                loaded.model.close()
                await self._reload(INDEX_DOCUMENT_ID)
                index = await self._load(INDEX_DOCUMENT_ID)
                continue
            self._rows[doc_id] = row
            self._loaded[doc_id] = loaded
            loaded.max_seq = max(seqs[: len(captured)], default=0)
            self._pending[doc_id] = self._pending.get(doc_id, 0) + len(captured)
            self._pending[INDEX_DOCUMENT_ID] = self._pending.get(INDEX_DOCUMENT_ID, 0) + len(listed)
            if seqs:
                await self._after_commit(seqs[0], seqs[-1])
            self._notify(DocumentChange(doc_id, kind, "local"))
            self._notify(DocumentChange(INDEX_DOCUMENT_ID, DocumentKind.INDEX, "local"))
            return loaded
        raise ReplicaError("the list of documents keeps being rolled back by another process")

    def _capture(self, loaded: _Loaded, change: Callable[[Any], object]) -> list[bytes]:
        captured: list[bytes] = []
        loaded.capture = captured
        try:
            change(loaded.model)
        finally:
            loaded.capture = None
        return captured

    def _watch(self, loaded: _Loaded) -> None:
        def on_transaction(event: TransactionEvent) -> None:
            if loaded.capture is not None:
                loaded.capture.append(event.update)

        loaded.subscription = loaded.model.doc.observe(on_transaction)

    # (the model's own observer, which counts versions, is removed by model.close())

    async def _insert_row(
        self, doc_id: str, kind: DocumentKind, name: str, updates: list[tuple[str, bytes]]
    ) -> None:
        row = DocumentRow(doc_id, kind.value, name, wall_ms(), None, None, None)
        seqs = await self._store.create_document(row, b"", updates, if_absent=not updates) or []
        self._rows[doc_id] = row
        if seqs:
            await self._after_commit(seqs[0], seqs[-1])

    async def _model(self, doc_id: str, model_type: type[M]) -> M:
        async with self._lock:
            self._check_open()
            loaded = await self._load(doc_id)
        model = loaded.model
        assert isinstance(model, model_type)
        return model

    async def _load(self, doc_id: str) -> _Loaded:
        loaded = self._loaded.get(doc_id)
        if loaded is not None:
            return loaded
        stored = await self._store.load(doc_id)
        if stored is None:
            raise DocumentNotFound(f"no document {doc_id!r}")
        state, updates, max_seq, base_seq, epoch = stored
        doc: Doc[Any] = Doc()  # its own random client id: see the module docstring
        try:
            if state:
                doc.apply_update(state)
            for update in updates:
                doc.apply_update(update)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                raise
            raise ReplicaCorrupt(f"document {doc_id} in {self.path} cannot be read") from exc
        kind = DocumentKind(self._rows[doc_id].kind)
        loaded = _Loaded(_MODELS[kind](doc, self._context))
        loaded.max_seq = max_seq
        loaded.base_seq = base_seq
        loaded.epoch = epoch
        loaded.rows_since_compaction = len(updates)
        loaded.bytes_since_compaction = sum(len(u) for u in updates)
        self._watch(loaded)
        self._loaded[doc_id] = loaded
        return loaded

    async def _reload(self, doc_id: str) -> None:
        """Drop what memory holds beyond the file: read the document back from it.

        The model object survives, rebound to the document read back, so that the handles an
        app holds keep working and show what the file holds, not the change that failed.
        """
        loaded = self._loaded.pop(doc_id, None)
        if loaded is None:
            return
        model = loaded.model
        model.doc.unobserve(loaded.subscription)
        model.close()
        try:
            fresh = await self._load(doc_id)
        except FolioSyncError:
            return  # not readable now: the next use of the document tries again
        fresh.model.doc.unobserve(fresh.subscription)
        fresh.model.close()
        type(model).__init__(model, fresh.model.doc, self._context)
        fresh.model = model
        self._watch(fresh)

    async def _apply_local(self, doc_id: str, loaded: _Loaded, change: Callable[[Any], R]) -> R:
        for _attempt in range(3):
            captured: list[bytes] = []
            loaded.capture = captured
            try:
                result = change(loaded.model)
            except BaseException:
                loaded.capture = None
                if captured:  # the change failed half-way: drop what it wrote in memory
                    await self._reload(doc_id)
                raise
            loaded.capture = None
            if not captured:
                return result
            update = captured[0] if len(captured) == 1 else merge_updates(*captured)
            try:
                seq = await self._store.append_local(doc_id, update, loaded.epoch)
            except BaseException:
                await self._reload(doc_id)
                raise
            if seq is None:
                # Another process rolled the document back since this one read it: the edit,
                # made on the old copy, may build on the refused change. Read the document back
                # (rebinding the model) and make the edit again on it.
                await self._reload(doc_id)
                if doc_id not in self._loaded:
                    if await self._store.load(doc_id) is None:  # dropped by another process
                        self._forget(doc_id)
                        raise DocumentNotFound(f"no document {doc_id!r} any more")
                    raise ReplicaError(f"document {doc_id} cannot be read after a rollback")
                loaded = self._loaded[doc_id]
                continue
            self._pending[doc_id] = self._pending.get(doc_id, 0) + 1
            self._account(doc_id, loaded, seq, len(update))
            in_order = await self._after_commit(seq, seq)
            kind = DocumentKind(self._rows[doc_id].kind)
            if in_order:
                self._notify(DocumentChange(doc_id, kind, "local", seq, update))
            else:  # no update: a sync connection reads every unsent row, in order
                self._notify(DocumentChange(doc_id, kind, "local"))
            return result
        raise ReplicaError(f"document {doc_id} keeps being rolled back by another process")

    def _account(self, doc_id: str, loaded: _Loaded, seq: int, size: int) -> None:
        loaded.max_seq = max(loaded.max_seq, seq)
        loaded.rows_since_compaction += 1
        loaded.bytes_since_compaction += size
        if (
            loaded.rows_since_compaction >= COMPACT_AFTER_ROWS
            or loaded.bytes_since_compaction >= COMPACT_AFTER_BYTES
        ):
            loaded.rows_since_compaction = 0
            loaded.bytes_since_compaction = 0
            task = asyncio.get_running_loop().create_task(self._compact(doc_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def compact(self, doc_id: str) -> None:
        """Fold a document's log into its snapshot now (it also happens by itself)."""
        await self._compact(doc_id)

    async def _compact(self, doc_id: str) -> None:
        async with self._lock:
            if self._closed or doc_id not in self._loaded:
                return
            loaded = self._loaded[doc_id]
            announcements: list[Callable[[], None]] = []

            def fold(changes: StoreChanges) -> bytes:
                # every committed edit, then the state of them all; notified after COMMIT
                self._apply_changes(changes, defer=announcements)
                return loaded.model.doc.get_update()

            try:
                loaded.base_seq = await self._store.compact(
                    doc_id,
                    self._seen_seq,
                    self._bases(),
                    fold,
                    # Pending rows are never merged: a refusal names one of them, and rolling
                    # back a merged row would take the valid edits merged with it.
                    settle=_settle,
                    loaded_epochs=self._epochs(),
                    refusals_after=self._seen_refusal,
                )
                loaded.max_seq = max(loaded.max_seq, loaded.base_seq)
            finally:  # memory holds those rows even if the compaction rolled back: say so
                for announce in announcements:
                    announce()

    async def _drop_unlisted(self, listed: set[str]) -> list[str]:
        """Of the documents the index listed before a change from the relay, those it lists no
        more and of which this replica holds nothing (adopted from the entry, never filled in:
        another device removed the entry of a document the relay never took): their rows go,
        so that this device lists no document the relay does not hold. Returns them."""
        index = self._loaded[INDEX_DOCUMENT_ID].model
        assert isinstance(index, UserIndex)
        dropped = []
        for doc_id in sorted(listed - {e.id for e in index.entries()}):
            unfilled = doc_id in self._rows and not self._pending.get(doc_id)
            if unfilled and await self._store.drop_if_empty(doc_id):
                self._forget(doc_id)
                dropped.append(doc_id)
        return dropped

    async def _adopt_index_entries(self) -> None:
        """Create local rows for documents another device listed in the index."""
        index = self._loaded[INDEX_DOCUMENT_ID].model
        assert isinstance(index, UserIndex)
        for entry in index.entries():
            if entry.id not in self._rows:
                await self._insert_row(entry.id, entry.kind, entry.name, [])
            elif not self._rows[entry.id].name:
                self._rows[entry.id] = _replace_row(self._rows[entry.id], name=entry.name)
                await self._store.rename(entry.id, entry.name)


def _holds_nothing(update: bytes) -> bool:
    """Whether ``update`` carries no item at all (``00 00``, or deletions alone)."""
    doc: Doc[Any] = Doc()
    try:
        doc.apply_update(update)
    except BaseException as exc:  # pycrdt panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise
        return False  # not readable: applying it says so, with its own error
    return not decode_state_vector(doc.get_state())


def _settle(confirmed: bytes, rows: list[bytes]) -> bytes:
    """The confirmed state with settled rows folded in (compaction deletes them next)."""
    doc: Doc[Any] = Doc()
    if confirmed:
        doc.apply_update(confirmed)
    for row in rows:
        doc.apply_update(row)
    return doc.get_update()


def _confirmed_doc(confirmed: bytes | None, settled: list[bytes]) -> Doc[Any] | None:
    """The document as the relay confirmed it (as far as this device knows); None if unknown
    (a replica older than schema 3 whose snapshot holds pending rows) or unreadable."""
    if confirmed is None:
        return None
    doc: Doc[Any] = Doc()
    try:
        if confirmed:
            doc.apply_update(confirmed)
        for row in settled:
            doc.apply_update(row)
    except BaseException as exc:  # pycrdt panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise
        return None
    return doc


def _lacks_more(
    known: Doc[Any] | None,
    theirs: dict[int, int],
    relay_update: bytes | None,
) -> bool:
    """Whether a relay at state vector ``theirs`` lacks confirmed content ``known`` (or its
    deletions) that no pending row brings: it was restored from an old backup, say. Unknown:
    yes, so one merged diff is sent, as always."""
    if known is None:
        return True
    ours = decode_state_vector(known.get_state())
    if any(clock > theirs.get(client, 0) for client, clock in ours.items()):
        return True
    return relay_update is not None and _deletions_missing(known, relay_update)


def _deletions_missing(doc: Doc[Any], relay_update: bytes) -> bool:
    """Whether ``doc``'s delete set holds deletions the relay's (in its SyncReply) lacks: a
    removal made after a backup the relay was restored from changes no state vector. Both sets,
    stripped of structs, are compared merged: merging the relay's with ours gives the relay's
    unless ours adds some."""
    deletions = doc.get_update(doc.get_state())
    try:
        theirs = get_update(relay_update, doc.get_state())
    except ValueError:  # not an update we can read: the state vector decides
        return False
    return bool(merge_updates(theirs, deletions) != merge_updates(theirs, theirs))


def _quotes_from_rows(rows: list[tuple[str, str, int, int, str | None]]) -> list[Quote]:
    quotes = []
    for symbol, price, time_ms, seq, previous in rows:
        try:
            close = None if previous is None else Decimal(previous)
            quotes.append(Quote(symbol, Decimal(price), time_ms, seq, close))
        except (ArithmeticError, ValueError):
            continue  # a damaged row is dropped: the relay sends the price again
    return quotes


def _points_from_rows(rows: list[tuple[str, str, int, int, str | None]]) -> list[PricePoint]:
    points = []
    for symbol, price, time_ms, seq, _previous in rows:
        try:
            points.append(PricePoint(symbol, Decimal(price), time_ms, seq))
        except (ArithmeticError, ValueError):
            continue
    return points


def _replace_row(row: DocumentRow, **changes: Any) -> DocumentRow:
    """``row`` with the given fields changed; None means "leave as it is"."""
    return dataclasses.replace(row, **{k: v for k, v in changes.items() if v is not None})
