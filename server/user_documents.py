"""What counts toward one user's document limit on a relay (``max_documents_per_user``).

A document counts once the relay stores it, and once the user's index lists it. The index is the
user's list of documents, on every device: an entry the relay took is a document the user sees,
whether or not the document's own first update has arrived (a device sends the two as separate
Updates, in either order). Counting entries keeps the list and the limit in step, both ways:

- an index update that would list documents beyond the limit is refused like the document's own
  update (``too_many_documents``), so the relay never lists a document it would refuse to store,
  and never holds more entries than the limit;
- a document the index lists within the limit is never refused for it: its entry holds its room.

An entry the relay took for a document whose own updates it then refused for another reason (its
layout, an extension's rule) still counts until it is removed; the device that made it removes it
when it rolls the document back (PROTOCOL.md, section 5). Removing the entry of a document the
relay does not store frees its room.

The counts are this relay's: documents and entries another relay of a group took count here from
the user's next connection (read again from the shared store then), so across relays the limit
may be passed by a few.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pycrdt import Doc, Map

from foliosync.sync.errors import ValidationError
from foliosync.sync.model import DocumentKind, kind_of

__all__ = ["UserDocuments", "entry_names", "listed_documents"]


def _listed(documents: Map[Any], key: str) -> bool:
    """Whether the index entry ``key`` lists a document (as ``UserIndex.entries`` reads them)."""
    if key not in documents:
        return False
    try:
        kind = kind_of(key)
    except ValidationError:
        return False
    value = documents[key]
    return (
        kind is not DocumentKind.INDEX
        and isinstance(value, dict)
        and isinstance(value.get("name"), str)
    )


def listed_documents(
    index: Doc[Any], keys: Iterable[str] | None = None
) -> tuple[frozenset[str], frozenset[str]]:
    """(the documents ``index`` lists, those it does not) among ``keys``, or among all its
    entries if None. Only reads ``index``."""
    documents = index.get("documents", type=Map)
    listed: set[str] = set()
    unlisted: set[str] = set()
    with index.transaction():
        for key in documents.keys() if keys is None else keys:
            (listed if _listed(documents, key) else unlisted).add(key)
    return frozenset(listed), frozenset(unlisted)


def entry_names(index: Doc[Any], doc_ids: Iterable[str], most: int = 3) -> str:
    """``watchlist 'Tech', portfolio 'Main'``: the first ``most`` of the entries ``doc_ids`` as
    a person knows them (by the names ``index`` gives them), and how many more."""
    documents = index.get("documents", type=Map)
    labels = []
    with index.transaction():
        for doc_id in doc_ids:
            value = documents.get(doc_id)
            name = value.get("name") if isinstance(value, dict) else None
            kind = value.get("kind") if isinstance(value, dict) else None
            labels.append(f"{kind} {name!r}" if isinstance(name, str) else doc_id)
    labels.sort()
    more = f" and {len(labels) - most} more" if len(labels) > most else ""
    return ", ".join(labels[:most]) + more


class UserDocuments:
    """One user's counted documents on this relay: those stored, and those the index lists."""

    __slots__ = ("_counted", "_stored", "index_read")

    def __init__(self, stored: Iterable[str] = ()) -> None:
        self._stored: set[str] = set(stored)
        self._counted: set[str] = set(self._stored)
        self.index_read = False
        """Whether the stored index's entries were read in (see :meth:`read_index`)."""

    def __len__(self) -> int:
        return len(self._counted)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._counted

    def stores(self, doc_id: str) -> bool:
        """Whether the relay stores ``doc_id`` (not only lists it)."""
        return doc_id in self._stored

    def admits(self, doc_id: str, limit: int) -> bool:
        """Whether an update of ``doc_id`` may store it within ``limit`` documents."""
        return doc_id in self._counted or len(self._counted) < limit

    def stored(self, doc_ids: Iterable[str]) -> None:
        """The relay stores these (an update of each was stored, or the store lists them)."""
        for doc_id in doc_ids:  # the index among them: it is a document too, and counts
            self._stored.add(doc_id)
            self._counted.add(doc_id)

    def read_index(self, listed: Iterable[str]) -> None:
        """The entries of the index as the relay stores it."""
        self._counted.update(listed)
        self.index_read = True

    def beyond(self, listed: Iterable[str], limit: int) -> frozenset[str]:
        """Of the documents an index update lists, those it would add beyond ``limit``; empty if
        it may list them all."""
        new = frozenset(listed) - self._counted
        return new if len(self._counted) + len(new) > limit else frozenset()

    def relist(self, listed: Iterable[str], unlisted: Iterable[str]) -> None:
        """An index update was stored: what it lists counts; an entry it removed frees its
        room unless the relay stores that document."""
        self._counted.update(listed)
        self._counted.difference_update(d for d in unlisted if d not in self._stored)
