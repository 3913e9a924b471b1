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
from foliosync.sync.model.user_index import IndexEntry, UserIndex
from foliosync.sync.model.watchlist import Watchlist, WatchlistEntry

__all__ = [
    "CORRECTABLE_FIELDS",
    "INDEX_DOCUMENT_ID",
    "DocumentKind",
    "DocumentModel",
    "EditContext",
    "IndexEntry",
    "Portfolio",
    "Position",
    "Trade",
    "UserIndex",
    "Watchlist",
    "WatchlistEntry",
    "compute_positions",
    "document_id",
    "kind_of",
]
