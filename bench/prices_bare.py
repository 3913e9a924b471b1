"""The ceiling of the price fan-out benchmark: a bare aiohttp loop broadcasting ticks.

``python -m bench.prices_bare PORT [MAX_SECONDS]`` serves on 127.0.0.1:

- ``/ws``: a client sends one msgpack array of the symbols it watches and gets ``[42, []]`` back;
  from then on, every 10 ms, one frame ``[43, [[symbol, price, time_ms, seq, size], ...]]`` with
  the ticks of its symbols that arrived since the previous batch (the bytes of a foliosync
  PriceBatch), when there are any.
- ``/pub``: the publisher sends msgpack ``[batch, [[symbol, price, time_ms, size], ...]]``.
- ``/healthz``: ``{"status": "ok", "connections": N}``.

No authentication, no validation, no conflation, no per-connection writer: each tick is packed
once per batch and its bytes are joined into each follower's frame, and the frames go out one
socket after another from a single loop (``await send_bytes``, which waits only when a socket's
buffer is full). Every tick reaches every follower. The process stops by itself after
MAX_SECONDS (default 1800).
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator

import msgpack
from aiohttp import WSMsgType, web

from bench.prices_load import raise_nofile_limit

__all__ = ["create_bare_app"]

BATCH_S = 0.010
_HEAD = b"\x92\x2b"  # msgpack: an array of two, then 43 (PriceBatch)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


class Client:
    __slots__ = ("parts", "symbols", "ws")

    def __init__(self, ws: web.WebSocketResponse, symbols: list[str]) -> None:
        self.ws = ws
        self.symbols = symbols
        self.parts: list[bytes] = []


class Bare:
    def __init__(self) -> None:
        self.followers: dict[str, list[Client]] = {}
        self.clients: set[Client] = set()
        self.pending: list[tuple[str, str, int, str]] = []
        self.seq: dict[str, int] = {}
        self.frames = 0

    async def handle_client(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        message = await ws.receive()
        if message.type != WSMsgType.BINARY:
            await ws.close()
            return ws
        client = Client(ws, [str(s) for s in msgpack.unpackb(message.data)])
        for symbol in client.symbols:
            self.followers.setdefault(symbol, []).append(client)
        self.clients.add(client)
        try:
            await ws.send_bytes(b"\x92\x2a\x90")  # [42, []]
            async for _ in ws:  # nothing more is expected; wait for the close
                pass
        finally:
            self.clients.discard(client)
            for symbol in client.symbols:
                self.followers[symbol].remove(client)
        return ws

    async def handle_publisher(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=64 << 20)
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                _, ticks = msgpack.unpackb(message.data)
                self.pending.extend(ticks)
        return ws

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "connections": len(self.clients), "frames": self.frames}
        )

    async def broadcast_loop(self) -> None:
        loop = asyncio.get_running_loop()
        packb = msgpack.packb
        next_at = loop.time()
        while True:
            next_at += BATCH_S
            wait = next_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                next_at = loop.time()  # behind: go on at once, the batch is larger
                await asyncio.sleep(0)
            if not self.pending:
                continue
            ticks, self.pending = self.pending, []
            dirty: list[Client] = []
            seqs = self.seq
            followers = self.followers
            for symbol, price, time_ms, size in ticks:
                seq = seqs[symbol] = seqs.get(symbol, 0) + 1
                packed = packb([symbol, price, time_ms, seq, size])
                for client in followers.get(symbol, ()):
                    if not client.parts:
                        dirty.append(client)
                    client.parts.append(packed)
            for client in dirty:
                parts, client.parts = client.parts, []
                if client.ws.closed:
                    continue
                try:
                    await client.ws.send_bytes(_HEAD + _array_header(len(parts)) + b"".join(parts))
                except (ConnectionError, RuntimeError):
                    continue
                self.frames += 1


def create_bare_app(max_seconds: float = 1800.0) -> web.Application:
    bare = Bare()
    app = web.Application()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(bare.broadcast_loop())
        stop = asyncio.get_running_loop().call_later(
            max_seconds, os.kill, os.getpid(), signal.SIGTERM
        )
        yield
        stop.cancel()
        task.cancel()

    async def close_all(app: web.Application) -> None:
        for client in list(bare.clients):
            await client.ws.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_all)
    app.router.add_get("/ws", bare.handle_client)
    app.router.add_get("/pub", bare.handle_publisher)
    app.router.add_get("/healthz", bare.health)
    return app


def main(argv: list[str]) -> int:
    port = int(argv[0])
    max_seconds = float(argv[1]) if len(argv) > 1 else 1800.0
    raise_nofile_limit()
    web.run_app(
        create_bare_app(max_seconds),
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
        backlog=4096,
        shutdown_timeout=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
