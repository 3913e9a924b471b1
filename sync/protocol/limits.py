"""The numbers that bound what one peer can make the other one hold in memory.

They live together so that the relay, the client and the tests agree on them, and so that a
reviewer can see in one place how much a hostile or broken peer can cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from foliosync.sync.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_BULK_BYTES",
    "DEFAULT_MAX_BULK_ITEMS",
    "DEFAULT_MAX_DOCUMENTS",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MESSAGE_BURST",
    "DEFAULT_MESSAGE_GRACE",
    "DEFAULT_MESSAGE_RATE",
    "MAX_CODE_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_UINT",
    "MessageRate",
    "TokenBucket",
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

DEFAULT_MESSAGE_RATE = 1000.0
"""Messages per second one connection may send the relay in the long run. A device that comes
back online sends each pending change as one Update, all at once, so the bucket is generous: it
is there to stop a flood, not to pace a device."""

DEFAULT_MESSAGE_BURST = 10_000
"""Messages one connection may send at once, above the rate (the bucket's size)."""

DEFAULT_MESSAGE_GRACE = 10.0
"""Seconds of the rate a connection may run into debt once its burst is spent, before the relay
ends it with a fatal ``rate_limited``: a client that stays over the rate for longer than this is
abusing the relay, not catching up."""


def _positive(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"invalid {name} {value!r}: a finite number above 0")
    return float(value)


@dataclass(frozen=True, slots=True)
class MessageRate:
    """How many messages a connection may send: ``rate`` per second in the long run, ``burst`` at
    once, and ``grace`` seconds of the rate of debt past the burst before it is cut off.

    Checked when built, so a wrong value stops the relay at start-up."""

    rate: float = DEFAULT_MESSAGE_RATE
    burst: int = DEFAULT_MESSAGE_BURST
    grace: float = DEFAULT_MESSAGE_GRACE

    def __post_init__(self) -> None:
        _positive("message rate", self.rate)
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ConfigError(f"invalid message burst {self.burst!r}: a whole number, at least 1")
        _positive("message grace", self.grace)

    @property
    def max_debt(self) -> float:
        """Tokens a connection may owe before it is cut off."""
        return self.rate * self.grace


class TokenBucket:
    """A token bucket fed by the caller's clock: ``take(cost, now)`` spends tokens and says
    whether the spender is still within its grace.

    Pure: the time comes in as an argument (any monotonic clock, in seconds), so that a session
    can be driven synchronously and a test can step through a minute in microseconds. The bucket
    starts full; it may go into debt down to ``-max_debt`` (a client over the rate is served,
    and told nothing, for ``grace`` seconds); past that, :meth:`take` returns False.
    """

    __slots__ = ("_last", "_limit", "_tokens")

    def __init__(self, limit: MessageRate) -> None:
        self._limit = limit
        self._tokens = float(limit.burst)
        self._last: float | None = None

    @property
    def limit(self) -> MessageRate:
        """The rate, burst and grace this bucket enforces."""
        return self._limit

    @property
    def tokens(self) -> float:
        """Tokens left as of the last :meth:`take` (negative: in debt)."""
        return self._tokens

    def take(self, cost: float, now: float) -> bool:
        """Spend ``cost`` tokens at time ``now``; False once the debt is past the grace."""
        limit = self._limit
        if self._last is not None and now > self._last:
            refill = (now - self._last) * limit.rate
            self._tokens = min(float(limit.burst), self._tokens + refill)
        if self._last is None or now > self._last:
            self._last = now
        self._tokens -= cost
        return self._tokens >= -limit.max_debt
