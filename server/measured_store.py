"""A relay store that times its operations: wraps any :class:`RelayStore` adapter.

Measuring at the port rather than inside one adapter means the SQLite store, the memory store
and any adapter written later report the same ``foliosync_store_seconds{operation}`` and
``foliosync_store_errors_total{operation}``, and no adapter has to remember to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from foliosync.server.storage import RelayStore, StoredDocument
from foliosync.server.timings import Timings

__all__ = ["OPERATIONS", "MeasuredRelayStore", "StoreStats"]

OPERATIONS = ("append", "load", "compact", "list")
"""The ``operation`` label's values: the port's methods (``list`` is ``documents()``)."""


@dataclass(slots=True)
class StoreStats:
    timings: dict[str, Timings] = field(default_factory=lambda: {o: Timings() for o in OPERATIONS})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPERATIONS, 0))


class MeasuredRelayStore:
    """``store`` with every operation timed and every failure counted in :attr:`stats`.

    An operation that raises (a ``RelayStoreError``, or anything else an adapter lets through)
    counts as an error of that operation and is re-raised unchanged; its time is observed too,
    so that a store that fails slowly shows in the histogram.
    """

    def __init__(self, store: RelayStore) -> None:
        self.inner = store
        self.stats = StoreStats()

    def _done(self, operation: str, started: float, failed: bool) -> None:
        self.stats.timings[operation].observe(time.perf_counter() - started)
        if failed:
            self.stats.errors[operation] += 1

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        started = time.perf_counter()
        try:
            seq = await self.inner.append(user, doc_id, update, changed_at, changed_by)
        except Exception:  # a cancelled operation is not a store error
            self._done("append", started, True)
            raise
        self._done("append", started, False)
        return seq

    async def load(self, user: str, doc_id: str) -> StoredDocument | None:
        started = time.perf_counter()
        try:
            stored = await self.inner.load(user, doc_id)
        except Exception:  # a cancelled operation is not a store error
            self._done("load", started, True)
            raise
        self._done("load", started, False)
        return stored

    async def compact(self, user: str, doc_id: str, snapshot: bytes, up_to_seq: int) -> None:
        started = time.perf_counter()
        try:
            await self.inner.compact(user, doc_id, snapshot, up_to_seq)
        except Exception:  # a cancelled operation is not a store error
            self._done("compact", started, True)
            raise
        self._done("compact", started, False)

    async def documents(self, user: str) -> list[str]:
        started = time.perf_counter()
        try:
            documents = await self.inner.documents(user)
        except Exception:  # a cancelled operation is not a store error
            self._done("list", started, True)
            raise
        self._done("list", started, False)
        return documents

    async def ping(self) -> None:
        await self.inner.ping()

    def __getattr__(self, name: str) -> Any:
        """Whatever else the adapter offers (its path, a backup) is the adapter's own."""
        return getattr(self.inner, name)

    async def close(self) -> None:
        await self.inner.close()
