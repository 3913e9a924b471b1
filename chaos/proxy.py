"""A TCP proxy on 127.0.0.1 that misbehaves on purpose, between devices and a relay.

The guarantees under test are about what survives a bad network, so the network has to be bad in
the ways real ones are: connections that vanish (``drop``), bytes that arrive late and unevenly
(``delay``), a connection cut in the middle of a WebSocket frame (``truncate``: the relay or the
device is left holding half a frame), a partition that accepts connections but forwards nothing
for a while and then heals or cuts (``partition``), and one direction that stops while the other
flows (``stall``: a device whose Updates reach the relay but whose Acks do not come back).

Each fault applies to one connection or to all of them, by a direct call, from a schedule, or at
random from a seed (:class:`RandomFaults`), so that a run that found something can be replayed.
The proxy only ever withholds, delays or cuts bytes: it never invents or reorders them, so what a
peer receives is always a prefix of what the other sent.

:class:`WebSocketFrames` follows the frame boundaries of one direction (after the HTTP upgrade),
which is how a truncation knows where "the middle of a frame" is.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "Direction",
    "Fault",
    "FaultKind",
    "FaultProxy",
    "RandomFaults",
    "WebSocketFrames",
]

_CHUNK = 64 << 10
_HEADERS_END = b"\r\n\r\n"
_MAX_HEADERS = 64 << 10


class FaultKind(StrEnum):
    DROP = "drop"
    DELAY = "delay"
    TRUNCATE = "truncate"
    PARTITION = "partition"
    STALL = "stall"


class Direction(StrEnum):
    UP = "up"  # device -> relay
    DOWN = "down"  # relay -> device


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault to apply; ``connection`` None means every connection (and, for a partition or
    a delay, the connections made while it lasts)."""

    kind: FaultKind
    seconds: float = 0.0  # how long a partition, a stall or a delay lasts
    latency: float = 0.0  # delay: added to every chunk...
    jitter: float = 0.0  # ...plus or minus up to this, order kept
    direction: Direction = Direction.UP  # stall
    cut: bool = False  # partition: cut the connections when it ends, instead of resuming
    connection: int | None = None

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.latency < 0 or self.jitter < 0:
            raise ValueError(f"a fault's durations must not be negative: {self}")


class WebSocketFrames:
    """Frame boundaries of one direction of a WebSocket connection, fed chunk by chunk.

    Until the end of the HTTP upgrade (request or response headers) nothing is a frame; after it,
    frames follow one another (RFC 6455 section 5.2: two header bytes, a 16- or 64-bit extended
    length, a 4-byte mask key when masked, then the payload).
    """

    def __init__(self) -> None:
        self._headers = bytearray()
        self._upgraded = False
        self._header = bytearray()  # the current frame's header, while incomplete
        self._payload_left = 0  # payload bytes of the current frame still to come
        self._in_frame = False

    @property
    def upgraded(self) -> bool:
        return self._upgraded

    def feed(self, chunk: bytes) -> list[tuple[int, int]]:
        """Consume ``chunk``; return the spans ``(start, end)`` of it that lie inside frames,
        each span one frame's part within this chunk, in order."""
        spans: list[tuple[int, int]] = []
        position = 0
        if not self._upgraded:
            self._headers += chunk
            end = self._headers.find(_HEADERS_END)
            if end < 0:
                if len(self._headers) > _MAX_HEADERS:
                    del self._headers[: -len(_HEADERS_END)]
                return spans
            position = len(chunk) - (len(self._headers) - (end + len(_HEADERS_END)))
            self._upgraded = True
            self._headers.clear()
        while position < len(chunk):
            start = position
            if not self._in_frame:
                self._in_frame = True
                self._header.clear()
                self._payload_left = -1
            while self._payload_left < 0 and position < len(chunk):
                self._header.append(chunk[position])
                position += 1
                self._payload_left = _payload_length(self._header)
            if self._payload_left >= 0:
                take = min(self._payload_left, len(chunk) - position)
                position += take
                self._payload_left -= take
                if self._payload_left == 0:
                    self._in_frame = False
            spans.append((start, position))
        return spans

    def mid_frame_cut(self, chunk: bytes) -> int | None:
        """Feed ``chunk`` and return how many of its bytes to send so that the peer is left
        inside a frame (never at a boundary), or None when the chunk offers no such point
        (still in the upgrade headers)."""
        spans = self.feed(chunk)
        for start, end in spans:
            # send [0, cut): cut strictly after the span's start, and before its end unless the
            # frame goes on past the chunk (then the whole span leaves the peer mid-frame)
            if end - start >= 2:
                return start + (end - start) // 2
            if end == len(chunk) and self._in_frame:
                return end
        return None


def _payload_length(header: bytearray) -> int:
    """The payload length once ``header`` is a complete frame header, else -1."""
    if len(header) < 2:
        return -1
    masked = bool(header[1] & 0x80)
    length = header[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    needed = 2 + extended + (4 if masked else 0)
    if len(header) < needed:
        return -1
    if extended:
        length = int.from_bytes(header[2 : 2 + extended], "big")
    return length


class _Pipe:
    """One direction of one connection: read, hold while paused, delay, write, maybe cut."""

    def __init__(
        self,
        link: _Link,
        direction: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.link = link
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.frames = WebSocketFrames()
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.ready = asyncio.Event()
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.paused_by: set[str] = set()
        self.truncate = False
        self.last_due = 0.0
        self.forwarded = 0

    def pause(self, reason: str) -> None:
        self.paused_by.add(reason)
        self.flowing.clear()

    def resume(self, reason: str) -> None:
        self.paused_by.discard(reason)
        if not self.paused_by:
            self.flowing.set()

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self.reader.read(_CHUNK)
                if not data:
                    break
                latency, jitter = self.link.delay()
                due = loop.time() + latency + (self.link.rng.uniform(-jitter, jitter))
                self.last_due = max(self.last_due, due)
                self.queue.append((self.last_due, data))
                self.ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.queue.append((0.0, None))
            self.ready.set()

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.queue:
                    self.ready.clear()
                    await self.ready.wait()
                due, data = self.queue.popleft()
                if data is None:
                    with contextlib.suppress(ConnectionError, OSError):
                        await self.writer.drain()
                    self.link.close()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.flowing.wait()
                if self.truncate:
                    cut = self.frames.mid_frame_cut(data)
                    if cut is not None:
                        self.writer.write(data[:cut])
                        with contextlib.suppress(ConnectionError, OSError):
                            await self.writer.drain()
                        self.link.proxy.counts[FaultKind.TRUNCATE] += 1
                        self.link.abort()
                        return
                else:
                    self.frames.feed(data)
                self.writer.write(data)
                self.forwarded += len(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            self.link.abort()


class _Link:
    """One device connection and its upstream connection to the relay."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.rng = random.Random(proxy.seed * 1_000_003 + number)
        self.writers = (client[1], upstream[1])
        self.pipes = {
            Direction.UP: _Pipe(self, Direction.UP, client[0], upstream[1]),
            Direction.DOWN: _Pipe(self, Direction.DOWN, upstream[0], client[1]),
        }
        self.latency: tuple[float, float] | None = None
        self.closed = asyncio.Event()

    def delay(self) -> tuple[float, float]:
        return self.latency if self.latency is not None else self.proxy.latency

    async def run(self) -> None:
        tasks = [
            asyncio.ensure_future(coroutine)
            for pipe in self.pipes.values()
            for coroutine in (pipe.read_loop(), pipe.write_loop())
        ]
        try:
            await self.closed.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self.writers:
                writer.transport.abort()

    def close(self) -> None:
        """An orderly end (one side closed): the rest of the data was written."""
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.close()
        self.closed.set()

    def abort(self) -> None:
        """An abrupt end: both sockets reset, whatever is still queued is lost."""
        for writer in self.writers:
            writer.transport.abort()
        self.closed.set()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``, applying the faults it is told to.

    ``counts`` says how many faults of each kind took effect (a truncation counts when it cut,
    a drop per connection dropped, a partition, a stall and a delay once each)."""

    def __init__(
        self, upstream: tuple[str, int], *, port: int = 0, seed: int = 0, name: str = "proxy"
    ) -> None:
        self.upstream = upstream
        self.requested_port = port
        self.seed = seed
        self.name = name
        self.counts: Counter[FaultKind] = Counter()
        self.latency = (0.0, 0.0)
        self.links: dict[int, _Link] = {}
        self.accepted = 0
        self._partitions: set[str] = set()
        self._server: asyncio.Server | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._faults = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.requested_port)
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def close(self) -> None:
        self.clear()
        if self._server is not None:
            self._server.close()
        for link in list(self.links.values()):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5.0)
        except (OSError, TimeoutError):
            writer.transport.abort()  # the relay is down: the device sees a refused connection
            return
        link = _Link(self, number, (reader, writer), upstream)
        for reason in self._partitions:
            for pipe in link.pipes.values():
                pipe.pause(reason)
        self.links[number] = link
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await link.run()
        finally:
            self.links.pop(number, None)
            if task is not None:
                self._tasks.discard(task)

    # -- faults ------------------------------------------------------------------------------

    def _targets(self, connection: int | None) -> list[_Link]:
        if connection is None:
            return list(self.links.values())
        link = self.links.get(connection)
        return [] if link is None else [link]

    def _later(self, seconds: float, action: object) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.discard(handle)
            action()  # type: ignore[operator]

        handle = loop.call_later(seconds, fire)
        self._timers.add(handle)

    def drop(self, connection: int | None = None) -> int:
        """Reset the connection(s) at once; returns how many were dropped."""
        links = self._targets(connection)
        for link in links:
            link.abort()
        self.counts[FaultKind.DROP] += len(links)
        return len(links)

    def truncate(self, connection: int | None = None) -> int:
        """Arm a cut: the next chunk each connection forwards (either way) is cut in the middle
        of a WebSocket frame and the connection reset. Returns how many were armed."""
        links = self._targets(connection)
        for link in links:
            for pipe in link.pipes.values():
                pipe.truncate = True
        return len(links)

    def delay(
        self,
        latency: float,
        jitter: float = 0.0,
        seconds: float = 0.0,
        connection: int | None = None,
    ) -> None:
        """Delay every chunk by ``latency`` ± ``jitter`` seconds (order kept), for ``seconds``
        (0: until cleared)."""
        if latency < 0 or jitter < 0 or seconds < 0:
            raise ValueError("latency, jitter and seconds must not be negative")
        self.counts[FaultKind.DELAY] += 1
        if connection is None:
            self.latency = (latency, jitter)
        for link in self._targets(connection):
            link.latency = (latency, jitter)
        if seconds:
            self._later(seconds, lambda: self._undelay(connection))

    def _undelay(self, connection: int | None) -> None:
        if connection is None:
            self.latency = (0.0, 0.0)
        for link in self._targets(connection):
            link.latency = None

    def partition(self, seconds: float, *, cut: bool = False) -> None:
        """Accept connections but forward nothing, either way, for ``seconds``; then forward
        what was held (``cut=False``) or reset every connection it held (``cut=True``)."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._faults += 1
        reason = f"partition-{self._faults}"
        self.counts[FaultKind.PARTITION] += 1
        self._partitions.add(reason)
        for link in self.links.values():
            for pipe in link.pipes.values():
                pipe.pause(reason)
        self._later(seconds, lambda: self._heal(reason, cut))

    def _heal(self, reason: str, cut: bool) -> None:
        self._partitions.discard(reason)
        for link in list(self.links.values()):
            held = any(reason in pipe.paused_by for pipe in link.pipes.values())
            for pipe in link.pipes.values():
                pipe.resume(reason)
            if cut and held:
                link.abort()

    def stall(self, direction: Direction, seconds: float, connection: int | None = None) -> int:
        """Stop forwarding one direction of the connection(s) for ``seconds`` (the other goes
        on); returns how many were stalled."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._faults += 1
        reason = f"stall-{self._faults}"
        links = self._targets(connection)
        for link in links:
            link.pipes[direction].pause(reason)
        self.counts[FaultKind.STALL] += 1

        def resume() -> None:
            for link in links:
                link.pipes[direction].resume(reason)

        self._later(seconds, resume)
        return len(links)

    def apply(self, fault: Fault) -> None:
        if fault.kind is FaultKind.DROP:
            self.drop(fault.connection)
        elif fault.kind is FaultKind.TRUNCATE:
            self.truncate(fault.connection)
        elif fault.kind is FaultKind.DELAY:
            self.delay(fault.latency, fault.jitter, fault.seconds, fault.connection)
        elif fault.kind is FaultKind.PARTITION:
            self.partition(fault.seconds, cut=fault.cut)
        else:
            self.stall(fault.direction, fault.seconds, fault.connection)

    async def run_schedule(self, schedule: Iterable[tuple[float, Fault]]) -> None:
        """Apply each fault at its offset in seconds from now (offsets in increasing order)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for offset, fault in schedule:
            wait = start + offset - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.apply(fault)

    def clear(self) -> None:
        """Every fault off: held bytes flow again, no delay, no armed cut."""
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        self._partitions.clear()
        self.latency = (0.0, 0.0)
        for link in self.links.values():
            link.latency = None
            for pipe in link.pipes.values():
                pipe.truncate = False
                pipe.paused_by.clear()
                pipe.flowing.set()


class RandomFaults:
    """Faults drawn from a seed: the same seed gives the same faults in the same order.

    Durations stay short (a partition or a stall of at most ``max_seconds``), so that a run
    spends its time syncing through faults rather than waiting them out."""

    KINDS = tuple(FaultKind)

    def __init__(self, seed: int, *, max_seconds: float = 1.5) -> None:
        self.rng = random.Random(seed)
        self.max_seconds = max_seconds

    def next(self, connections: list[int] | None = None) -> Fault:
        rng = self.rng
        kind = rng.choice(self.KINDS)
        target = None
        if connections and rng.random() < 0.5:
            target = rng.choice(sorted(connections))
        seconds = round(rng.uniform(0.1, self.max_seconds), 3)
        if kind is FaultKind.DELAY:
            latency = round(rng.uniform(0.005, 0.2), 3)
            jitter = round(rng.uniform(0.0, latency), 3)
            return Fault(kind, seconds, latency, jitter, connection=target)
        if kind is FaultKind.PARTITION:
            return Fault(kind, seconds, cut=rng.random() < 0.5)
        if kind is FaultKind.STALL:
            direction = rng.choice((Direction.UP, Direction.DOWN))
            return Fault(kind, seconds, direction=direction, connection=target)
        return Fault(kind, connection=target)
