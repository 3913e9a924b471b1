"""The relay's initial-sync slots: a semaphore that says how many wait and how many hold one.

After a restart a thousand clients reconnect at once; their SyncRequests share a bounded number
of slots so that live updates are not starved. ``waiting`` and ``active`` are what an operator
watches during such a storm (``foliosync_initial_syncs_waiting`` / ``_active``).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["InitialSyncSlots"]


class InitialSyncSlots:
    """``async with slots:`` holds one of ``size`` slots, in arrival order."""

    def __init__(self, size: int) -> None:
        self._semaphore = asyncio.Semaphore(size)
        self.waiting = 0
        self.active = 0

    async def __aenter__(self) -> None:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.active += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.active -= 1
        self._semaphore.release()
