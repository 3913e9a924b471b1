"""What every foliosync document shares: its kind, its id, its metadata and the edit context.

Ids are derived from the kind and the case-folded name, not drawn at random: a watchlist "Tech"
created on two offline devices of one user gets the same id on both, so when they sync the two
creations are one document holding both devices' content. The relay keeps documents per user,
so the same id in two users' accounts names two different documents.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from pycrdt import Doc, Map, TransactionEvent

from foliosync.sync.clock import HybridClock
from foliosync.sync.errors import ValidationError
from foliosync.sync.validation import normalize_name

__all__ = [
    "INDEX_DOCUMENT_ID",
    "DocumentKind",
    "DocumentModel",
    "EditContext",
    "document_id",
    "kind_of",
    "split_owner",
]

INDEX_DOCUMENT_ID = "index"


class DocumentKind(StrEnum):
    WATCHLIST = "watchlist"
    PORTFOLIO = "portfolio"
    INDEX = "index"


_PREFIX = {DocumentKind.WATCHLIST: "wl-", DocumentKind.PORTFOLIO: "pf-"}
_HEX_ID = re.compile(r"[0-9a-f]{24}")


def document_id(kind: DocumentKind, name: str) -> str:
    """The id of the watchlist or portfolio called ``name`` (case and spacing do not matter)."""
    if kind is DocumentKind.INDEX:
        return INDEX_DOCUMENT_ID
    key = normalize_name(name).casefold().encode()
    return _PREFIX[kind] + hashlib.blake2b(key, digest_size=12).hexdigest()


_OWNER = re.compile(r"[A-Za-z0-9_.@+\-]{1,128}")  # a token's user (foliosync.server.auth)


def split_owner(doc_id: str) -> tuple[str | None, str]:
    """``(owner, id)`` of a document another user shared (``alice/wl-...``), ``(None, id)`` of
    one's own. Only the owner's part is checked here; :func:`kind_of` checks the rest."""
    owner, slash, local = doc_id.partition("/")
    if not slash:
        return None, doc_id
    return owner, local


def kind_of(doc_id: str) -> DocumentKind:
    """The kind of a document from its id; ValidationError for an id foliosync never makes.

    A shared document's id, ``OWNER/`` before its owner's id (PROTOCOL.md, Sharing), has the
    kind of that id; the index is never shared, so ``alice/index`` is no id."""
    owner, local = split_owner(doc_id)
    if owner is not None:
        if not _OWNER.fullmatch(owner) or local == INDEX_DOCUMENT_ID or "/" in local:
            raise ValidationError(f"not a foliosync document id: {doc_id[:60]!r}")
        doc_id = local
    if doc_id == INDEX_DOCUMENT_ID:
        return DocumentKind.INDEX
    for kind, prefix in _PREFIX.items():
        # Exactly what document_id() makes: int(x, 16) would also take "+0", "0x", spaces and
        # upper case, and so make a second document of the same name.
        if doc_id.startswith(prefix) and _HEX_ID.fullmatch(doc_id, len(prefix)):
            return kind
    raise ValidationError(f"not a foliosync document id: {doc_id[:60]!r}")


@dataclass(slots=True)
class EditContext:
    """Who edits (a stable device id) and the clock that stamps the edits."""

    device: str
    clock: HybridClock = field(default_factory=HybridClock)


class DocumentModel:
    """Typed access to one pycrdt document.

    Reads are cached and the cache is dropped whenever the document changes (a counter bumped by
    an observer: observers may not read the document, but they may count). Local edits patch the
    cache themselves so that an edit on a large document costs no full re-read.
    """

    KIND: ClassVar[DocumentKind]

    def __init__(self, doc: Doc[Any], context: EditContext) -> None:
        self.doc = doc
        self.context = context
        self.meta: Map[Any] = doc.get("meta", type=Map)
        self._version = 0
        self._subscription = doc.observe(self._bump)

    def _bump(self, _event: TransactionEvent) -> None:
        self._version += 1

    def close(self) -> None:
        """Stop observing the document, so that the pair can be garbage collected."""
        self.doc.unobserve(self._subscription)

    @property
    def version(self) -> int:
        return self._version

    @property
    def name(self) -> str:
        name = self.meta.get("name")
        return name if isinstance(name, str) else ""

    def initialize(self, name: str) -> None:
        """Write the metadata of a new document (idempotent: the same values on every device)."""
        with self.doc.transaction():
            if self.meta.get("kind") != self.KIND.value:
                self.meta["kind"] = self.KIND.value
            if self.meta.get("name") != name:
                self.meta["name"] = name
