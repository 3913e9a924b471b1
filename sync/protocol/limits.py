"""The numbers that bound what one peer can make the other one hold in memory.

They live together so that the relay, the client and the tests agree on them, and so that a
reviewer can see in one place how much a hostile or broken peer can cost.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_BULK_BYTES",
    "DEFAULT_MAX_BULK_ITEMS",
    "DEFAULT_MAX_DOCUMENTS",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_CODE_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_UINT",
]

DEFAULT_MAX_FRAME_SIZE = 1 << 20
"""Largest WebSocket message (one frame) a session accepts, in bytes. Checked before unpacking,
so a frame over the limit costs nothing but its receipt. A session also refuses to *send* a frame
over its own limit, because a peer with the default limit would refuse it."""

MAX_ID_LENGTH = 256
"""Longest document, user or device id, in characters. Ids become keys in the relay's store and
in every device's replica; a bound keeps a peer from inflating them."""

DEFAULT_MAX_DOCUMENTS = 10_000
"""Distinct documents one connection may name in SyncRequests. The relay's session remembers
each (for the sequence rules) for the connection's lifetime, refused ones included, and an id
may be 256 characters: without a bound one connection could make it hold any number of them.
Far above what one user's devices sync; past it the connection gets a fatal
``too_many_documents``."""

MAX_CODE_LENGTH = 64
"""Longest error code, in characters. Codes are identifiers for programs, never prose."""

MAX_UINT = (1 << 63) - 1
"""Largest sequence number, nonce, protocol version or millisecond time on the wire. Signed
64-bit, so that every msgpack implementation (and SQLite's INTEGER) can hold it."""

DEFAULT_MAX_BULK_ITEMS = 4096
"""Default number of distinct keys (e.g. symbols) the bulk part of an outbound queue holds."""

DEFAULT_MAX_BULK_BYTES = 4 << 20
"""Default number of payload bytes the bulk part of an outbound queue holds."""
