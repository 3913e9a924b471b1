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
    "DEFAULT_REFUSAL_COUNT",
    "DEFAULT_REFUSAL_WINDOW",
    "MAX_CODE_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_UINT",
    "MessageRate",
    "RefusalLimit",
    "RefusalWindow",
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

DEFAULT_REFUSAL_COUNT = 100
"""Refusals (weighted, see :class:`RefusalLimit`) one connection may get within
:data:`DEFAULT_REFUSAL_WINDOW` before the relay ends it with a fatal ``too_many_refusals``. A device
that follows the protocol rolls back what was refused and does not send it again, so the changes
that count fully are the ones it got wrong itself; a hundred of those within ten seconds is a client
that keeps sending what it was told is refused, not a device catching up."""

DEFAULT_REFUSAL_WINDOW = 10.0
"""Seconds over which refusals are counted (in tenths: a refusal leaves the count between 9/10
and all of a window after it was sent)."""


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


@dataclass(frozen=True, slots=True)
class RefusalLimit:
    """How many refusals a connection may get: more than ``count`` within ``window`` seconds ends
    it. What one refusal weighs is the session's decision (``ServerSession``): a change at fault
    weighs 1, a refusal a device gets once per change it had in flight (the document past the
    user's limit, a read-only share, a relay that lacks what the change builds on) 1/100, and the
    relay's own failures nothing.

    Checked when built, so a wrong value stops the relay at start-up."""

    count: int = DEFAULT_REFUSAL_COUNT
    window: float = DEFAULT_REFUSAL_WINDOW

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"invalid refusal count {self.count!r}: a whole number, at least 1")
        _positive("refusal window", self.window)


_SLOTS = 10  # the window is counted in this many slots of a tenth each


class RefusalWindow:
    """The weight of the refusals of the last ``window`` seconds, in slots of a tenth of it.

    Pure, like :class:`TokenBucket`: the time comes in as an argument (any monotonic clock). A
    slotted count rather than one timestamp per refusal: a connection refused ten thousand times
    costs ten numbers, not ten thousand. A refusal counts until its slot is a whole window old,
    so for between 9/10 of a window and a whole one.
    """

    __slots__ = ("_limit", "_slots", "_width")

    def __init__(self, limit: RefusalLimit) -> None:
        self._limit = limit
        self._width = limit.window / _SLOTS
        self._slots: list[tuple[int, float]] = []  # (slot number, weight), oldest first

    @property
    def limit(self) -> RefusalLimit:
        """The count and window this counter enforces."""
        return self._limit

    def _expire(self, now: float) -> int:
        slot = math.floor(now / self._width)
        slots = self._slots
        while slots and slots[0][0] <= slot - _SLOTS:
            del slots[0]
        return slot

    def add(self, weight: float, now: float) -> None:
        """Count a refusal of ``weight`` sent at time ``now``."""
        if weight <= 0:
            return
        slot = self._expire(now)
        slots = self._slots
        if slots and slots[-1][0] >= slot:  # the clock never goes back; if it did, same slot
            last, total = slots[-1]
            slots[-1] = (last, total + weight)
        else:
            slots.append((slot, weight))

    def weight(self, now: float) -> float:
        """The weight of the refusals still counted at ``now``."""
        self._expire(now)
        return sum(weight for _slot, weight in self._slots)

    def exceeded(self, now: float) -> bool:
        """Whether more than ``count`` is counted at ``now`` (the connection should end)."""
        return self.weight(now) > self._limit.count + 1e-9
