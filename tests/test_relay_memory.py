"""The relay's memory: what it frees goes back to the system (glibc keeps it otherwise), and an
idle connection costs it a bounded few KiB."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import tracemalloc
from pathlib import Path

import pytest

from foliosync.server.memory import release_free_memory

from .conftest import eventually, serve_relay


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_goes_back_to_the_system() -> None:
    # Many blocks of a few KiB, the size of frames; seven in eight freed, so that the heap
    # cannot shrink from its top: only trimming returns the pages in between.
    blocks = [bytes(4000) + bytes([i % 256]) for i in range(40_000)]  # about 160 MB
    survivors = blocks[::8]
    del blocks
    before = rss_kib()
    assert release_free_memory() is True
    after = rss_kib()
    assert before - after > 70_000, (before, after)  # most of the ~140 MB freed
    assert len(survivors) == 5_000


async def test_the_relay_collects_young_garbage_seldom_and_restores_the_collector(
    tmp_path: Path,
) -> None:
    before = gc.get_threshold()
    async with serve_relay(tmp_path / "tuned"):
        assert gc.get_threshold() == (10_000, *before[1:])
    assert gc.get_threshold() == before
    async with serve_relay(tmp_path / "untouched", gc_young_threshold=0):
        assert gc.get_threshold() == before  # an embedding app keeps its own setting
    async with serve_relay(tmp_path / "own", gc_young_threshold=2_500):
        assert gc.get_threshold()[0] == 2_500
    assert gc.get_threshold() == before
    async with contextlib.AsyncExitStack() as stack:  # two relays, stopped out of order
        first = await stack.enter_async_context(serve_relay(tmp_path / "first"))
        await stack.enter_async_context(serve_relay(tmp_path / "second", gc_young_threshold=20_000))
        assert gc.get_threshold()[0] == 20_000  # the larger of the two running
        await first.stop()
        assert gc.get_threshold()[0] == 20_000, "the first relay's stop left the second's setting"
    assert gc.get_threshold() == before


# The devices of test_an_idle_connection_costs_the_relay_a_bounded_few_kib, in a process of their
# own so that only the relay's allocations are traced: each sends a Hello, a SyncRequest of its
# index and a Subscribe of three symbols, reads the answers, then idles (answering the relay's
# pings) until told to stop.
_DEVICES = r"""
import asyncio, json, sys
import aiohttp
from foliosync.sync.protocol import ClientSession

async def main():
    url, tokens = sys.argv[1], json.loads(sys.stdin.readline())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def device(token):
            ws = await http.ws_connect(url)
            session = ClientSession()
            await ws.send_bytes(session.hello(token, "phone"))
            session.receive_data((await ws.receive(timeout=30)).data)  # Welcome
            await ws.send_bytes(session.sync_request("index", b"\x00"))
            await ws.send_bytes(session.subscribe(["AAPL", "MSFT", "NVDA"]))
            for _ in range(2):  # SyncReply, PriceSnapshot
                session.receive_data((await ws.receive(timeout=30)).data)
            readers.append(asyncio.ensure_future(read(ws)))
            return ws
        async def read(ws):  # answers the relay's WebSocket pings, as a live client does
            async for _ in ws:
                pass
        sockets, readers = [], []
        for start in range(0, len(tokens), 50):
            sockets += await asyncio.gather(*(device(t) for t in tokens[start:start + 50]))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*readers)

asyncio.run(main())
"""


async def _devices(url: str, tokens: list[str]) -> asyncio.subprocess.Process:
    """Devices connected from another process, once it says ``ready``."""
    devices = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DEVICES,
        url,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert devices.stdin is not None and devices.stdout is not None
    devices.stdin.write(json.dumps(tokens).encode() + b"\n")
    try:
        assert await asyncio.wait_for(devices.stdout.readline(), 60) == b"ready\n"
    except BaseException:
        devices.kill()
        await devices.wait()
        raise
    return devices


async def _release(devices: asyncio.subprocess.Process) -> None:
    assert devices.stdin is not None
    devices.stdin.write(b"\n")
    try:
        await asyncio.wait_for(devices.wait(), 30)
    finally:
        if devices.returncode is None:
            devices.kill()
            await devices.wait()


async def test_an_idle_connection_costs_the_relay_a_bounded_few_kib(tmp_path: Path) -> None:
    # What the relay's Python objects hold per connected device: its own WebSocket protocol and
    # the transport, the relay's Connection, session, identity and subscriptions, and a third of
    # a user's index. Measured 12.2 KiB; 20 KiB when aiohttp's request, connection protocol and
    # WebSocketResponse served /ws (server/websocket.py), 26 KiB before a connection lost its
    # idle writer task, the frames of the middlewares above its handler and its instance
    # dictionary. The bound catches the next task or dictionary per connection.
    count = 300
    async with serve_relay(tmp_path / "relay") as relay:
        tokens = [relay.token(f"user{n // 3:03d}", f"d{n % 3}") for n in range(count)]
        await _release(await _devices(relay.url, tokens[:3]))  # imports, first documents
        await eventually(lambda: not relay.relay.connections)
        gc.collect()
        tracemalloc.start()
        try:
            devices = await _devices(relay.url, tokens)
            try:
                assert len(relay.relay.connections) == count
                gc.collect()
                per_connection = tracemalloc.get_traced_memory()[0] / count / 1024
            finally:
                await _release(devices)
        finally:
            tracemalloc.stop()
    assert per_connection < 15.0, f"{per_connection:.1f} KiB per connection"
