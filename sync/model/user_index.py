"""The per-user index: which watchlists and portfolios a user has.

A device that signs in for the first time syncs this document and learns every document of its
user from it. Entries are keyed by document id, and ids are derived from names, so the same
watchlist created on two devices is one entry. A removal deletes the entry; a concurrent
re-creation of the same name wins over it, as a user would expect of "create".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, Map

from foliosync.sync.errors import ValidationError
from foliosync.sync.model.document import (
    INDEX_DOCUMENT_ID,
    DocumentKind,
    DocumentModel,
    EditContext,
    kind_of,
)

__all__ = ["IndexEntry", "UserIndex"]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    id: str
    kind: DocumentKind
    name: str


class UserIndex(DocumentModel):
    KIND = DocumentKind.INDEX

    def __init__(self, doc: Doc[Any], context: EditContext) -> None:
        super().__init__(doc, context)
        self._documents: Map[Any] = doc.get("documents", type=Map)

    @property
    def id(self) -> str:
        return INDEX_DOCUMENT_ID

    def entries(self) -> list[IndexEntry]:
        entries = []
        for doc_id, raw in self._documents.items():
            try:
                kind = kind_of(doc_id)
            except ValidationError:
                continue
            name = raw.get("name") if isinstance(raw, dict) else None
            if kind is not DocumentKind.INDEX and isinstance(name, str):
                entries.append(IndexEntry(doc_id, kind, name))
        return sorted(entries, key=lambda e: (e.kind, e.name.casefold(), e.id))

    def get(self, doc_id: str) -> IndexEntry | None:
        return next((e for e in self.entries() if e.id == doc_id), None)

    def register(self, doc_id: str, kind: DocumentKind, name: str) -> None:
        current = self._documents.get(doc_id)
        if isinstance(current, dict) and current.get("name") == name:
            return
        with self.doc.transaction():
            self._documents[doc_id] = {
                "kind": kind.value,
                "name": name,
                "t": self.context.clock.now(),
            }

    def unregister(self, doc_id: str) -> None:
        if doc_id in self._documents:
            with self.doc.transaction():
                del self._documents[doc_id]
