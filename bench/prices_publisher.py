"""The publisher of the price fan-out benchmark: ticks at a set rate, one batch every 10 ms.

Run by :mod:`bench.prices` as ``python -m bench.prices_publisher MODE URL [DATA_DIR]`` and driven
by JSON lines on stdin (one answer line per command):

- ``{"cmd": "connect"}``: to the relay, a Hello with a ``publish``-scope token; to the bare loop,
  its ``/pub`` socket.
- ``{"cmd": "run", "rate": R, "start": S, "t0": T0, "t1": T1, "end": E}``: from wall-clock time S
  to E, every 10 ms, the ticks due at rate R so far (a late batch carries more, so the rate holds
  on average); answers at E with the ticks sent per symbol between T0 and T1.
- ``{"cmd": "close"}``.

Ticks are ``[symbol, price, time_ms, size]``, sent as a foliosync ``Publish`` frame to the relay
and as the msgpack array ``[batch, ticks]`` to the bare loop. The symbols tick in turn, in a fixed
shuffled order of the 500, so that each ticks at R/500 per second, evenly spaced (a symbol never
ticks twice within 500/R s: what a subscriber misses is not two ticks of one symbol landing in the
same 10 ms batch). Prices walk by a cent or two around 100. ``size`` carries the send time in
microseconds (see :mod:`bench.prices_load`).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from bench.prices_load import MAX_LIFETIME_S, UNIVERSE, send_time_text
from bench.relay_load import run_load

__all__ = ["Publisher"]

BATCH_S = 0.010
MAX_TICKS_PER_FRAME = 10_000  # the protocol's limit per frame


class Publisher:
    def __init__(self, mode: str, url: str, data_dir: Path | None) -> None:
        self.mode = mode
        self.url = url
        self.data_dir = data_dir
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session: Any = None
        self.reader: asyncio.Task[None] | None = None
        rng = random.Random("prices-publisher")
        self.order = list(range(len(UNIVERSE)))
        rng.shuffle(self.order)
        self.rng = rng
        self.cents = [10_000 + rng.randrange(-2_000, 2_000) for _ in UNIVERSE]
        self.position = 0
        self.batch = 0
        self.accepted = 0
        self.rejected = 0

    async def connect(self) -> dict[str, Any]:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.url, heartbeat=None, compress=0)
        if self.mode == "relay":
            from foliosync.server.auth import issue_token, load_or_create_secret
            from foliosync.sync.protocol import ClientSession, Welcomed

            assert self.data_dir is not None
            token = issue_token(
                load_or_create_secret(self.data_dir),
                "feed",
                device="publisher",
                scopes=frozenset({"publish"}),
            )
            self.session = ClientSession()
            await self.ws.send_bytes(self.session.hello(token, "prices-bench-publisher"))
            message = await self.ws.receive()
            events = self.session.receive_data(message.data)
            if not any(isinstance(e, Welcomed) for e in events):
                raise ConnectionError(f"relay refused the publisher: {events}")
            self.reader = asyncio.get_running_loop().create_task(self._read_acks())
        return {"connected": True}

    async def _read_acks(self) -> None:
        from foliosync.sync.protocol import PublishedReceived

        assert self.ws is not None
        while True:
            message = await self.ws.receive()
            if message.type != aiohttp.WSMsgType.BINARY:
                return
            for event in self.session.receive_data(message.data):
                if isinstance(event, PublishedReceived):
                    self.accepted += event.accepted
                    self.rejected += len(event.rejected)

    def _ticks(self, count: int, now_us: int) -> tuple[list[list[object]], list[int]]:
        ticks: list[list[object]] = []
        indexes: list[int] = []
        order, cents, rng = self.order, self.cents, self.rng
        time_ms = now_us // 1000
        size = send_time_text(now_us)
        position = self.position
        for _ in range(count):
            index = order[position]
            position = (position + 1) % len(order)
            cents[index] = max(100, cents[index] + rng.choice((-2, -1, 1, 2)))
            c = cents[index]
            ticks.append([UNIVERSE[index], f"{c // 100}.{c % 100:02d}", time_ms, size])
            indexes.append(index)
        self.position = position
        return ticks, indexes

    async def _send(self, ticks: list[list[object]]) -> None:
        assert self.ws is not None
        for first in range(0, len(ticks), MAX_TICKS_PER_FRAME):
            part = ticks[first : first + MAX_TICKS_PER_FRAME]
            self.batch += 1
            if self.mode == "relay":
                data = self.session.publish(self.batch, part)
            else:
                data = msgpack.packb([self.batch, part])
            await self.ws.send_bytes(data)

    async def run(
        self, rate: float, start: float, t0: float, t1: float, end: float
    ) -> dict[str, Any]:
        in_window = [0] * len(UNIVERSE)
        sent = batches = 0
        max_lag = 0.0
        accepted_before, rejected_before = self.accepted, self.rejected
        delay = start - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        next_at = start
        while True:
            now_ns = time.time_ns()
            now = now_ns / 1e9
            if now >= end:
                break
            max_lag = max(max_lag, now - next_at)
            due = int((now - start) * rate) - sent
            if due > 0:
                ticks, indexes = self._ticks(due, now_ns // 1000)
                await self._send(ticks)
                sent += due
                batches += 1
                if t0 <= now < t1:
                    for index in indexes:
                        in_window[index] += 1
            next_at += BATCH_S
            wait = next_at - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.1:  # far behind: the next batch carries the backlog, start afresh
                next_at = time.time()
        await asyncio.sleep(0.2)  # the last Published answers
        return {
            "sent": sent,
            "batches": batches,
            "in_window": in_window,
            "max_lag_ms": round(max_lag * 1000, 1),
            "accepted": self.accepted - accepted_before,
            "rejected": self.rejected - rejected_before,
        }

    async def close(self) -> dict[str, Any]:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        return {"closed": True}


async def serve(publisher: Publisher) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    deadline = time.monotonic() + MAX_LIFETIME_S

    def answer(reply: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

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
            answer(await publisher.connect())
        elif cmd == "run":
            answer(await publisher.run(**command))
        elif cmd == "close":
            answer(await publisher.close())
            return
        else:
            answer({"error": f"unknown command {cmd}"})
    await publisher.close()


def main(argv: list[str]) -> int:
    mode, url = argv[0], argv[1]
    data_dir = Path(argv[2]) if len(argv) > 2 else None
    run_load(serve(Publisher(mode, url, data_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
