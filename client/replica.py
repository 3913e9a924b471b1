"""The local replica: a device's documents, editable offline, every accepted edit durable.

An edit runs against the in-memory pycrdt document, and the update it produced is committed to
SQLite before the call returns. Edits are serialized (one lock per replica): a failed commit
(disk full, say) reloads the document from the file, so memory never holds a change the file lacks
and the device's pycrdt clock never runs ahead of what is stored.

Documents load lazily: opening a replica reads names and counters only, so a device with a
hundred large portfolios opens in milliseconds and pays for a document when it is first used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar

from pycrdt import Doc, TransactionEvent, get_update, merge_updates

from foliosync.client.documents import PortfolioHandle, WatchlistHandle
from foliosync.client.quotes import Quote, QuoteBook
from foliosync.client.store import DocumentRow, PendingUpdate, ReplicaStore
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

__all__ = ["DocumentChange", "DocumentInfo", "OpeningReplica", "Replica"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=DocumentModel)
R = TypeVar("R")

# Fold the update log into the snapshot after this many rows or bytes of a document.
COMPACT_AFTER_ROWS = 500
COMPACT_AFTER_BYTES = 1 << 20
# Write changed quotes to the file at most this often.
QUOTE_FLUSH_SECONDS = 0.5
# Merge a document's pending updates into one row past this many rows.
MERGE_PENDING_AFTER = 200

_MODELS: dict[DocumentKind, type[DocumentModel]] = {
    DocumentKind.WATCHLIST: Watchlist,
    DocumentKind.PORTFOLIO: Portfolio,
    DocumentKind.INDEX: UserIndex,
}


@dataclass(frozen=True, slots=True)
class DocumentChange:
    """A document changed: ``origin`` says whether by this device or by another (via a relay).

    A local change also carries the stored update and its sequence number, which is all a sync
    connection needs to send it on.
    """

    doc_id: str
    kind: DocumentKind
    origin: Literal["local", "remote"]
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


@dataclass(slots=True)
class _Loaded:
    model: DocumentModel
    capture: list[bytes] | None = None
    rows_since_compaction: int = 0
    bytes_since_compaction: int = 0
    max_seq: int = 0
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
        self.client_id = int(meta["client_id"])
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

    # -- life cycle --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, synchronous: str = "NORMAL") -> OpeningReplica:
        """Open (or create) the replica at ``path``: ``replica = await Replica.open(path)``, or
        ``async with Replica.open(path) as replica:`` to have it closed when the block ends.

        Raises ReplicaCorrupt, ReplicaLocked or SchemaTooNew without touching the file.
        """
        return OpeningReplica(cls._open(path, synchronous))

    @classmethod
    async def _open(cls, path: str | Path, synchronous: str) -> Replica:
        store = await ReplicaStore.open(path, synchronous=synchronous)
        try:
            meta = await store.get_meta()
            if "device_id" not in meta:
                meta = {
                    "device_id": uuid.uuid4().hex[:16],
                    # One pycrdt client id per device, kept across restarts: the exclusive lock
                    # guarantees a single writer, and a stable id keeps state vectors small.
                    "client_id": str(secrets.randbelow(2**31 - 2) + 1),
                    "created_at": str(wall_ms()),
                }
                await store.set_meta(meta)
            rows = await store.documents()
            replica = cls(store, meta, rows)
            replica.quotes = QuoteBook(_quotes_from_rows(await store.load_quotes()))
            replica._pending = await store.pending_counts()
            if INDEX_DOCUMENT_ID not in replica._rows:
                await replica._insert_row(INDEX_DOCUMENT_ID, DocumentKind.INDEX, "", [])
        except BaseException:
            await store.close()
            raise
        return replica

    async def close(self) -> None:
        if self._closed:
            return
        async with self._lock:
            self._closed = True
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
        return DocumentInfo(
            id=row.id,
            kind=DocumentKind(row.kind),
            name=row.name,
            pending=self._pending.get(row.id, 0),
            created_at=row.created_at,
            last_synced_at=row.last_synced_at,
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
        self, doc_id: str, relay_state_vector: bytes, relay_update: bytes | None = None
    ) -> tuple[int, bytes] | None:
        """What to send a relay whose state vector is ``relay_state_vector``, or None.

        Returns (seq, update): the update holds everything the relay lacks, and acknowledging
        ``seq`` settles every pending change up to it. Taken under the lock, so that the two agree.

        ``relay_update`` is the relay's SyncReply (already applied here): it carries the relay's
        whole delete set, the one thing a state vector does not show. With it, deletions the
        relay lost (restored from a backup) and that nothing pending would bring are sent too.
        """
        async with self._lock:
            self._check_open()
            loaded = await self._load(doc_id)
            doc = loaded.model.doc
            try:
                diff = doc.get_update(relay_state_vector)
            except ValueError as exc:
                raise ValidationError(f"invalid state vector for {doc_id}") from exc
            pending = await self._store.pending(doc_id)
            if pending:
                return max(p.seq for p in pending), diff
            # Nothing pending, but the relay may have lost data (restored from a backup): send
            # what it lacks if that is more than the delete set every diff carries...
            deletions = doc.get_update(doc.get_state())
            if diff != deletions:
                return max(loaded.max_seq, 1), diff
            # ... or if our delete set holds deletions the relay's lacks (a removal made after
            # the backup changes no state vector). Both sets, stripped of structs, are compared
            # merged: merging the relay's with ours gives the relay's unless ours adds some.
            if relay_update is not None:
                try:
                    theirs = get_update(relay_update, doc.get_state())
                except ValueError:  # not an update we can read: the state vector decides
                    return None
                if merge_updates(theirs, deletions) != merge_updates(theirs, theirs):
                    return max(loaded.max_seq, 1), diff
            return None

    async def pending_updates(self, doc_id: str | None = None) -> list[PendingUpdate]:
        """Local changes not yet acknowledged by a relay, oldest first."""
        self._check_open()
        return await self._store.pending(doc_id)

    async def acknowledge(self, doc_id: str, seq: int) -> None:
        """The relay stored every pending update of ``doc_id`` up to ``seq``."""
        async with self._lock:
            self._check_open()
            await self._store.acknowledge(doc_id, seq)
            pending = await self._store.pending(doc_id)
            self._pending[doc_id] = sum(p.changes for p in pending)

    async def apply_remote(
        self,
        doc_id: str,
        update: bytes,
        *,
        changed_at: int | None = None,
        changed_by: str | None = None,
    ) -> bool:
        """Apply and store an update that came from the relay; True if the document changed."""
        kind = kind_of(doc_id)
        async with self._lock:
            self._check_open()
            if doc_id not in self._rows:
                await self._insert_row(doc_id, kind, "", [])
            loaded = await self._load(doc_id)
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
            if doc_id == INDEX_DOCUMENT_ID and changed:
                await self._adopt_index_entries()
        if changed:
            self._notify(DocumentChange(doc_id, kind, "remote"))
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
                # A new document and its index entry are committed in one transaction.
                loaded = _Loaded(model_type(Doc(client_id=self.client_id), self._context))
                self._watch(loaded)
                captured = self._capture(loaded, lambda m: m.initialize(name))
                listed = self._capture(index, lambda m: m.register(doc_id, kind, name))
                row = DocumentRow(doc_id, kind.value, name, wall_ms(), None, None, None)
                updates = [(doc_id, u) for u in captured] + [(INDEX_DOCUMENT_ID, u) for u in listed]
                try:
                    await self._store.create_document(row, b"", updates)
                except BaseException:
                    loaded.model.close()
                    await self._reload(INDEX_DOCUMENT_ID)
                    raise
                self._rows[doc_id] = row
                self._loaded[doc_id] = loaded
                self._pending[doc_id] = self._pending.get(doc_id, 0) + len(captured)
                self._pending[INDEX_DOCUMENT_ID] = self._pending.get(INDEX_DOCUMENT_ID, 0) + len(
                    listed
                )
                self._notify(DocumentChange(doc_id, kind, "local"))
                self._notify(DocumentChange(INDEX_DOCUMENT_ID, DocumentKind.INDEX, "local"))
            model = loaded.model
        assert isinstance(model, model_type)
        return model

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
        await self._store.create_document(row, b"", updates)
        self._rows[doc_id] = row

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
        state, updates, max_seq = stored
        doc: Doc[Any] = Doc(client_id=self.client_id)
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
        if captured:
            update = captured[0] if len(captured) == 1 else merge_updates(*captured)
            try:
                seq = await self._store.append(doc_id, update, pending=True)
            except BaseException:
                await self._reload(doc_id)
                raise
            self._pending[doc_id] = self._pending.get(doc_id, 0) + 1
            self._account(doc_id, loaded, seq, len(update))
            kind = DocumentKind(self._rows[doc_id].kind)
            self._notify(DocumentChange(doc_id, kind, "local", seq, update))
        return result

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
            state = loaded.model.doc.get_update()
            await self._store.compact(doc_id, state, loaded.max_seq)
            pending = await self._store.pending(doc_id)
            if len(pending) > MERGE_PENDING_AFTER:
                merged = merge_updates(*(p.data for p in pending))
                seq = await self._store.replace_pending(doc_id, pending, merged)
                loaded.max_seq = max(loaded.max_seq, seq)

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


def _quotes_from_rows(rows: list[tuple[str, str, int, int, str | None]]) -> list[Quote]:
    quotes = []
    for symbol, price, time_ms, seq, previous in rows:
        try:
            close = None if previous is None else Decimal(previous)
            quotes.append(Quote(symbol, Decimal(price), time_ms, seq, close))
        except (ArithmeticError, ValueError):
            continue  # a damaged row is dropped: the relay sends the price again
    return quotes


def _replace_row(row: DocumentRow, **changes: Any) -> DocumentRow:
    """``row`` with the given fields changed; None means "leave as it is"."""
    return dataclasses.replace(row, **{k: v for k, v in changes.items() if v is not None})
