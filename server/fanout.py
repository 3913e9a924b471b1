"""Fan-out of document changes to the other connections of a user: a port and its in-process hub.

A relay publishes each stored change once; every connection of that user (on this relay, and,
with a shared bus, on the others) receives it, except the one it came from. The port is small on
purpose: a Redis pub/sub adapter implements the same three methods to join several relays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from foliosync.sync.errors import FolioSyncError

__all__ = ["Change", "FanOut", "InProcessFanOut", "Subscription"]


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


class Subscription(Protocol):
    def close(self) -> None: ...


class FanOut(Protocol):
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
        self._closed = False

    async def publish(self, change: Change) -> None:
        for deliver in list(self._listeners.get(change.user, ())):
            deliver(change)

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
