"""Fan-out of document changes to the other connections of a user: a port and its in-process hub.

A relay publishes each stored change once; every connection of that user (on this relay, and,
with a shared bus, on the others) receives it, except the one it came from. The port is small on
purpose: a Redis pub/sub adapter implements the same three methods to join several relays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from foliosync.server.timings import Timings
from foliosync.sync.errors import FolioSyncError

__all__ = ["Change", "FanOut", "FanOutStats", "InProcessFanOut", "Subscription"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Change:
    user: str
    doc_id: str
    update: bytes
    changed_at: int
    changed_by: str
    origin: str  # the connection it came from: it is not sent back there
    relay: str = ""  # the relay that stored it (peers apply it to their memory only)
    frame: bytes = b""  # the encoded Update frame, made once for every receiver
    wire: bytes = b""  # the same as a WebSocket frame (a relay's frames are the same for all)


Deliver = Callable[[Change], None]


@dataclass(slots=True)
class FanOutStats:
    """What an adapter measures for the relay's metrics: the time from a change published to
    its delivery to the subscribers, and the changes it could not hand to one of them."""

    lag: Timings = field(default_factory=Timings)
    errors: int = 0


class Subscription(Protocol):
    def close(self) -> None: ...


class FanOut(Protocol):
    stats: FanOutStats

    async def publish(self, change: Change) -> None: ...

    def subscribe(self, user: str, deliver: Deliver) -> Subscription: ...

    async def ping(self) -> None:
        """Returns if changes can be published (a shared bus answers), else raises
        :class:`~foliosync.sync.errors.FolioSyncError`; what ``/readyz`` asks."""
        ...

    async def close(self) -> None: ...


class _LocalSubscription:
    def __init__(self, hub: InProcessFanOut, user: str, deliver: Deliver) -> None:
        self._hub, self._user, self._deliver = hub, user, deliver

    def close(self) -> None:
        listeners = self._hub._listeners.get(self._user)
        if listeners is not None:
            listeners.discard(self._deliver)
            if not listeners:
                del self._hub._listeners[self._user]


class InProcessFanOut:
    """The default: one relay process, delivery by direct call (deliver must not block)."""

    def __init__(self) -> None:
        self._listeners: dict[str, set[Deliver]] = {}
        self.stats = FanOutStats()
        self._closed = False

    async def publish(self, change: Change) -> None:
        """Hand ``change`` to every subscriber of its user; one that raises is logged and counted
        and the others still get it."""
        started = time.perf_counter()
        for deliver in list(self._listeners.get(change.user, ())):
            try:
                deliver(change)
            except Exception:
                self.stats.errors += 1
                log.exception("a subscriber failed to take a change of %s", change.doc_id)
        self.stats.lag.observe(time.perf_counter() - started)

    def subscribe(self, user: str, deliver: Deliver) -> Subscription:
        self._listeners.setdefault(user, set()).add(deliver)
        return _LocalSubscription(self, user, deliver)

    async def ping(self) -> None:
        """In one process the hub is always reachable, until the relay closes it."""
        if self._closed:
            raise FolioSyncError("the fan-out is closed")

    async def close(self) -> None:
        self._closed = True
        self._listeners.clear()
