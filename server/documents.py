"""The relay's documents in memory: loaded on demand, kept hot up to a bound, stored before acked.

Every incoming update is checked first: its bytes (a Yjs V1 update, nothing trailing, every item
it refers to held here: :func:`foliosync.sync.updates.check_update` against the document's state
vector), then, given a ``before_apply``, the document it would produce (``candidate``). Only then
is it applied to the in-memory pycrdt document and appended to the store; only when the append
returns is it acknowledged and fanned out. The checks and the in-memory apply of one document run
one update at a time (a lock per hot document), so that what was checked is what is applied.

The in-memory document therefore always holds at least everything stored, which is what makes
compaction safe without a lock across the commit: a snapshot taken now covers every update
stored so far.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, TransactionEvent

from foliosync.server.storage import RelayStore, RelayStoreError, Watermark
from foliosync.sync.errors import BadUpdate, MissingDependencies
from foliosync.sync.model import DocumentKind
from foliosync.sync.model.schema import Candidate, ScratchObservers, advance_scratch
from foliosync.sync.updates import check_update, decode_state_vector

__all__ = [
    "SCRATCH_IDLE_S",
    "Applied",
    "BadUpdate",
    "RelayDocuments",
    "Staged",
    "diff_against",
    "drop_idle_scratches_every",
]

log = logging.getLogger(__name__)

SCRATCH_IDLE_S = 30.0
"""Seconds without a checked update after which a hot document's scratch replica is dropped."""


def diff_against(doc: Doc[Any], state_vector: bytes) -> bytes:
    """What ``doc`` holds beyond a peer's ``state_vector``; BadUpdate if it is not one.

    Decoded first: yrs reserves memory for the client count a state vector claims before it
    reads a single entry, so 12 hostile bytes held the event loop for seconds. The fuzzer's
    updates target calls this too, so that it exercises what a SyncRequest reaches."""
    decode_state_vector(state_vector)
    try:
        return doc.get_update(state_vector)
    except BaseException as exc:  # pycrdt's Rust panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise
        raise BadUpdate("the state vector is not valid") from exc


@dataclass(frozen=True, slots=True)
class Applied:
    changed: bool  # False when the relay had every part of it already
    watermark: Watermark
    version: int = 0
    """The document's change number after it (see :meth:`RelayDocuments.version`)."""
    recovered: bytes = b""
    """What the relay read back from its store before taking this update, because its copy
    lacked what the update builds on (another relay of a group stored it and did not fan it
    out, killed first): the caller fans it out too, or devices synced here would lack it."""
    concurrent: bool = False
    """It arrived while another connection's change of the document was applied and not yet
    stored, so not yet sent to its sender: the sender surely edited without that change (the
    "conflicts" an operator watches). A lower bound: an edit made offline, or after a change
    was sent to the sender but before it read it, is concurrent too and is not flagged. Only
    the client knows what it had read when it edited, and an Update carries no state vector;
    the relay could count "sent" changes, but a change sent is not a change seen."""


class Staged:
    """An update checked and applied in memory, its write under way (:meth:`RelayDocuments.stage`);
    :meth:`stored` returns once it is stored, what :meth:`RelayDocuments.apply` returns."""

    __slots__ = (
        "_documents",
        "concurrent",
        "earlier",
        "hot",
        "key",
        "recovered",
        "version",
        "watermark",
        "write",
    )

    def __init__(
        self,
        documents: RelayDocuments,
        key: tuple[str, str],
        hot: _Hot,
        version: int,
        write: asyncio.Future[int] | None,
        recovered: bytes,
        earlier: set[asyncio.Future[int]] | None = None,
        *,
        concurrent: bool = False,
        watermark: Watermark | None = None,
    ) -> None:
        self._documents = documents
        self.key = key
        self.hot = hot
        self.version = version  # the document's change number after it
        self.write = write  # None: nothing new (only ``earlier`` writes to wait for)
        self.recovered = recovered
        self.earlier = earlier or set()
        self.concurrent = concurrent
        self.watermark = watermark or hot.watermark  # the document's, once this is stored

    async def stored(self) -> Applied:
        """Once stored (RelayStoreError if the write failed: the document is then dropped from
        memory and reloaded on its next use)."""
        return await self._documents._stored(self)


@dataclass(slots=True)
class _Hot:
    doc: Doc[Any]
    watermark: Watermark
    stored_seq: int
    since_compaction: int
    writes: set[asyncio.Future[int]] = field(default_factory=set)  # appends under way
    changed: list[bool] = field(default_factory=list)
    subscription: object = None
    version: int = 0  # the relay-wide change number of its last change, or of its load
    # Changes applied in memory and not yet stored (so not yet fanned out): version -> origin.
    unsent: dict[int, str] = field(default_factory=dict)
    # Held from an update's checks to its apply in memory (not across its store).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A second replica of the document, advanced with every update it takes, in which the next
    # update's candidate is built: copying the document per update cost 4.7 ms at 200 symbols
    # and 57 ms at 2,000, this 0.3 to 1 ms. None until an update is checked, and after a
    # refusal (a CRDT update cannot be taken back): rebuilt by one copy then. Dropped too once
    # the document takes no update for a while (:meth:`RelayDocuments.drop_idle_scratches`):
    # a replica costs as much memory as the document itself.
    scratch: Doc[Any] | None = None
    scratch_size: int | None = None  # its encoded size, or a bound of it (None: unknown)
    scratch_used: float = 0.0  # time.monotonic() of its last use
    scratch_observers: ScratchObservers | None = None  # its roots' observers, once made

    def drop_scratch(self) -> None:
        self.scratch = None
        self.scratch_size = None
        self.scratch_observers = None


def _guarded_apply(doc: Doc[Any], update: bytes) -> None:
    try:
        doc.apply_update(update)
    except BaseException as exc:  # pycrdt's Rust panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise
        raise BadUpdate("the update is not a valid CRDT update") from exc


class RelayDocuments:
    """Hot documents keyed by (user, doc id)."""

    def __init__(self, store: RelayStore, *, max_hot: int = 1000, compact_after: int = 500) -> None:
        self._store = store
        self._max_hot = max(1, max_hot)
        self._compact_after = compact_after
        self._hot: OrderedDict[tuple[str, str], _Hot] = OrderedDict()
        self._loading: dict[tuple[str, str], asyncio.Future[_Hot]] = {}
        # Peers' changes of documents being loaded: the store read may have begun before the
        # peer's commit, so they are applied once the load is done, or the copy would lack them
        # for good (and refuse every later update that builds on them).
        self._peer_while_loading: dict[tuple[str, str], list[tuple[bytes, Watermark]]] = {}
        self._last_version = 0
        self.hits = 0  # documents found in memory
        self.misses = 0  # documents loaded from the store
        self.evictions = 0  # documents dropped from memory past max_hot

    @property
    def hot_count(self) -> int:
        return len(self._hot)

    async def _get(self, user: str, doc_id: str) -> _Hot:
        key = (user, doc_id)
        hot = self._hot.get(key)
        if hot is not None:
            self._hot.move_to_end(key)
            self.hits += 1
            return hot
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Hot] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        self._peer_while_loading[key] = []
        try:
            hot = await self._load(user, doc_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning if nobody else waits
            raise
        finally:
            del self._loading[key]
            missed = self._peer_while_loading.pop(key, [])
        for update, watermark in missed:  # no await since the load: nothing comes between
            try:
                _guarded_apply(hot.doc, update)
            except BadUpdate:
                log.error("a peer's change of %s cannot be applied; it stays in the store", doc_id)
            hot.watermark = watermark
        self.misses += 1
        hot.version = self._next_version()
        future.set_result(hot)
        self._hot[key] = hot
        self._evict()
        return hot

    async def _load(self, user: str, doc_id: str) -> _Hot:
        stored = await self._store.load(user, doc_id)
        doc: Doc[Any] = Doc()
        hot = _Hot(doc, Watermark(None, None), 0, 0)

        def on_change(_event: TransactionEvent) -> None:
            hot.changed.append(True)

        if stored is not None:
            try:
                if stored.snapshot:
                    doc.apply_update(stored.snapshot)
                for update in stored.updates:
                    doc.apply_update(update)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                    raise
                log.error("stored document %s of %s cannot be read", doc_id, user)
                raise BadUpdate(f"stored document {doc_id} cannot be read") from exc
            hot.watermark = stored.watermark
            hot.stored_seq = stored.last_seq
            hot.since_compaction = len(stored.updates)
        hot.subscription = doc.observe(on_change)
        return hot

    @staticmethod
    def _release(hot: _Hot) -> None:
        """Let a document that leaves memory be freed: pycrdt keeps an observer's callback, and
        the Doc with it, alive from its native side until it is unobserved, so every evicted
        document stayed in memory for good. Safe for an update still on its way to an evicted
        record: it checks the record is still the hot one (no await in between) before it
        applies, and reloads otherwise."""
        if hot.subscription is not None:
            hot.doc.unobserve(hot.subscription)  # type: ignore[arg-type]
            hot.subscription = None
        hot.drop_scratch()

    def _evict(self) -> None:
        """Drop least recently used documents past the bound (not those being stored)."""
        busy: list[tuple[tuple[str, str], _Hot]] = []
        while len(self._hot) > self._max_hot:
            key, hot = self._hot.popitem(last=False)
            if hot.writes:
                busy.append((key, hot))
            else:
                self._release(hot)
                self.evictions += 1
        for key, hot in busy:  # kept, at the cold end, until their appends return
            self._hot[key] = hot
            self._hot.move_to_end(key, last=False)

    async def state(
        self, user: str, doc_id: str, state_vector: bytes
    ) -> tuple[bytes, bytes, Watermark]:
        """(diff against ``state_vector``, the relay's state vector, the watermark)."""
        decode_state_vector(state_vector)  # refused before the document is even loaded
        hot = await self._get(user, doc_id)
        return diff_against(hot.doc, state_vector), hot.doc.get_state(), hot.watermark

    def _next_version(self) -> int:
        self._last_version += 1
        return self._last_version

    def version(self, user: str, doc_id: str) -> int:
        """The document's change number: relay-wide, increasing, new at every change applied in
        memory (before it is stored) and at every load; 0 for a document not in memory.

        A connection remembers the version of its SyncReply and of its own last update and
        gives it to :meth:`apply` as ``seen``. Every change stored after a connection's
        SyncRequest is fanned out to it as soon as :meth:`apply` returns, so the only changes of
        others it has not been sent are those applied here and not yet stored; an update is
        flagged concurrent if one of those is newer than ``seen``: its sender surely had not
        got that change. That test costs the sender one look at a small dict and costs the
        fan-out nothing per receiver. It is a lower bound (see :attr:`Applied.concurrent`).
        """
        hot = self._hot.get((user, doc_id))
        return 0 if hot is None else hot.version

    async def apply(
        self,
        user: str,
        doc_id: str,
        update: bytes,
        *,
        device: str,
        now_ms: int,
        seen: int | None = None,
        origin: str = "",
        kind: DocumentKind | None = None,
        before_apply: Callable[[Candidate], Awaitable[None]] | None = None,
    ) -> Applied:
        """Check, apply, store, then return: the caller may acknowledge once this returns.

        Refused before anything changes: bytes that are not a V1 update or have items the
        document lacks (BadUpdate and its subclasses), and whatever ``before_apply`` raises,
        given the document as it would be (a Candidate built in a scratch replica, only with
        ``kind``). ``origin`` (the sending connection) and ``seen`` (see :meth:`version`) make
        :attr:`Applied.concurrent`; without ``seen`` it is False."""
        staged = await self.stage(
            user,
            doc_id,
            update,
            device=device,
            now_ms=now_ms,
            seen=seen,
            origin=origin,
            kind=kind,
            before_apply=before_apply,
        )
        return await staged.stored()

    async def stage(
        self,
        user: str,
        doc_id: str,
        update: bytes,
        *,
        device: str,
        now_ms: int,
        seen: int | None = None,
        origin: str = "",
        kind: DocumentKind | None = None,
        before_apply: Callable[[Candidate], Awaitable[None]] | None = None,
    ) -> Staged:
        """:meth:`apply` up to its write: checked, applied in memory, its append to the store
        under way; :meth:`Staged.stored` waits for the append. A connection stages its next
        update while the last one is written, so that one device's updates share the store's
        commits instead of waiting for one each (acknowledged in order, each once stored)."""
        key = (user, doc_id)
        refreshed = False
        recovered = b""
        while True:
            hot = await self._get(user, doc_id)
            async with hot.lock:
                if self._hot.get(key) is not hot:
                    continue  # dropped (evicted, a failed write) while this update waited
                # Deletions of items this copy lacks are taken (Yjs keeps them pending, they hold
                # no content): a device may have one from another relay's order of events, and
                # refusing it would refuse every diff that device ever sends.
                try:
                    check_update(update, decode_state_vector(hot.doc.get_state()), deletions=False)
                except MissingDependencies:
                    if refreshed:
                        raise
                    # With a store shared by several relays, this copy may lack what another
                    # relay stored and has not (or never, if it was killed) fanned out: read
                    # the store into it once, then check again.
                    refreshed = True
                    recovered = await self._refresh(user, doc_id, hot)
                    check_update(update, decode_state_vector(hot.doc.get_state()), deletions=False)
                if before_apply is not None and kind is not None:
                    built = self._candidate(hot, kind, update)
                    try:
                        await before_apply(built)
                    except BaseException:
                        hot.drop_scratch()  # it holds the refused update
                        raise
                    hot.scratch_size = built.size_bound
                    if self._hot.get(key) is not hot:
                        continue
                hot.changed.clear()
                try:
                    _guarded_apply(hot.doc, update)
                except BadUpdate:
                    # yrs may have integrated part of it before it raised: memory would then hold
                    # what the store never will. Forget the document; the next use reloads it.
                    if self._hot.get(key) is hot:
                        del self._hot[key]
                    self._release(hot)
                    raise
                break
        changed = bool(hot.changed)
        hot.changed.clear()
        concurrent = False
        if changed:
            if seen is not None and hot.unsent:
                # Newest first (versions rise in insertion order): a connection's own updates
                # in flight are all seen, so this stops at once for a device's pipelined backlog.
                for v, o in reversed(hot.unsent.items()):
                    if v <= seen:
                        break
                    if o != origin:
                        concurrent = True
                        break
            hot.version = self._next_version()
        version = hot.version
        if not changed:
            # Nothing new in memory, but what it holds may come from a write still under way (the
            # same update resent by a reconnecting client): acknowledge only once that is stored.
            return Staged(self, key, hot, version, None, recovered, set(hot.writes))
        write = asyncio.ensure_future(self._store.append(user, doc_id, update, now_ms, device))
        hot.writes.add(write)
        hot.unsent[version] = origin
        return Staged(
            self,
            key,
            hot,
            version,
            write,
            recovered,
            concurrent=concurrent,
            watermark=Watermark(now_ms, device),
        )

    async def _stored(self, staged: Staged) -> Applied:
        key, hot, version, write = staged.key, staged.hot, staged.version, staged.write
        if write is None:
            earlier = staged.earlier
            if earlier:
                await asyncio.wait(earlier)  # wait() never cancels what it waits for
                if any(w.cancelled() or w.exception() is not None for w in earlier):
                    raise RelayStoreError(f"an earlier write to {key[1]} failed")
            return Applied(False, hot.watermark, version, staged.recovered)
        try:
            try:
                seq = await write
            except BaseException:
                # Memory may now hold what the store lacks: forget the document, reload on next
                # use.
                if self._hot.get(key) is hot:
                    del self._hot[key]
                    self._release(hot)
                raise
            finally:
                hot.writes.discard(write)
            hot.watermark = staged.watermark
            hot.stored_seq = max(hot.stored_seq, seq)
            hot.since_compaction += 1
            if hot.since_compaction >= self._compact_after:
                hot.since_compaction = 0
                await self._compact(key[0], key[1], hot)
        finally:
            hot.unsent.pop(version, None)  # the caller fans it out now, with no await in between
        return Applied(True, hot.watermark, version, staged.recovered, staged.concurrent)

    @staticmethod
    def _candidate(hot: _Hot, kind: DocumentKind, update: bytes) -> Candidate:
        """The document as ``update`` would make it, built in the hot document's scratch
        replica; the scratch is dropped if the update fails there (it may hold part of it)."""
        if hot.scratch is None:
            hot.scratch = Doc()
            hot.scratch.apply_update(hot.doc.get_update())
            hot.scratch_size = None
        hot.scratch_used = time.monotonic()
        observers = hot.scratch_observers
        if observers is None or not observers.observes(hot.scratch):
            observers = hot.scratch_observers = ScratchObservers(kind, hot.scratch)
        try:
            return advance_scratch(
                kind, hot.scratch, update, base_size=hot.scratch_size, observers=observers
            )
        except BaseException:
            hot.drop_scratch()
            raise

    def drop_idle_scratches(self, idle: float) -> int:
        """Drop the scratch replicas of documents that took no checked update for ``idle``
        seconds; returns how many. A replica spares a copy of the document per update while
        updates come in bursts (one edit after another: a copy costs 5 ms at 200 symbols, the
        replica 0.3 ms); between bursts it only holds as much memory again as its document
        (about 12 KiB for a small watchlist), so the next update after a pause pays one copy.
        Never for a document whose update is being checked (its lock held)."""
        deadline = time.monotonic() - idle
        dropped = 0
        for hot in self._hot.values():
            if hot.scratch is not None and hot.scratch_used <= deadline and not hot.lock.locked():
                hot.drop_scratch()
                dropped += 1
        return dropped

    def apply_peer(self, user: str, doc_id: str, update: bytes, watermark: Watermark) -> bool:
        """Apply an update another relay stored already (multi-relay fan-out); memory only."""
        hot = self._hot.get((user, doc_id))
        if hot is None:
            waiting = self._peer_while_loading.get((user, doc_id))
            if waiting is not None:  # being loaded: applied once the load is done
                waiting.append((update, watermark))
            return False  # not hot here: the next load reads it from the shared store
        hot.changed.clear()
        _guarded_apply(hot.doc, update)
        if hot.scratch is not None:
            # Validated where it came in: the scratch takes it as the document did. Dropping
            # it instead made the next checked update copy the whole document, at every
            # alternation of two relays' writers (a fifth of each relay's time).
            try:
                hot.scratch.apply_update(update)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
                    raise
                hot.drop_scratch()
            else:
                if hot.scratch_size is not None:
                    hot.scratch_size += len(update)
        hot.watermark = watermark
        changed = bool(hot.changed)
        hot.changed.clear()
        if changed:
            hot.version = self._next_version()
        return changed

    async def _refresh(self, user: str, doc_id: str, hot: _Hot) -> bytes:
        """Merge what the store holds of the document into its hot copy (a CRDT merge: what the
        copy has stays, nothing doubles); returns what that brought, b"" if nothing."""
        stored = await self._store.load(user, doc_id)
        if stored is None:
            return b""
        before = hot.doc.get_state()
        for update in [stored.snapshot, *stored.updates] if stored.snapshot else stored.updates:
            try:
                _guarded_apply(hot.doc, update)
            except BadUpdate:
                log.error("stored document %s of %s cannot be read", doc_id, user)
        hot.drop_scratch()
        hot.changed.clear()
        if hot.doc.get_state() == before:
            return b""
        hot.version = self._next_version()
        return hot.doc.get_update(before)

    async def reload_hot(self) -> list[tuple[str, str, bytes, Watermark]]:
        """Bring every hot document up to the shared store: what a relay of a group does when it
        may have missed peers' changes (away longer than the bus keeps them). Returns, for each
        document that changed, ``(user, doc id, what it lacked as one update, its watermark)``,
        for the connected devices. A document the store cannot read now is dropped from memory
        (loaded afresh at its next use) rather than served stale."""
        found: list[tuple[str, str, bytes, Watermark]] = []
        for key, hot in list(self._hot.items()):
            user, doc_id = key
            try:
                stored = await self._store.load(user, doc_id)
            except RelayStoreError as exc:
                log.warning("reloading %s failed (%s); it is reloaded at its next use", doc_id, exc)
                self._hot.pop(key, None)
                continue
            if stored is None or self._hot.get(key) is not hot:
                continue
            async with hot.lock:
                before = hot.doc.get_state()
                hot.changed.clear()
                try:
                    if stored.snapshot:
                        _guarded_apply(hot.doc, stored.snapshot)
                    for update in stored.updates:
                        _guarded_apply(hot.doc, update)
                except BadUpdate:
                    log.error("stored document %s of %s cannot be read", doc_id, user)
                    self._hot.pop(key, None)
                    continue
                changed = bool(hot.changed)
                hot.changed.clear()
                hot.drop_scratch()  # rebuilt from the document at its next checked update
                hot.stored_seq = max(hot.stored_seq, stored.last_seq)
                if changed:
                    hot.version = self._next_version()
                    hot.watermark = stored.watermark
                    found.append((user, doc_id, hot.doc.get_update(before), stored.watermark))
        return found

    async def snapshot(self, user: str, doc_id: str) -> bytes:
        """The whole document as one update (empty document: an empty update)."""
        hot = await self._get(user, doc_id)
        return hot.doc.get_update()

    async def _compact(self, user: str, doc_id: str, hot: _Hot) -> None:
        try:
            await self._store.compact(user, doc_id, hot.doc.get_update(), hot.stored_seq)
        except Exception:
            log.exception("compaction of %s failed; the update log is kept", doc_id)

    async def documents(self, user: str) -> list[str]:
        return await self._store.documents(user)


async def drop_idle_scratches_every(
    documents: RelayDocuments, idle: float = SCRATCH_IDLE_S
) -> None:
    """Run :meth:`RelayDocuments.drop_idle_scratches` every ``idle / 2`` seconds until cancelled,
    so that a replica outlives its last use by ``idle`` to ``1.5 * idle`` seconds."""
    while True:
        await asyncio.sleep(idle / 2)
        dropped = documents.drop_idle_scratches(idle)
        if dropped:
            log.debug("dropped %d idle scratch replicas", dropped)
