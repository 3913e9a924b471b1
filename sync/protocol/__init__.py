"""The wire protocol between devices and the relay: frames, their codec, and the two sessions.

Pure code in the style of h11 and wsproto: bytes in, events out; frames in, bytes out. The relay's
and the client's I/O shells own the socket; see :mod:`.session` for how they drive a session and
:mod:`.frames` for the frame table.
"""

from foliosync.sync.protocol.events import (
    Acked,
    ClientEvent,
    ErrorReceived,
    Event,
    HelloReceived,
    PingReceived,
    PongReceived,
    ServerEvent,
    SyncReplied,
    SyncRequested,
    UpdateReceived,
    Welcomed,
)
from foliosync.sync.protocol.frames import (
    PROTOCOL_VERSION,
    RESERVED_PRICE_CODES,
    Ack,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Ping,
    Pong,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    decode_frame,
    encode_frame,
)
from foliosync.sync.protocol.limits import DEFAULT_MAX_FRAME_SIZE
from foliosync.sync.protocol.memory import MemoryConnection, connected_pair
from foliosync.sync.protocol.outbound import OutboundQueue
from foliosync.sync.protocol.session import (
    ClientSession,
    ClientState,
    ServerSession,
    ServerState,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "RESERVED_PRICE_CODES",
    "Ack",
    "Acked",
    "ClientEvent",
    "ClientSession",
    "ClientState",
    "Error",
    "ErrorCode",
    "ErrorReceived",
    "Event",
    "Frame",
    "Hello",
    "HelloReceived",
    "MemoryConnection",
    "OutboundQueue",
    "Ping",
    "PingReceived",
    "Pong",
    "PongReceived",
    "ServerEvent",
    "ServerSession",
    "ServerState",
    "SyncReplied",
    "SyncReply",
    "SyncRequest",
    "SyncRequested",
    "Update",
    "UpdateReceived",
    "Welcome",
    "Welcomed",
    "connected_pair",
    "decode_frame",
    "encode_frame",
]
