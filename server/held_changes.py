"""Changes held back during a wide fan-out, sent on as one merged update per document.

While one document's changes fan out to many connections at once (a busy watchlist followed by
hundreds of devices), each change sent on its own costs every receiver a frame to parse and a
CRDT update to apply, and the relay a frame per receiver: the receivers' side, not the relay's,
then bounds how fast the document may change. Held for the relay's flush delay instead, a
document's changes go out to each receiver as ONE Update, merged once for all of them
(``pycrdt.merge_updates``): a receiver's cost no longer grows with the edit rate, only with the
number of flushes. The merged update holds exactly what the changes held, so a device ends in the
same state; it carries the last change's ``changed_at`` and ``changed_by``, which is what a
device that applied them one by one would show.

A receiver that made one of the held changes itself (it is never echoed its own), or that synced
the document after the first of them was held, gets the changes meant for it one by one, as
before; that is the rare case (a second editor in the same 20 ms).

Once the first change of a flush was handed to every connection of its user, the document is
:attr:`HeldDocument.whole`: the next changes are appended once, not handed to each connection
again (a connection that syncs the document meanwhile joins it), so that holding costs the
relay one step per change, whatever the number of receivers.
"""

from __future__ import annotations

import logging
from typing import Generic, Protocol, TypeVar

from pycrdt import merge_updates

from foliosync.server.fanout import Change, websocket_binary_frame
from foliosync.sync.protocol import Update, encode_frame

__all__ = ["HeldChanges", "HeldDocument", "Receiver", "merged_change"]

log = logging.getLogger(__name__)


class Receiver(Protocol):
    """What a held change is sent on to: a connection (its id is a change's ``origin``)."""

    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=Receiver)


class HeldDocument(Generic[R]):
    """One document's changes held for the next flush, and who gets them."""

    __slots__ = ("changes", "receivers", "size", "whole")

    def __init__(self) -> None:
        self.changes: list[Change] = []
        # Receiver -> index of the first change it gets: a receiver joins a document's held
        # changes once, at the first of them delivered to it.
        self.receivers: dict[R, int] = {}
        self.size = 0  # bytes of the updates held
        # Every receiver of the document is in ``receivers`` (the first change was handed to
        # each; one that syncs the document later joins): the next changes are only appended.
        self.whole = False

    def add(self, receiver: R, change: Change) -> None:
        changes = self.changes
        # One publish hands the same change to every receiver in a row: kept once.
        if not changes or changes[-1] is not change:
            self.append(change)
        receivers = self.receivers
        if receiver not in receivers:
            receivers[receiver] = len(changes) - 1

    def append(self, change: Change) -> None:
        """A change for every receiver held already (see :attr:`whole`)."""
        self.changes.append(change)
        self.size += len(change.update)

    def join(self, receiver: R) -> None:
        """A receiver that synced the document now: it gets the changes held from now on."""
        self.receivers.setdefault(receiver, len(self.changes))

    def deliveries(self) -> list[tuple[R, list[Change]]]:
        """What each receiver gets, in the order they were first held: the whole run as one
        merged change when it gets all of it, else its changes one by one."""
        changes = self.changes
        if len(changes) == 1:
            return [(receiver, changes) for receiver in self.receivers]
        merged: list[Change] | None = None
        origins = {change.origin for change in changes}
        out: list[tuple[R, list[Change]]] = []
        for receiver, first in self.receivers.items():
            if first == 0 and receiver.id not in origins:
                if merged is None:
                    merged = _merged_or_each(changes)
                out.append((receiver, merged))
            else:
                own = receiver.id
                out.append((receiver, [c for c in changes[first:] if c.origin != own]))
        return out


class HeldChanges(Generic[R]):
    """The documents whose changes wait for the next flush, keyed by (owner, document id)."""

    __slots__ = ("_documents",)

    def __init__(self) -> None:
        self._documents: dict[tuple[str, str], HeldDocument[R]] = {}

    def __bool__(self) -> bool:
        return bool(self._documents)

    def get(self, user: str, doc_id: str) -> HeldDocument[R] | None:
        """The document's held changes, if some wait (the next change must wait too, or it
        would overtake them)."""
        return self._documents.get((user, doc_id))

    def hold(self, receiver: R, change: Change) -> HeldDocument[R]:
        key = (change.user, change.doc_id)
        document = self._documents.get(key)
        if document is None:
            document = self._documents[key] = HeldDocument()
        document.add(receiver, change)
        return document

    def release(self, change: Change) -> HeldDocument[R] | None:
        """Take ``change``'s document out of the held ones (to send it now)."""
        return self._documents.pop((change.user, change.doc_id), None)

    def take(self) -> list[HeldDocument[R]]:
        """Every held document, emptied out of here."""
        documents = list(self._documents.values())
        self._documents.clear()
        return documents

    def receivers(self) -> int:
        return sum(len(d.receivers) for d in self._documents.values())


def merged_change(changes: list[Change]) -> Change:
    """The changes of one document as one: their updates merged, the last one's watermark, its
    frame and WebSocket frame encoded once for every receiver."""
    last = changes[-1]
    update = merge_updates(*(c.update for c in changes))
    frame = encode_frame(Update(last.doc_id, 0, update, last.changed_at, last.changed_by))
    return Change(
        user=last.user,
        doc_id=last.doc_id,
        update=update,
        changed_at=last.changed_at,
        changed_by=last.changed_by,
        origin="",
        relay=last.relay,
        frame=frame,
        wire=websocket_binary_frame(frame),
    )


def _merged_or_each(changes: list[Change]) -> list[Change]:
    """One merged change; the changes as they are should yrs refuse to merge them (it cannot
    for updates the relay checked and applied, but a fan-out never fails for it)."""
    try:
        return [merged_change(changes)]
    except BaseException as exc:  # pycrdt's Rust panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        log.error("merging %d changes of %s failed: %s", len(changes), changes[0].doc_id, exc)
        return list(changes)
