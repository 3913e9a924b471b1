"""The foliosync relay: an aiohttp WebSocket server that exchanges CRDT deltas between devices.

:func:`create_app` builds the aiohttp application from a :class:`RelayConfig`; the storage
(:class:`RelayStore`) and fan-out (:class:`FanOut`) ports take other adapters for tests or for
several relays.
"""

from foliosync.server.auth import Identity, issue_token, load_or_create_secret, verify_token
from foliosync.server.fanout import Change, FanOut, InProcessFanOut
from foliosync.server.relay import Relay, RelayConfig, create_app
from foliosync.server.storage import MemoryRelayStore, RelayStore, SQLiteRelayStore

__all__ = [
    "Change",
    "FanOut",
    "Identity",
    "InProcessFanOut",
    "MemoryRelayStore",
    "Relay",
    "RelayConfig",
    "RelayStore",
    "SQLiteRelayStore",
    "create_app",
    "issue_token",
    "load_or_create_secret",
    "verify_token",
]
