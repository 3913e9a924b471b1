"""Load clients of the price fan-out benchmark: many WebSocket subscribers in one process.

Run by :mod:`bench.prices` as ``python -m bench.prices_load MODE URL FIRST COUNT [DATA_DIR]`` and
driven by JSON lines on stdin (one answer line on stdout per command):

- ``{"cmd": "connect", "concurrency": C, "timeout": S}``: open clients FIRST .. FIRST+COUNT-1; each
  subscribes to its 50 symbols (:func:`watched`) and counts as connected once the server confirmed
  (the relay's PriceSnapshot, the bare loop's empty ``[42, []]``).
- ``{"cmd": "measure", "t0": T0, "t1": T1}``: count what arrives between wall-clock times T0 and
  T1; answers at once.
- ``{"cmd": "report"}``: after T1, the counts: PriceBatch frames and ticks received in the window
  by every client, and a histogram of the latency of every tick received by the sampling clients.
- ``{"cmd": "quiet", "idle": S, "timeout": S}``: waits until no frame arrived for ``idle`` s.
- ``{"cmd": "close"}``: closes every client and exits.

Both servers send the same frames: ``[43, [[symbol, price, time_ms, seq, size], ...]]`` (the
PriceBatch of the foliosync protocol), read here the same way for both, so that the clients cost
both sides the same. The clients run on :class:`bench.relay_load.WsConnection`, not aiohttp's
client: a frame is handled in ``data_received`` with no task or message object, and a client that
does not sample latency counts its ticks from the batch's array header without decoding them
(the load processes share the machine with the server under test; what they cost is scheduling
delay in its figures). The relay's handshake (Hello, Welcome, Subscribe) goes through the
library's ClientSession, and each relay client sends a protocol Ping every 30 s, as SyncClient
does, so that the relay's idle timeout never cuts it.

Latency: the publisher writes its send time as the tick's ``size``: ``time.time()`` modulo
:data:`SEND_TIME_MODULO_S` in seconds with six decimals (decimal text, which the relay keeps
exactly: it is a Decimal end to end; the whole epoch time would exceed the relay's bound on
sizes). The receiver subtracts it from its own ``time.time()`` modulo the same (the difference is
taken modulo too, so the wrap every 27 hours costs nothing). A tick
that arrives carries its own send time, so a price replaced by a newer one while it waited
(conflation) is never measured against the wrong send time, and nothing has to be matched across
processes. All processes run on one machine and read the same clock.

The process exits by itself when stdin closes or after ``MAX_LIFETIME_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgpack

from bench.relay_load import HOST, WsConnection, run_load

__all__ = [
    "HIST_PER_MS",
    "MAX_LIFETIME_S",
    "SEND_TIME_MODULO_S",
    "SYMBOLS_PER_CLIENT",
    "UNIVERSE",
    "raise_nofile_limit",
    "send_time_text",
    "watched",
]

UNIVERSE = tuple(f"P{i:03d}" for i in range(500))
"""The symbols ticking: P000 .. P499."""
SYMBOLS_PER_CLIENT = 50
SAMPLE_EVERY = 10
"""One client in this many records the latency of every tick it receives."""
HIST_PER_MS = 10
"""Latency histogram buckets per millisecond (0.1 ms resolution)."""
MAX_LIFETIME_S = 1800.0
SEND_TIME_MODULO_S = 100_000

PRICE_BATCH = 43
PRICE_SNAPSHOT = 42
_BATCH_HEAD = bytes((0x92, PRICE_BATCH))  # msgpack: an array of two, then 43
PING_EVERY_S = 30.0


def watched(client: int) -> list[str]:
    """The symbols client number ``client`` follows: 50 of the 500, the same on every run."""
    return random.Random(f"prices-client-{client}").sample(UNIVERSE, SYMBOLS_PER_CLIENT)


def send_time_text(now_us: int) -> str:
    """A send time as tick size text: seconds modulo SEND_TIME_MODULO_S, to the microsecond."""
    seconds, micros = divmod(now_us % (SEND_TIME_MODULO_S * 1_000_000), 1_000_000)
    return f"{seconds}.{micros:06d}"


def raise_nofile_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Stats:
    """What all the clients of this process received in the current window."""

    def __init__(self) -> None:
        self.t0 = float("inf")
        self.t1 = float("-inf")
        self.frames = 0
        self.ticks = 0
        self.latency: Counter[int] = Counter()
        self.last_frame = 0.0
        self.closed = 0  # connections lost after connecting
        self.malformed = 0  # PriceBatch frames whose tick array could not be read

    def reset(self, t0: float, t1: float) -> None:
        self.t0, self.t1 = t0, t1
        self.frames = self.ticks = 0
        self.latency = Counter()


class PriceClient:
    """The owner of one :class:`WsConnection`: its frames queue for the handshake; then
    ``on_message`` is the counter, called straight from ``data_received``."""

    __slots__ = ("conn", "frames", "on_lost", "on_message", "session")

    def __init__(self) -> None:
        self.conn: WsConnection | None = None  # set once connected
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()
        self.on_message: Callable[[WsConnection, bytes], None] = self._queue
        self.on_lost: Callable[[], None] | None = None
        self.session: Any = None  # the relay's ClientSession, for its Pings

    def on_open(self, conn: WsConnection) -> None:
        self.conn = conn

    def _queue(self, conn: WsConnection, payload: bytes) -> None:
        self.frames.put_nowait(payload)

    def on_close(self, conn: WsConnection) -> None:
        if self.on_lost is not None:
            self.on_lost()

    def send(self, payload: bytes) -> None:
        if self.conn is not None:
            self.conn.send(payload)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    async def next(self) -> bytes:
        """The next frame of the handshake; ConnectionError if the server closes first."""
        assert self.conn is not None
        getting = asyncio.ensure_future(self.frames.get())
        await asyncio.wait((getting, self.conn.done), return_when=asyncio.FIRST_COMPLETED)
        if not getting.done():
            getting.cancel()
            raise ConnectionError("the server closed the connection during the handshake")
        return getting.result()


class Loader:
    def __init__(self, mode: str, url: str, first: int, count: int, data_dir: Path | None) -> None:
        self.mode = mode
        self.url = url
        self.first = first
        self.count = count
        self.data_dir = data_dir
        self.stats = Stats()
        self.sockets: list[PriceClient] = []
        self.pinger: asyncio.Task[None] | None = None
        self.secret: bytes | None = None

    # -- connecting ----------------------------------------------------------------------------

    async def _open(self, client: int) -> PriceClient:
        url = urlsplit(self.url)
        assert url.port is not None
        port = url.port
        owner = PriceClient()
        _, owner.conn = await asyncio.get_running_loop().create_connection(
            lambda: WsConnection(owner, port, url.path), HOST, port
        )
        try:
            await owner.conn.handshake
            symbols = watched(client)
            if self.mode == "relay":
                await self._relay_handshake(owner, client, symbols)
            else:
                owner.send(msgpack.packb(symbols))
                while msgpack.unpackb(await owner.next())[0] != PRICE_SNAPSHOT:
                    pass
        except BaseException:
            owner.close()
            raise
        return owner

    async def _relay_handshake(self, owner: PriceClient, client: int, symbols: list[str]) -> None:
        from foliosync.server.auth import issue_token, load_or_create_secret
        from foliosync.sync.protocol import ClientSession, ErrorReceived, PricesReceived, Welcomed

        if self.secret is None:
            assert self.data_dir is not None
            self.secret = load_or_create_secret(self.data_dir)
        token = issue_token(self.secret, f"viewer{client}", device="bench")
        session = ClientSession()
        owner.send(session.hello(token, "prices-bench"))
        subscribed = False
        while True:
            for event in session.receive_data(await owner.next()):
                if isinstance(event, Welcomed) and not subscribed:
                    owner.send(session.subscribe(symbols))
                    subscribed = True
                elif isinstance(event, PricesReceived) and event.snapshot:
                    owner.session = session
                    return
                elif isinstance(event, ErrorReceived):
                    raise ConnectionError(f"relay error {event.code}: {event.message}")

    async def connect(self, concurrency: int, timeout: float) -> dict[str, Any]:
        raise_nofile_limit()
        gate = asyncio.Semaphore(concurrency)
        errors: Counter[str] = Counter()
        failed: list[int] = []
        started = time.perf_counter()
        deadline = started + timeout

        async def one(client: int) -> None:
            async with gate:
                left = deadline - time.perf_counter()
                if left <= 0:
                    errors["timeout"] += 1
                    failed.append(client)
                    return
                try:
                    ws = await asyncio.wait_for(self._open(client), left)
                except Exception as exc:  # counted and reported, never raised
                    errors[type(exc).__name__] += 1
                    failed.append(client)
                    return
                self.sockets.append(ws)
                ws.on_message = self._counter(client % SAMPLE_EVERY == 0)
                ws.on_lost = self._lost

        await asyncio.gather(*(one(c) for c in range(self.first, self.first + self.count)))
        if self.mode == "relay" and self.pinger is None:
            self.pinger = asyncio.get_running_loop().create_task(self._ping())
        return {
            "connected": len(self.sockets),
            "failed": sum(errors.values()),
            "errors": dict(errors),
            "failed_ids": failed,
            "seconds": round(time.perf_counter() - started, 3),
        }

    # -- receiving -----------------------------------------------------------------------------

    def _counter(self, sampler: bool) -> Callable[[WsConnection, bytes], None]:
        """What one client does with each frame, called from ``data_received``.

        A PriceBatch is ``[43, [tick, ...]]``: the non-sampling clients read the tick count from
        the array header, the sampling ones decode every tick for its send time.
        """
        stats = self.stats
        unpackb = msgpack.unpackb
        clock = time.time
        u16 = struct.Struct(">H").unpack_from
        u32 = struct.Struct(">I").unpack_from

        def count(_: WsConnection, payload: bytes) -> None:
            now = clock()
            stats.last_frame = now
            if payload[:2] != _BATCH_HEAD or not stats.t0 <= now < stats.t1:
                return
            stats.frames += 1
            if sampler:
                ticks = unpackb(payload)[1]
                stats.ticks += len(ticks)
                latency = stats.latency
                here = now % SEND_TIME_MODULO_S
                for tick in ticks:
                    waited = (here - float(tick[4])) % SEND_TIME_MODULO_S  # s
                    latency[int(waited * 1000 * HIST_PER_MS)] += 1
                return
            marker = payload[2]
            if marker & 0xF0 == 0x90:
                stats.ticks += marker & 0x0F
            elif marker == 0xDC:
                stats.ticks += u16(payload, 3)[0]
            elif marker == 0xDD:
                stats.ticks += u32(payload, 3)[0]
            else:
                stats.malformed += 1

        return count

    def _lost(self) -> None:
        self.stats.closed += 1

    async def _ping(self) -> None:
        """A protocol Ping per client every PING_EVERY_S, as SyncClient does: no idle cut."""
        from foliosync.sync.protocol.frames import Ping

        nonce = 0
        while True:
            await asyncio.sleep(PING_EVERY_S)
            nonce += 1
            for client in self.sockets:
                if client.session is not None:
                    client.send(client.session.send(Ping(nonce)))

    async def report(self) -> dict[str, Any]:
        wait = self.stats.t1 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        stats = self.stats
        return {
            "frames": stats.frames,
            "ticks": stats.ticks,
            "latency": {str(k): v for k, v in stats.latency.items()},
            "open": len(self.sockets) - stats.closed,
            "closed": stats.closed,
            "malformed": stats.malformed,
        }

    async def quiet(self, idle: float, timeout: float) -> dict[str, Any]:
        started = time.time()
        while time.time() - started < timeout:
            if time.time() - self.stats.last_frame >= idle:
                return {"quiet": True, "seconds": round(time.time() - started, 3)}
            await asyncio.sleep(0.1)
        return {"quiet": False, "seconds": round(time.time() - started, 3)}

    async def close(self) -> dict[str, Any]:
        if self.pinger is not None:
            self.pinger.cancel()
        for client in self.sockets:
            client.on_lost = None
            client.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.conn.done for c in self.sockets)), 10)
        return {"closed": len(self.sockets)}


async def serve(loader: Loader) -> None:
    """Answer JSON-line commands from stdin until ``close``, EOF or the lifetime runs out."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    deadline = time.monotonic() + MAX_LIFETIME_S

    def answer(reply: dict[str, Any]) -> None:
        out.write(json.dumps(reply) + "\n")
        out.flush()

    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(reader.readline(), deadline - time.monotonic())
        except TimeoutError:
            break
        if not line:
            break
        command = json.loads(line)
        cmd = command.pop("cmd")
        if cmd == "connect":
            answer(await loader.connect(**command))
        elif cmd == "measure":
            loader.stats.reset(command["t0"], command["t1"])
            answer({"ok": True})
        elif cmd == "report":
            answer(await loader.report())
        elif cmd == "quiet":
            answer(await loader.quiet(**command))
        elif cmd == "close":
            answer(await loader.close())
            return
        else:
            answer({"error": f"unknown command {cmd}"})
    await loader.close()


def main(argv: list[str]) -> int:
    mode, url, first, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    data_dir = Path(argv[4]) if len(argv) > 4 else None
    if mode not in ("relay", "bare"):
        raise SystemExit(f"mode is relay or bare, not {mode}")
    run_load(serve(Loader(mode, url, first, count, data_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
