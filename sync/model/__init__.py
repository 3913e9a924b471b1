"""The document model: typed watchlists, portfolios and the user index over pycrdt documents."""

from foliosync.sync.model.document import (
    INDEX_DOCUMENT_ID,
    DocumentKind,
    DocumentModel,
    EditContext,
    document_id,
    kind_of,
)
from foliosync.sync.model.portfolio import (
    CORRECTABLE_FIELDS,
    Portfolio,
    Position,
    Trade,
    compute_positions,
)
from foliosync.sync.model.schema import (
    DEFAULT_LIMITS,
    Candidate,
    SchemaLimits,
    advance_scratch,
    candidate,
    check_document,
)
from foliosync.sync.model.user_index import IndexEntry, UserIndex
from foliosync.sync.model.watchlist import Watchlist, WatchlistEntry

__all__ = [
    "CORRECTABLE_FIELDS",
    "DEFAULT_LIMITS",
    "INDEX_DOCUMENT_ID",
    "Candidate",
    "DocumentKind",
    "DocumentModel",
    "EditContext",
    "IndexEntry",
    "Portfolio",
    "Position",
    "SchemaLimits",
    "Trade",
    "UserIndex",
    "Watchlist",
    "WatchlistEntry",
    "advance_scratch",
    "candidate",
    "check_document",
    "compute_positions",
    "document_id",
    "kind_of",
]
