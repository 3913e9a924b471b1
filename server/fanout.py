"""Fan-out of document changes to the other connections of a user: a port and its in-process hub.

A relay publishes each stored change once; every connection of that user (on this relay, and,
with a shared bus, on the others) receives it, except the one it came from. The port is small on
purpose: a Redis adapter implements the same methods to join several relays.

Beside the changes, a small control channel: a share granted or ended, tokens revoked. Those are
stored in the share store first (the truth, read at every Hello, SyncRequest and Update); the
relay that stored one acts on its own connections at once, and publishes it with
:meth:`FanOut.publish_control` so that the other relays of a group act on theirs at once too
(:meth:`FanOut.subscribe_control`). An adapter hands a control event to the control subscribers
of the *other* relays only, never back to the relay that published it (it acted already): in one
process there are none, so :class:`InProcessFanOut` delivers nothing. A shared bus carries control
events in the same order as the changes of the same relay, so a change published after a
revocation never reaches a peer before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from foliosync.server.timings import Timings
from foliosync.server.websocket import OP_BINARY, server_frame
from foliosync.sync.errors import FolioSyncError

__all__ = [
    "Change",
    "ControlEvent",
    "ControlHook",
    "FanOut",
    "FanOutStats",
    "InProcessFanOut",
    "ShareGranted",
    "ShareRevoked",
    "Subscription",
    "TokensRevoked",
    "websocket_binary_frame",
]

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


def websocket_binary_frame(payload: bytes) -> bytes:
    """A whole unmasked WebSocket binary frame (RFC 6455, 5.2): what a server sends.

    Unmasked, the same bytes serve every receiver, so a fanned-out change is framed once.
    """
    return server_frame(OP_BINARY, payload)


Deliver = Callable[[Change], None]


@dataclass(frozen=True, slots=True)
class ShareGranted:
    """``owner`` shared her ``doc_id`` with ``grantee`` (``access`` "read" or "write"): the
    grantee's open connections get a ``shared`` notice."""

    owner: str
    doc_id: str
    grantee: str
    access: str


@dataclass(frozen=True, slots=True)
class ShareRevoked:
    """``owner`` ended the share of her ``doc_id`` with ``grantee``: the grantee's connections
    synced on it get a ``revoked`` Error and none of its changes from then on."""

    owner: str
    doc_id: str
    grantee: str


@dataclass(frozen=True, slots=True)
class TokensRevoked:
    """The fields of a :class:`~foliosync.server.sharing.Revocation` (kept apart so that the port
    needs nothing of the share store): the open connections it covers are closed."""

    revoked_at: int
    user: str = ""
    device: str = ""
    jti: str = ""


ControlEvent = ShareGranted | ShareRevoked | TokensRevoked
ControlHook = Callable[[ControlEvent], None]
"""Called with each control event of another relay (must not block, as :data:`Deliver`)."""


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

    async def publish_control(self, event: ControlEvent) -> None:
        """Tell the other relays (stored already: best effort, never raises for the bus)."""
        ...

    def subscribe_control(self, deliver: ControlHook) -> Subscription:
        """Get the control events of the other relays (never this relay's own)."""
        ...

    async def ping(self) -> None:
        """Returns if changes can be published (a shared bus answers), else raises
        :class:`~foliosync.sync.errors.FolioSyncError`; what ``/readyz`` asks."""
        ...

    async def close(self) -> None: ...


class _ControlSubscription:
    def __init__(self, listeners: set[ControlHook], deliver: ControlHook) -> None:
        self._listeners, self._deliver = listeners, deliver

    def close(self) -> None:
        self._listeners.discard(self._deliver)


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
        self._control: set[ControlHook] = set()
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

    async def publish_control(self, event: ControlEvent) -> None:
        """Nothing to do: the one relay acted on its connections before publishing."""

    def subscribe_control(self, deliver: ControlHook) -> Subscription:
        """Kept, though nothing is ever delivered: there are no other relays."""
        self._control.add(deliver)
        return _ControlSubscription(self._control, deliver)

    async def ping(self) -> None:
        """In one process the hub is always reachable, until the relay closes it."""
        if self._closed:
            raise FolioSyncError("the fan-out is closed")

    async def close(self) -> None:
        self._closed = True
        self._listeners.clear()
        self._control.clear()
