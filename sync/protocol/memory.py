"""A client and a relay session joined in memory, for tests and for code that wants to exercise
the protocol without a network.

Nothing here is asynchronous: messages wait in two FIFO queues until :meth:`deliver_to_server` or
:meth:`deliver_to_client` hands them over, so a test decides exactly when each side reads, and can
hold messages in flight to reproduce a race.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from foliosync.sync.protocol.events import ClientEvent, ServerEvent, Welcomed
from foliosync.sync.protocol.frames import PROTOCOL_VERSION
from foliosync.sync.protocol.limits import DEFAULT_MAX_FRAME_SIZE
from foliosync.sync.protocol.session import ClientSession, ServerSession

__all__ = ["MemoryConnection", "connected_pair"]


class MemoryConnection:
    """Two sessions and the messages in flight between them, one queue per direction."""

    __slots__ = ("_to_client", "_to_server", "client", "server")

    def __init__(self, client: ClientSession, server: ServerSession) -> None:
        self.client = client
        self.server = server
        self._to_server: deque[bytes] = deque()
        self._to_client: deque[bytes] = deque()

    def client_sends(self, data: bytes) -> None:
        """Put one message from the client on the wire."""
        self._to_server.append(data)

    def server_sends(self, data: bytes) -> None:
        """Put one message from the relay on the wire."""
        self._to_client.append(data)

    @property
    def in_flight_to_server(self) -> int:
        """Messages sent by the client and not yet delivered."""
        return len(self._to_server)

    @property
    def in_flight_to_client(self) -> int:
        """Messages sent by the relay and not yet delivered."""
        return len(self._to_client)

    def deliver_to_server(self) -> list[ServerEvent]:
        """Hand every message in flight to the relay session, in order; its events.

        A RemoteProtocolError propagates as the shell would see it; the messages after the faulty
        one stay in flight."""
        events: list[ServerEvent] = []
        while self._to_server:
            events.extend(self.server.receive_data(self._to_server.popleft()))
        return events

    def deliver_to_client(self) -> list[ClientEvent]:
        """Hand every message in flight to the client session, in order; its events."""
        events: list[ClientEvent] = []
        while self._to_client:
            events.extend(self.client.receive_data(self._to_client.popleft()))
        return events

    def handshake(
        self,
        token: str = "token",
        *,
        user: str = "user",
        device: str = "device",
        documents: Iterable[str] = (),
        server_time_ms: int = 0,
    ) -> Welcomed:
        """Hello, accepted without looking at the token, and Welcome: both sides READY."""
        self.client_sends(self.client.hello(token))
        self.deliver_to_server()
        self.server_sends(self.server.accept(user, device, documents, server_time_ms))
        (welcomed,) = self.deliver_to_client()
        assert isinstance(welcomed, Welcomed)
        return welcomed


def connected_pair(
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    supported_protocols: frozenset[int] = frozenset({PROTOCOL_VERSION}),
) -> MemoryConnection:
    """A fresh ClientSession and ServerSession joined in memory, before the Hello."""
    return MemoryConnection(
        ClientSession(max_frame_size=max_frame_size),
        ServerSession(max_frame_size=max_frame_size, supported_protocols=supported_protocols),
    )
