"""What a session tells its I/O shell after reading a frame.

Events are not the frames themselves: they carry what the receiver needs (an Error becomes an
:class:`ErrorReceived` that says whether it was fatal) and only exist for frames that were valid in
the session's state, so a shell that acts on an event never has to re-check the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "Acked",
    "ClientEvent",
    "ErrorReceived",
    "Event",
    "HelloReceived",
    "PingReceived",
    "PongReceived",
    "PricesReceived",
    "PublishReceived",
    "PublishedReceived",
    "ResyncRequested",
    "ServerEvent",
    "SubscribeRequested",
    "SyncReplied",
    "SyncRequested",
    "UpdateReceived",
    "Welcomed",
]


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """(relay) A client introduced itself. Verify ``token``, then call ``accept`` or ``reject``."""

    protocol: int
    token: str
    client_name: str


@dataclass(frozen=True, slots=True)
class Welcomed:
    """(client) The relay accepted us; document frames may flow from now on."""

    protocol: int
    user: str
    device: str
    server_time_ms: int
    documents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SyncRequested:
    """(relay) The client has ``state_vector`` of ``doc`` and wants what it lacks."""

    doc: str
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncReplied:
    """(client) The relay's diff against our state vector, its own state vector (to compute what
    the relay lacks) and the document's freshness watermark (None for a document new to it)."""

    doc: str
    update: bytes
    state_vector: bytes
    changed_at_ms: int | None
    changed_by: str | None


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """A CRDT delta for ``doc``.

    On the relay: from the client, ``seq`` > 0 to acknowledge once stored; no watermark.
    On the client: another device's change, ``seq`` == 0, with the watermark set."""

    doc: str
    seq: int
    update: bytes
    changed_at_ms: int | None
    changed_by: str | None


@dataclass(frozen=True, slots=True)
class Acked:
    """(client) Update ``seq`` of ``doc``, and every earlier one of it on this connection, is
    durably stored on the relay."""

    doc: str
    seq: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer wants a Pong with this nonce."""

    nonce: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered a Ping."""

    nonce: int


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The peer reported an error. When ``fatal`` the session is closed already and the shell
    should close the socket; otherwise only ``doc`` (and update ``seq``) are concerned."""

    code: str
    message: str
    doc: str | None
    seq: int | None
    fatal: bool


@dataclass(frozen=True, slots=True)
class SubscribeRequested:
    """(relay) The client follows exactly these symbols from now on (not yet validated)."""

    symbols: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ResyncRequested:
    """(relay) The client saw a gap: send a fresh snapshot of these symbols."""

    symbols: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PublishReceived:
    """(relay) A publisher's batch; each tick is still unchecked (see foliosync.sync.prices)."""

    batch: int
    ticks: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class PricesReceived:
    """(client) Prices: a snapshot (after a Subscribe or Resync) or a delivery window's batch."""

    ticks: tuple[tuple[str, str, int, int, str | None], ...]
    snapshot: bool


@dataclass(frozen=True, slots=True)
class PublishedReceived:
    """(client) The relay's answer to a Publish."""

    batch: int
    accepted: int
    rejected: tuple[tuple[int, str], ...]


ServerEvent: TypeAlias = (
    HelloReceived
    | SyncRequested
    | UpdateReceived
    | PingReceived
    | PongReceived
    | ErrorReceived
    | SubscribeRequested
    | ResyncRequested
    | PublishReceived
)
"""An event a :class:`~.session.ServerSession` can report."""

ClientEvent: TypeAlias = (
    Welcomed
    | SyncReplied
    | UpdateReceived
    | Acked
    | PingReceived
    | PongReceived
    | ErrorReceived
    | PricesReceived
    | PublishedReceived
)
"""An event a :class:`~.session.ClientSession` can report."""

Event: TypeAlias = ServerEvent | ClientEvent
"""Any event of either side."""
