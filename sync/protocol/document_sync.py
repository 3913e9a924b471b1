"""The device's side of syncing documents, as pure state machines: inputs in, decisions out.

:class:`DocumentSync` is one document on one connection; :class:`DeviceSync` is the connection's
set of them plus the few facts of the connection as a whole (welcomed, one-shot). Neither awaits,
reads a clock or touches a replica: the client's shell feeds them what happened (a frame from the
relay, a local edit, the result of reading the replica) and executes the decisions they return,
in order, feeding back the results of those that read something::

    for decision in machine.receive(event, now_ms):
        match decision:
            case Send(data): ws.send_bytes(data)
            case ReadOutgoing(): machine.outgoing_read(decision, await replica.outgoing(...), ...)
            ...

One owner per fact. What this connection sent of a document (its SyncRequest, the highest seq,
the seqs in flight) lives in its :class:`DocumentSync`; the :class:`ClientSession` writes it as it
encodes those frames and consults it for the protocol's rules (an Update after the SyncRequest,
seqs that increase, an Ack only of a seq sent), so the two can never disagree.

Invariants the decisions keep (each one was a bug once):

- **Never skip a row below a sent seq.** The relay's Ack of seq N settles every pending row up to
  N, so seq N of a document is never sent while a lower pending row of it is unsent on this
  connection. Hence one sending path per document while its pending rows are read
  (:class:`ReadUnsent`): meanwhile a local change only marks the document dirty, and the read is
  repeated until no change came during one. The sends of the last read and the end of reading
  happen in one call, so nothing notified in between is missed.
- **An Ack never settles a row the relay did not store.** A row answered by a per-document Error
  (refused, to retry later, or awaiting a resync) is held: every later Ack of the document on the
  connection settles with it in ``keep`` (``Replica.acknowledge(doc, seq, keep=...)``).
- **Frames are handled strictly in order,** so a refusal is rolled back before any later Ack of
  the same document is settled.
- **A refusal rolls back only the change it names.** An Update carrying several rows (a merged
  diff) names none of them: its rows are held (:attr:`RefusalAction.SPLIT`) and go one Update
  each on the next connection. A row sent again under a borrowed seq (a retry, a resync's diff
  of one row) is what a refusal of that seq names.
- **The initial sync reads before it goes live.** A document takes local changes only once the
  SyncReply's outgoing rows were read: a change committed before that read is in it, one
  committed after is notified with a higher seq.

What a per-document Error with a seq means is :func:`refusal_action` (PROTOCOL.md section 5).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from foliosync.sync.errors import (
    AccessDenied,
    AuthError,
    FolioSyncError,
    LocalProtocolError,
    RemoteProtocolError,
)
from foliosync.sync.protocol.events import (
    Acked,
    ClientEvent,
    ErrorReceived,
    SyncReplied,
    UpdateReceived,
    Welcomed,
)
from foliosync.sync.protocol.frames import ErrorCode

if TYPE_CHECKING:
    from foliosync.sync.protocol.session import ClientSession

__all__ = [
    "INDEX_DOCUMENT",
    "ApplyRemote",
    "CheckSettled",
    "Decision",
    "DeviceSync",
    "DocumentPhase",
    "DocumentSync",
    "EnsureDocuments",
    "Fail",
    "MarkSynced",
    "ReadOutgoing",
    "ReadUnsent",
    "RefusalAction",
    "Report",
    "RequestNew",
    "RequestState",
    "RetryAfter",
    "Rollback",
    "Send",
    "Settle",
    "refusal_action",
]

RETRY_BASE_SECONDS = 1.0
"""The first wait before a change to retry later goes again on the same connection; it doubles
with every retry of the document's changes, up to RETRY_CAP_SECONDS."""
RETRY_CAP_SECONDS = 60.0
RETRIES_PER_CONNECTION = 8
"""After this many retries of a document on one connection, its changes wait for the next."""

INDEX_DOCUMENT = "index"
"""The user's index: a change of it may name documents to request (PROTOCOL.md 6.3)."""


class RefusalAction(Enum):
    """What the device does about an Update the relay answered with a per-document Error."""

    ROLLBACK = "rollback"
    """The change is refused for good: the replica rolls it back, keeping the others."""
    RESYNC = "resync"
    """The relay lacks what the update refers to: request the document again, send one merged
    diff of everything the relay lacks."""
    RETRY_LATER = "retry_later"
    """The change is not at fault: it stays pending, untouched by later Acks, and is sent again
    after a while on the same connection (as a new Update with a new seq), or on the next one."""
    SPLIT = "split"
    """A merged diff carrying several rows was refused for good: it names none of them, so they
    stay pending, untouched by later Acks, and the next connection sends them one Update each
    (after what the relay lacks besides them), so that a refusal names one."""


_RETRY_LATER = frozenset({ErrorCode.EXTENSION_FAILED, ErrorCode.AUTH_FAILED, ErrorCode.INTERNAL})
# Refusals of a document as a whole: the relay takes none of its changes, whatever they hold. Not
# of the index, which the relay keeps whatever it refuses of it (too_many_documents there refuses
# the entries that one change would add).
_WHOLE_DOCUMENT = frozenset({ErrorCode.TOO_MANY_DOCUMENTS})


def refusal_action(code: str) -> RefusalAction:
    """What an Error with a seq asks of the device, by its code.

    Any code this version does not know rolls the change back: a newer relay refuses for reasons
    an older device cannot name, and keeping a change the relay will never store would leave it
    pending, resent and refused on every connection, forever. ``not_found`` and ``forbidden``
    are for good too (that id is never stored)."""
    if code == ErrorCode.MISSING_DEPENDENCIES:
        return RefusalAction.RESYNC
    if code in _RETRY_LATER:
        return RefusalAction.RETRY_LATER
    return RefusalAction.ROLLBACK


class DocumentPhase(Enum):
    """Where one document is on one connection."""

    NEW = "new"
    """Known, not asked for yet."""
    REQUESTING = "requesting"
    """Its state vector is being read for the SyncRequest."""
    REQUESTED = "requested"
    """SyncRequest sent; the SyncReply's outgoing rows are not read yet."""
    LIVE = "live"
    """Initial sync done: local changes are sent as they come, remote ones applied."""
    CLOSED = "closed"
    """The relay will never sync it for this user (``forbidden``/``not_found`` of its
    SyncRequest): nothing more is waited for."""


# --- Decisions --------------------------------------------------------------------------------
# What the shell executes, in order. Those that read something say which method takes the result.


@dataclass(frozen=True, slots=True)
class Send:
    """Put these bytes on the socket now, in order with every other Send (no await before)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EnsureDocuments:
    """Make local copies of these documents (the Welcome listed them), then :class:`RequestNew`."""

    doc_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RequestNew:
    """List the replica's documents and pass them to :meth:`DeviceSync.documents_known`."""


@dataclass(frozen=True, slots=True)
class RequestState:
    """Read the document's state vector and pass it to :meth:`DeviceSync.state_vector_read`.
    ``merged``: the SyncReply is a resync, whose outgoing diff is one merged update."""

    doc: str
    merged: bool = False


@dataclass(frozen=True, slots=True)
class ApplyRemote:
    """Apply and store this update from the relay (nothing to feed back)."""

    doc: str
    update: bytes
    changed_at_ms: int | None
    changed_by: str | None


@dataclass(frozen=True, slots=True)
class ReadOutgoing:
    """``Replica.outgoing(doc, state_vector, relay_update, merged=merged)``; pass its Updates,
    each ``(seq, update, rows carried)``, and the document's pending count to
    :meth:`DeviceSync.outgoing_read`."""

    doc: str
    state_vector: bytes
    relay_update: bytes
    merged: bool


@dataclass(frozen=True, slots=True)
class ReadUnsent:
    """Read the document's pending rows (seq order); pass them and its pending count to
    :meth:`DeviceSync.unsent_read`."""

    doc: str


@dataclass(frozen=True, slots=True)
class Settle:
    """``Replica.acknowledge(doc, seq, keep=keep)`` (and record the watermark: the relay's newest
    change of it is now this device's); then :meth:`DeviceSync.acknowledged`."""

    doc: str
    seq: int
    keep: frozenset[int]


@dataclass(frozen=True, slots=True)
class Rollback:
    """``Replica.refuse(doc, seq, code, message, whole=whole)``; then
    :meth:`DeviceSync.rolled_back`. ``whole``: the relay refused the document itself, so that
    it takes no change of it (``too_many_documents``): every pending change of it goes at once,
    rather than each re-made and refused in turn."""

    doc: str
    seq: int
    code: str
    message: str
    whole: bool = False


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """After ``delay`` seconds (with the connection still up), pass the decisions of
    :meth:`DeviceSync.retry_due` on: the document's changes to retry later go again."""

    doc: str
    delay: float


@dataclass(frozen=True, slots=True)
class CheckSettled:
    """Pass the document's pending count to :meth:`DeviceSync.pending_is`."""

    doc: str


@dataclass(frozen=True, slots=True)
class MarkSynced:
    """Record in the replica that the document was in sync now (nothing pending, nothing in
    flight, everything of the relay applied)."""

    doc: str


@dataclass(frozen=True, slots=True)
class Report:
    """A non-fatal Error from the relay: log it and remember it as the last error."""

    code: str
    message: str
    doc: str | None
    seq: int | None


@dataclass(frozen=True, slots=True)
class Fail:
    """End the connection by raising ``error`` (after the decisions before it)."""

    error: FolioSyncError


Decision = (
    Send
    | EnsureDocuments
    | RequestNew
    | RequestState
    | ApplyRemote
    | ReadOutgoing
    | ReadUnsent
    | Settle
    | Rollback
    | RetryAfter
    | CheckSettled
    | MarkSynced
    | Report
    | Fail
)


class DocumentSync:
    """One document on one connection: what was sent, what is in flight, what the relay refused.

    Read-only from outside, except through :class:`DeviceSync` and the session's sending."""

    __slots__ = (
        "_covered",
        "_dirty",
        "_held",
        "_in_flight",
        "_in_sync",
        "_left_sync_at",
        "_merged",
        "_phase",
        "_reading",
        "_replies_due",
        "_requested",
        "_resent",
        "_retries",
        "_retry_due",
        "_retry_scheduled",
        "_sent_upto",
        "_synthetic",
        "acked_upto",
        "doc",
    )

    def __init__(self, doc: str) -> None:
        self.doc = doc
        self._phase = DocumentPhase.NEW
        self._requested = False
        self._sent_upto = 0
        self._in_flight: list[int] = []  # sent, neither acknowledged nor answered, increasing
        self.acked_upto = 0
        """Highest seq the relay acknowledged on this connection."""
        self._held: dict[int, RefusalAction] = {}
        self._synthetic: set[int] = set()
        # Seqs of merged diffs sent on this connection -> the pending rows each carries.
        self._merged: dict[int, tuple[int, ...]] = {}
        # A row sent again under a borrowed seq (a retry, a diff of one row): wire seq -> row.
        self._resent: dict[int, int] = {}
        self._retries = 0  # retries of this document's changes on this connection
        self._retry_scheduled = False  # a RetryAfter is waiting
        self._retry_due = False  # the next read of unsent rows also sends the rows to retry
        # Rows awaiting a resync -> the merged diff that carries them: only its Ack settles them.
        self._covered: dict[int, int] = {}
        self._replies_due: deque[bool] = deque()  # one per SyncRequest sent: is it a resync?
        self._reading = False
        self._dirty = False
        self._in_sync = False
        self._left_sync_at: int | None = None

    def __repr__(self) -> str:
        return (
            f"DocumentSync({self.doc!r}, {self._phase.value}, sent_upto={self._sent_upto}, "
            f"in_flight={self._in_flight}, held={sorted(self._held)})"
        )

    # --- What the session writes and checks (the one record of what was sent) ---------------

    @property
    def requested(self) -> bool:
        """Whether this connection sent the document's SyncRequest."""
        return self._requested

    @property
    def sent_upto(self) -> int:
        """Highest seq sent of the document on this connection (0: none)."""
        return self._sent_upto

    def _record_request(self) -> None:
        self._requested = True

    def _check_update(self, seq: int) -> None:
        if not self._requested:
            raise LocalProtocolError(
                f"Update of {self.doc!r} before its SyncRequest", code=ErrorCode.NOT_SYNCED
            )
        if seq <= self._sent_upto:
            raise LocalProtocolError(
                f"Update seq {seq} of {self.doc!r} after seq {self._sent_upto}: seqs must increase",
                code=ErrorCode.BAD_SEQ,
            )

    def _record_update(self, seq: int) -> None:
        self._sent_upto = seq
        self._in_flight.append(seq)

    # --- Read-only state ---------------------------------------------------------------------

    @property
    def phase(self) -> DocumentPhase:
        return self._phase

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Seqs sent and neither acknowledged nor answered by an Error, oldest first."""
        return tuple(self._in_flight)

    @property
    def held(self) -> Mapping[int, RefusalAction]:
        """Seqs the relay answered with an Error on this connection and that no Ack may settle,
        with what was done about them."""
        return MappingProxyType(self._held)

    @property
    def keep(self) -> frozenset[int]:
        """What every Ack of the document on this connection keeps pending."""
        return frozenset(self._held)

    @property
    def in_sync(self) -> bool:
        """Synced on this connection with nothing in flight and nothing pending (as last told)."""
        return self._in_sync

    @property
    def left_sync_at(self) -> int | None:
        """When (ms, as the shell told) an edit took the document out of sync on this
        connection: it was in sync until then, whatever its last confirmation says."""
        return self._left_sync_at

    @property
    def reading(self) -> bool:
        """Whether its pending rows are being read to send the unsent ones."""
        return self._reading

    @property
    def deferred(self) -> bool:
        """Whether rows wait for the next connection (retried later), so that this one has done
        what it can for the document once nothing is in flight."""
        return any(a is not RefusalAction.RESYNC for a in self._held.values())

    @property
    def quiet(self) -> bool:
        """Nothing more to do on this connection unless something new happens."""
        if self._phase is DocumentPhase.CLOSED:
            return True
        return (
            self._phase is DocumentPhase.LIVE
            and not self._in_flight
            and not self._replies_due
            and not self._reading
            and (self._in_sync or self.deferred)
        )


class DeviceSync:
    """The documents of one connection, and the decisions that keep them in sync.

    ``one_shot``: a sync that ends once everything is in sync (``SyncClient.sync_once``), where a
    document the relay forbids is an error rather than something to stop waiting for.
    """

    __slots__ = ("_session", "one_shot")

    def __init__(self, session: ClientSession, *, one_shot: bool = False) -> None:
        self._session = session
        self.one_shot = one_shot

    @property
    def session(self) -> ClientSession:
        return self._session

    @property
    def documents(self) -> Mapping[str, DocumentSync]:
        """Every document this connection knows of, by id (read-only)."""
        return self._session.documents

    def document(self, doc: str) -> DocumentSync:
        """The machine of ``doc`` (a new one, in phase NEW, if unknown)."""
        return self._session.document(doc)

    @property
    def welcomed(self) -> bool:
        """Whether the relay welcomed this connection (the session knows)."""
        return self._session.device is not None

    def in_sync(self, doc: str) -> bool:
        """Whether ``doc`` was in sync on this connection, as last told (until it ended)."""
        found = self.documents.get(doc)
        return found is not None and found.in_sync

    def left_sync_at(self, doc: str) -> int | None:
        found = self.documents.get(doc)
        return None if found is None else found.left_sync_at

    @property
    def quiet(self) -> bool:
        """Welcomed, every document known synced (or waiting for the next connection, or never
        to sync), nothing in flight: what a one-shot sync and ``wait_in_sync`` wait for."""
        documents = self.documents.values()
        return (
            self.welcomed
            and not self._session.closed
            and bool(self.documents)
            and all(d.quiet for d in documents)
        )

    # --- Inputs: frames --------------------------------------------------------------------

    def receive(self, event: ClientEvent) -> list[Decision]:
        """The decisions for one event of the session, handled strictly in order. Events that
        concern no document (prices, pings) give none: the shell handles those itself."""
        match event:
            case Welcomed(documents=documents):
                return [EnsureDocuments(tuple(documents)), RequestNew()]
            case SyncReplied(doc, update, state_vector, changed_at_ms, changed_by):
                d = self.document(doc)
                merged = d._replies_due.popleft() if d._replies_due else False
                return [
                    ApplyRemote(doc, update, changed_at_ms, changed_by),
                    ReadOutgoing(doc, state_vector, update, merged),
                ]
            case UpdateReceived(doc, _seq, update, changed_at_ms, changed_by):
                decisions: list[Decision] = [ApplyRemote(doc, update, changed_at_ms, changed_by)]
                known = self.documents.get(doc)
                if doc == INDEX_DOCUMENT or known is None or known.phase is DocumentPhase.NEW:
                    decisions.append(RequestNew())
                decisions.append(CheckSettled(doc))
                return decisions
            case Acked(doc, seq):
                return self._on_ack(self.document(doc), seq)
            case ErrorReceived():
                return self._on_error(event)
        return []

    def _on_ack(self, d: DocumentSync, seq: int) -> list[Decision]:
        for held, cover in list(d._covered.items()):  # their merged diff is stored
            if cover <= seq:
                del d._covered[held]
                d._held.pop(held, None)
        keep = {s for s in d._held if s <= seq}
        if seq in d._synthetic:  # a borrowed seq: no row of that seq was in what it carried
            keep.add(seq)
        if d._resent.pop(seq, None) is not None:  # a retry went through
            d._retries = 0
        d._in_flight = [s for s in d._in_flight if s > seq]
        d.acked_upto = max(d.acked_upto, seq)
        return [Settle(d.doc, seq, frozenset(keep))]

    def _on_error(self, event: ErrorReceived) -> list[Decision]:
        if event.fatal:  # the session is closed already; the shell ends the connection
            if event.code == ErrorCode.AUTH_FAILED:
                return [Fail(AuthError(f"the relay refused the token: {event.message}"))]
            return [
                Fail(
                    RemoteProtocolError(
                        f"the relay closed the session: {event.message}", code=event.code
                    )
                )
            ]
        decisions: list[Decision] = [Report(event.code, event.message, event.doc, event.seq)]
        if event.doc is None:
            return decisions
        d = self.documents.get(event.doc)
        if event.seq is not None and d is not None and event.seq in d._in_flight:
            return decisions + self._refused(d, event.seq, event.code, event.message)
        # No Update of ours named: it concerns the document (its SyncRequest), or a seq no
        # longer in flight (nothing of ours to change).
        if event.code == ErrorCode.AUTH_FAILED:
            decisions.append(
                Fail(AuthError(f"the relay refused the token for {event.doc}: {event.message}"))
            )
        elif event.code in (ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND) and event.seq is None:
            if self.one_shot:
                decisions.append(
                    Fail(AccessDenied(f"the relay refused {event.doc}: {event.message}"))
                )
            elif d is not None:  # never going to sync: stop waiting for it
                d._phase = DocumentPhase.CLOSED
                d._replies_due.clear()
                d._in_sync = True
        return decisions

    def _refused(self, d: DocumentSync, seq: int, code: str, message: str) -> list[Decision]:
        d._in_flight.remove(seq)
        action = refusal_action(code)
        row = d._resent.pop(seq, seq)  # the row a borrowed seq carried, if one
        carried = d._merged.get(seq, ())
        if action is RefusalAction.ROLLBACK and len(carried) > 1:
            # A merged diff names no one change (its seq is only the highest pending one):
            # rolling that row back would drop a change the relay may never have judged. Its
            # rows wait for the next connection, which sends them one Update each.
            action = RefusalAction.SPLIT
        for held in carried:
            if held not in d._held or action is RefusalAction.SPLIT:
                d._held[held] = action
        d._held[row] = action
        for held, cover in list(d._covered.items()):  # that Update did not carry them after all
            if cover == seq:
                del d._covered[held]
                if action in (RefusalAction.RETRY_LATER, RefusalAction.SPLIT):
                    d._held[held] = action
        if action is RefusalAction.ROLLBACK:
            whole = code in _WHOLE_DOCUMENT and d.doc != INDEX_DOCUMENT
            return [Rollback(d.doc, row, code, message, whole=whole)]
        if action is RefusalAction.RESYNC:
            if True in d._replies_due:  # a resync is on its way already; its diff covers this
                return []
            return [RequestState(d.doc, merged=True)]
        if action is RefusalAction.RETRY_LATER:
            return [CheckSettled(d.doc), *self._retry_later(d)]
        return [CheckSettled(d.doc)]

    def _retry_later(self, d: DocumentSync) -> list[Decision]:
        """A wait before the document's changes to retry later go again on this connection,
        doubling with each retry and bounded; none in a one-shot sync (it ends, and the next
        sync sends them) or past RETRIES_PER_CONNECTION (the next connection does)."""
        if self.one_shot or d._retry_scheduled or d._retries >= RETRIES_PER_CONNECTION:
            return []
        d._retry_scheduled = True
        delay = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**d._retries)
        d._retries += 1
        return [RetryAfter(d.doc, delay)]

    def retry_due(self, doc: str) -> list[Decision]:
        """The wait of a :class:`RetryAfter` is over: read the pending rows, to send the rows
        to retry later again, each as a new Update with the next unused seq. Its Ack settles
        the row (no earlier Ack does); a refusal of it is that row's."""
        d = self.document(doc)
        d._retry_scheduled = False
        if d._phase is not DocumentPhase.LIVE or self._session.closed:
            return []
        if not any(
            a is RefusalAction.RETRY_LATER and s not in d._covered for s, a in d._held.items()
        ):
            return []
        d._retry_due = True
        if d._reading:
            d._dirty = True
            return []
        d._reading = True
        return [ReadUnsent(doc)]

    # --- Inputs: the replica -----------------------------------------------------------------

    def documents_known(self, doc_ids: Iterable[str]) -> list[Decision]:
        """The replica's documents (after :class:`RequestNew`): those never asked for on this
        connection get a :class:`RequestState`."""
        decisions: list[Decision] = []
        for doc in doc_ids:
            d = self.document(doc)
            if d._phase is DocumentPhase.NEW:
                d._phase = DocumentPhase.REQUESTING
                decisions.append(RequestState(doc))
        return decisions

    def state_vector_read(self, decision: RequestState, state_vector: bytes) -> list[Decision]:
        """The state vector for a :class:`RequestState`: the SyncRequest to send."""
        d = self.document(decision.doc)
        if self._session.closed or d._phase is DocumentPhase.CLOSED:
            return []
        data = self._session.sync_request(decision.doc, state_vector)
        d._replies_due.append(decision.merged)
        if d._phase in (DocumentPhase.NEW, DocumentPhase.REQUESTING):
            d._phase = DocumentPhase.REQUESTED
        return [Send(data)]

    def outgoing_read(
        self,
        decision: ReadOutgoing,
        updates: Sequence[tuple[int, bytes, tuple[int, ...]]],
        pending: int,
        now_ms: int,
    ) -> list[Decision]:
        """The Updates ``Replica.outgoing`` gave for a :class:`ReadOutgoing`, each with the
        pending rows it carries: the document goes live and they are sent (those this
        connection has not sent, in order).

        A diff (of a resync, or the last Update, carrying no row) whose seq this connection
        sent already (a resync of rows sent on it) takes the next seq instead, marked as
        borrowed: its Ack keeps a row of that seq pending, since the diff was read before such
        a row. An Update carrying several rows is remembered as merged: a refusal of it names
        none of them (:attr:`RefusalAction.SPLIT`)."""
        d = self.document(decision.doc)
        if d._phase is DocumentPhase.CLOSED:
            return []
        d._phase = DocumentPhase.LIVE
        decisions: list[Decision] = []
        for index, (seq, update, carried) in enumerate(updates):
            last = index == len(updates) - 1
            if seq <= d._sent_upto:
                if not (decision.merged or (last and not carried)):
                    continue  # a row sent on this connection already
                seq = d._sent_upto + 1
                d._synthetic.add(seq)
                if len(carried) == 1:
                    d._resent[seq] = carried[0]
            decisions += self._send(d, seq, update, now_ms)
            if len(carried) > 1:
                d._merged[seq] = tuple(carried)
            if decision.merged:
                # The diff holds what the rows awaiting the resync brought: its Ack settles them.
                for held, action in d._held.items():
                    if action is RefusalAction.RESYNC and held < seq and held not in d._covered:
                        d._covered[held] = seq
        decisions += self._settle_check(d, pending)
        if decision.doc == INDEX_DOCUMENT:
            decisions.append(RequestNew())
        return decisions

    def local_change(
        self,
        doc: str,
        origin: Literal["local", "remote", "other-process"],
        seq: int,
        update: bytes,
        now_ms: int,
    ) -> list[Decision]:
        """A change committed to the replica (``DocumentChange``): what to send of it.

        A change without an update that is local (several rows at once, a rollback, rows of
        other processes that could not be read first) sends every unsent row, read afresh."""
        d = self.documents.get(doc)
        if origin == "remote" or d is None or d._phase is not DocumentPhase.LIVE:
            return []
        if self._session.closed:
            return []
        if d._reading:  # the read in progress reads again and sends it in order
            d._dirty = True
            return []
        if not update:
            if origin == "local":
                d._reading = True
                return [ReadUnsent(doc)]
            return []  # another process's change that is not a pending edit: nothing to send
        if seq <= d._sent_upto:
            if seq in d._synthetic:  # its seq was borrowed: it goes again under a new one
                d._held[seq] = RefusalAction.RETRY_LATER
                return self._retry_later(d)
            return []
        decisions = self._send(d, seq, update, now_ms)
        if doc == INDEX_DOCUMENT:
            decisions.append(RequestNew())
        return decisions

    def unsent_read(
        self, decision: ReadUnsent, rows: Sequence[tuple[int, bytes]], pending: int, now_ms: int
    ) -> list[Decision]:
        """The pending rows read for a :class:`ReadUnsent`: those above the highest sent go out,
        in seq order; if a change was notified during the read, another read follows."""
        d = self.document(decision.doc)
        decisions: list[Decision] = []
        still = {seq for seq, _update in rows}
        for gone in [seq for seq in d._held if seq not in still]:  # settled or rebased since
            del d._held[gone]
            d._covered.pop(gone, None)
        if not self._session.closed:
            for seq, update in rows:
                if seq > d._sent_upto:
                    decisions += self._send(d, seq, update, now_ms)
                elif seq in d._synthetic and seq not in d._held:
                    # Its seq went to an Update read before it (a borrowed one): it is not on
                    # the relay, and must go again under a new seq.
                    d._held[seq] = RefusalAction.RETRY_LATER
                    decisions += self._retry_later(d)
        if d._dirty and not self._session.closed:
            d._dirty = False
            return [*decisions, ReadUnsent(d.doc)]
        if d._retry_due and not self._session.closed:
            d._retry_due = False
            for seq, update in rows:  # above every row read, so that no Ack skips one
                if d._held.get(seq) is RefusalAction.RETRY_LATER and seq not in d._covered:
                    wire = d._sent_upto + 1
                    d._synthetic.add(wire)
                    d._resent[wire] = seq
                    d._covered[seq] = wire  # only the Ack of its retry settles it
                    decisions += self._send(d, wire, update, now_ms)
        d._reading = d._dirty = False
        decisions += self._settle_check(d, pending)
        if decision.doc == INDEX_DOCUMENT:
            decisions.append(RequestNew())
        return decisions

    def acknowledged(self, decision: Settle, pending: int) -> list[Decision]:
        """The replica settled what a :class:`Settle` named; ``pending`` is what is left."""
        return self._settle_check(self.document(decision.doc), pending)

    def rolled_back(
        self, decision: Rollback, pending: int, *, still_pending: bool = False
    ) -> list[Decision]:
        """The replica rolled back the row of a :class:`Rollback`, or had no such row any more:
        the document's unsent rows, rebased ones included, go out in seq order.

        ``still_pending``: the replica could not roll it back, so the row stays pending; every
        Ack on this connection keeps it, and the next connection sends it again."""
        d = self.document(decision.doc)
        if not still_pending:  # no row of that seq is pending any more: nothing to keep
            d._held.pop(decision.seq, None)
        if d._phase is not DocumentPhase.LIVE or self._session.closed:
            return []
        if d._reading:
            d._dirty = True
            return []
        d._reading = True
        return [ReadUnsent(d.doc)]

    def pending_is(self, decision: CheckSettled, pending: int) -> list[Decision]:
        """The pending count asked by a :class:`CheckSettled`."""
        return self._settle_check(self.document(decision.doc), pending)

    # --- Internals -------------------------------------------------------------------------

    def _send(self, d: DocumentSync, seq: int, update: bytes, now_ms: int) -> list[Decision]:
        data = self._session.update(d.doc, seq, update)  # records seq as sent and in flight
        if d._in_sync:  # in sync until now, not any more
            d._in_sync = False
            if d._left_sync_at is None:
                d._left_sync_at = now_ms
        return [Send(data)]

    def _settle_check(self, d: DocumentSync, pending: int) -> list[Decision]:
        if d._phase is not DocumentPhase.LIVE or d._in_flight or d._reading:
            return []
        if pending == 0:
            d._held.clear()  # no row left, so none to keep out of Acks either
            d._in_sync = True
            d._left_sync_at = None
            return [MarkSynced(d.doc)]
        d._in_sync = False
        return []
