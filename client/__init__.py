"""The foliosync client library: a local SQLite replica of a user's documents, kept in sync.

Start with :class:`Replica` (open a file, create and edit watchlists and portfolios, offline) and
:class:`SyncClient` (keep it in sync with a relay)::

    async with Replica.open("replica.db") as replica:
        async with SyncClient(replica, "ws://127.0.0.1:8765/ws", token) as client:
            tech = await replica.create_watchlist("Tech")
            await tech.add(["AAPL", "MSFT"])

(``await Replica.open(path)`` with ``await replica.close()``, and ``client.start()`` with
``await client.stop()``, are the same without the blocks.)

An app that does not run asyncio (a Tk or Qt window) uses :class:`BackgroundClient`: the same
replica and sync on a thread of their own, behind blocking calls that any thread may make::

    with BackgroundClient.open("replica.db", "ws://127.0.0.1:8765/ws", token) as client:
        client.add_symbols("Tech", ["AAPL", "MSFT"])
"""

from foliosync.client.background import (
    BackgroundClient,
    Dispatcher,
    FreshnessChange,
    PortfolioSnapshot,
    WatchlistSnapshot,
    call_directly,
)
from foliosync.client.documents import PortfolioHandle, WatchlistHandle
from foliosync.client.health import ConnectionState, LastError, PriceAge, SyncHealth
from foliosync.client.replica import (
    DocumentChange,
    DocumentInfo,
    OpeningReplica,
    Refusal,
    Replica,
)
from foliosync.client.sync import Backoff, SyncClient, SyncStatus

__all__ = [
    "BackgroundClient",
    "Backoff",
    "ConnectionState",
    "Dispatcher",
    "DocumentChange",
    "DocumentInfo",
    "FreshnessChange",
    "LastError",
    "OpeningReplica",
    "PortfolioHandle",
    "PortfolioSnapshot",
    "PriceAge",
    "Refusal",
    "Replica",
    "SyncClient",
    "SyncHealth",
    "SyncStatus",
    "WatchlistHandle",
    "WatchlistSnapshot",
    "call_directly",
]
