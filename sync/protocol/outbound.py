"""The order in which frames leave on the one WebSocket a client has.

Document traffic and price ticks share the socket. A burst of ticks must never delay an Ack or a
SyncReply (the user would see a stale portfolio to save a price that is stale a second later), and
a slow reader must never make the relay hold an unbounded backlog of ticks. Hence two classes:

* CONTROL (Welcome, SyncReply, Update, Ack, Error, Ping, Pong): FIFO, always drained first, never
  dropped. Its size is exposed (:attr:`OutboundQueue.control_bytes`) so that the shell can decide
  to disconnect a reader that does not keep up.
* BULK (price frames): one slot per key (e.g. a symbol). A newer item for a key replaces the older
  one in place, since only the latest price matters, and the whole bulk part is bounded in items
  and bytes: when full, the oldest slots are dropped, so memory stays bounded whatever the reader
  does. The price layer resynchronises from snapshots, so a dropped tick costs freshness, not
  correctness.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable

from foliosync.sync.errors import ConfigError
from foliosync.sync.protocol.limits import DEFAULT_MAX_BULK_BYTES, DEFAULT_MAX_BULK_ITEMS

__all__ = ["OutboundQueue"]


class OutboundQueue:
    """Frames waiting to be written to one socket, control first, bulk conflated and bounded."""

    __slots__ = (
        "_bulk",
        "_bulk_bytes",
        "_control",
        "_control_bytes",
        "_max_bulk_bytes",
        "_max_bulk_items",
        "bulk_dropped",
        "bulk_replaced",
    )

    def __init__(
        self,
        *,
        max_bulk_items: int = DEFAULT_MAX_BULK_ITEMS,
        max_bulk_bytes: int = DEFAULT_MAX_BULK_BYTES,
    ) -> None:
        for name, value in (("max_bulk_items", max_bulk_items), ("max_bulk_bytes", max_bulk_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, not {value!r}")
        self._max_bulk_items = max_bulk_items
        self._max_bulk_bytes = max_bulk_bytes
        # Both made at the first push: a server holds a queue per connection and most never
        # use theirs (an empty deque is 760 bytes, most of what a queue would cost).
        self._control: deque[bytes] | None = None
        self._control_bytes = 0
        # Insertion order is send order; replacing a key's value keeps its place, so a busy key
        # cannot starve the others by being re-pushed.
        self._bulk: OrderedDict[Hashable, bytes] | None = None
        self._bulk_bytes = 0
        self.bulk_replaced = 0
        """Bulk items superseded by a newer one of the same key (conflation at work)."""
        self.bulk_dropped = 0
        """Bulk items evicted to keep the bounds, or too large to queue (the reader is slow)."""

    def push_control(self, data: bytes) -> None:
        """Queue a control frame; it goes before every bulk frame, after earlier control ones."""
        if self._control is None:
            self._control = deque()
        self._control.append(data)
        self._control_bytes += len(data)

    def push_bulk(self, key: Hashable, data: bytes) -> bool:
        """Queue a bulk frame for ``key``, replacing the one still waiting for that key.

        Returns False when ``data`` alone exceeds the bulk byte bound and was dropped (the older
        item of the key goes too: it is stale). Otherwise slots of other keys are evicted, oldest
        first, until the bounds hold again.
        """
        bulk = self._bulk
        if bulk is None:
            bulk = self._bulk = OrderedDict()
        old = bulk.get(key)
        if old is not None:
            self._bulk_bytes -= len(old)
            self.bulk_replaced += 1
        if len(data) > self._max_bulk_bytes:
            if old is not None:
                del bulk[key]
            self.bulk_dropped += 1
            return False
        bulk[key] = data
        self._bulk_bytes += len(data)
        while len(bulk) > self._max_bulk_items or self._bulk_bytes > self._max_bulk_bytes:
            # The item just pushed is the freshest: evict the oldest other one. The bounds hold
            # once it is alone (it fits on its own), so another one always exists here.
            slots = iter(bulk)
            victim = next(slots)
            if victim == key:
                victim = next(slots)
            self._bulk_bytes -= len(bulk.pop(victim))
            self.bulk_dropped += 1
        return True

    def pop(self) -> bytes | None:
        """The next frame to write: the oldest control frame, else the oldest bulk slot, else
        None."""
        if self._control:
            data = self._control.popleft()
            self._control_bytes -= len(data)
            return data
        if self._bulk:
            _, data = self._bulk.popitem(last=False)
            self._bulk_bytes -= len(data)
            return data
        return None

    @property
    def control_bytes(self) -> int:
        """Bytes of control frames waiting: the measure of a reader falling behind."""
        return self._control_bytes

    @property
    def bulk_bytes(self) -> int:
        """Bytes of bulk frames waiting (never more than ``max_bulk_bytes``)."""
        return self._bulk_bytes

    @property
    def bulk_items(self) -> int:
        """Bulk frames waiting (never more than ``max_bulk_items``)."""
        return len(self._bulk) if self._bulk is not None else 0

    def __len__(self) -> int:
        return (len(self._control) if self._control is not None else 0) + self.bulk_items

    def __bool__(self) -> bool:
        return bool(self._control) or bool(self._bulk)
