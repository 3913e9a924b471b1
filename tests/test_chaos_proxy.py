"""The chaos fault proxy on its own: it forwards bytes unchanged, and each fault does what it
says (drop, delay, truncate mid-frame, partition, stall one direction), reproducibly by seed.

Upstreams are real servers on 127.0.0.1: a TCP echo server, a recorder of what arrived, and a
real relay for the WebSocket cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # chaos/ is a folder of the checkout, not of the package
    sys.path.append(str(ROOT))

from chaos.proxy import (  # noqa: E402
    Direction,
    Fault,
    FaultKind,
    FaultProxy,
    RandomFaults,
    WebSocketFrames,
)


class Upstream:
    """A TCP server that records every byte it receives and can echo or send on demand."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.received = bytearray()
        self.closed = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return ("127.0.0.1", int(self.server.sockets[0].getsockname()[1]))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                self.received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def proxied(
    *, echo: bool = True, seed: int = 0
) -> AsyncIterator[tuple[FaultProxy, Upstream]]:
    upstream = Upstream(echo=echo)
    address = await upstream.start()
    proxy = await FaultProxy(address, seed=seed).start()
    try:
        yield proxy, upstream
    finally:
        await proxy.close()
        await upstream.stop()


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def wait_for_links(proxy: FaultProxy, n: int = 1) -> None:
    async with asyncio.timeout(5):
        while len(proxy.links) < n:
            await asyncio.sleep(0.005)


async def test_bytes_pass_through_unchanged_both_ways() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, several chunks
    async with proxied() as (proxy, upstream):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(payload)
        await writer.drain()
        assert await read_exactly(reader, len(payload)) == payload
        assert bytes(upstream.received) == payload
        writer.close()
    assert sum(proxy.counts.values()) == 0


async def test_drop_resets_the_connection_and_counts_it() -> None:
    async with proxied() as (proxy, upstream):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        assert await read_exactly(reader, 5) == b"hello"
        assert proxy.drop() == 1
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.wait_for(upstream.closed.wait(), 5)
    assert proxy.counts[FaultKind.DROP] == 1


async def test_delay_holds_every_chunk_and_keeps_the_order() -> None:
    async with proxied(seed=3) as (proxy, _):
        proxy.delay(0.15, jitter=0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = b""
        for i in range(20):
            piece = f"<{i}>".encode()
            sent += piece
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)
        got = await read_exactly(reader, len(sent))
        # there and back: at least two delays, less their jitter
        assert loop.time() - started >= 2 * (0.15 - 0.05)
        assert got == sent
        proxy.clear()
        started = loop.time()
        writer.write(b"now")
        assert await read_exactly(reader, 3) == b"now"
        assert loop.time() - started < 0.1
        writer.close()


async def test_partition_holds_everything_then_resumes() -> None:
    async with proxied() as (proxy, upstream):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await wait_for_links(proxy)
        proxy.partition(0.4)
        # a connection made during the partition is accepted, and held too
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"one")
        writer2.write(b"two")
        await asyncio.sleep(0.25)
        assert bytes(upstream.received) == b""
        assert await read_exactly(reader, 3, timeout=2) == b"one"
        assert await read_exactly(reader2, 3, timeout=2) == b"two"
        writer.close()
        writer2.close()
    assert proxy.counts[FaultKind.PARTITION] == 1


async def test_partition_that_cuts_delivers_nothing_and_resets() -> None:
    async with proxied() as (proxy, upstream):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await wait_for_links(proxy)
        proxy.partition(0.2, cut=True)
        writer.write(b"lost")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert bytes(upstream.received) == b""
        # after it, new connections work again
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"back")
        assert await read_exactly(reader, 4) == b"back"
        writer.close()


async def test_stall_stops_one_direction_while_the_other_flows() -> None:
    async with proxied(echo=False) as (proxy, upstream):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await wait_for_links(proxy)
        assert proxy.stall(Direction.DOWN, 0.4) == 1
        writer.write(b"up goes")
        await writer.drain()
        async with asyncio.timeout(2):
            while bytes(upstream.received) != b"up goes":
                await asyncio.sleep(0.005)
        upstream.writers[0].write(b"down waits")
        await asyncio.sleep(0.2)
        with pytest.raises(TimeoutError):
            await read_exactly(reader, 1, timeout=0.05)
        assert await read_exactly(reader, 10, timeout=2) == b"down waits"
        writer.close()
    assert proxy.counts[FaultKind.STALL] == 1


def _frame(payload: bytes, *, masked: bool) -> bytes:
    length = len(payload)
    head = bytes([0x82])
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", length)
    if masked:
        key = b"\x01\x02\x03\x04"
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


_UPGRADE = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000]), max_size=6),
    masked=st.booleans(),
    splits=st.lists(st.integers(min_value=1, max_value=70000), max_size=12),
)
def test_frame_tracker_finds_every_boundary_however_the_stream_is_split(
    sizes: list[int], masked: bool, splits: list[int]
) -> None:
    frames = [_frame(bytes(size), masked=masked) for size in sizes]
    stream = _UPGRADE + b"".join(frames)
    boundaries = {len(_UPGRADE)}
    for frame in frames:
        boundaries.add(max(boundaries) + len(frame))
    tracker = WebSocketFrames()
    found: set[int] = set()
    offset = 0
    cuts = [*sorted({s for s in splits if s < len(stream)}), len(stream)]
    previous = 0
    for cut in cuts:
        chunk = stream[previous:cut]
        for start, end in tracker.feed(chunk):
            found.add(offset + end)
            assert start < end
        offset += len(chunk)
        previous = cut
    # every span ends at a boundary or at a chunk's end; every boundary after a frame is an end
    assert boundaries - {len(_UPGRADE)} <= found or not frames
    assert tracker.upgraded


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=5),
    split=st.integers(min_value=0, max_value=2000),
)
def test_a_mid_frame_cut_never_lands_on_a_boundary(sizes: list[int], split: int) -> None:
    frames = [_frame(bytes(size), masked=True) for size in sizes]
    body = b"".join(frames)
    boundaries = {0}
    for frame in frames:
        boundaries.add(max(boundaries) + len(frame))
    split = min(split, len(body))
    tracker = WebSocketFrames()
    tracker.feed(_UPGRADE + body[:split])
    rest = body[split:]
    cut = tracker.mid_frame_cut(rest)
    possible = [p for p in range(1, len(rest) + 1) if split + p not in boundaries]
    if possible:  # none when the chunk only completes a frame
        assert cut is not None
        assert split + cut not in boundaries
        assert 0 < cut <= len(rest)
    else:
        assert cut is None


async def test_truncate_cuts_a_real_websocket_in_the_middle_of_a_frame(tmp_path: Path) -> None:
    upstream = Upstream(echo=False)
    address = await upstream.start()

    async def respond() -> None:  # a minimal upgrade answer, then silence
        async with asyncio.timeout(5):
            while _HEADERS_END not in bytes(upstream.received):
                await asyncio.sleep(0.005)
        upstream.writers[0].write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\n"
        )

    async with FaultProxy(address) as proxy:
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(_UPGRADE)
        await respond()
        await wait_for_links(proxy)
        upstream_bytes = len(upstream.received)
        assert proxy.truncate() == 1
        writer.write(_frame(b"x" * 1000, masked=True))
        await writer.drain()
        await asyncio.wait_for(upstream.closed.wait(), 5)
        arrived = bytes(upstream.received)[upstream_bytes:]
        assert 0 < len(arrived) < 1000 + 8, "the frame arrived whole or not at all"
    await upstream.stop()
    assert proxy.counts[FaultKind.TRUNCATE] == 1


_HEADERS_END = b"\r\n\r\n"


async def test_a_relay_behind_a_truncating_proxy_refuses_the_half_frame_and_serves_again(
    relay: Any,
) -> None:
    """The relay behind the proxy: a cut frame ends that connection, the next one works."""
    async with FaultProxy(("127.0.0.1", relay.port)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/ws"
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url) as ws:
                await wait_for_links(proxy)
                proxy.truncate()
                await ws.send_bytes(b"\x00" * 5000)
                message = await asyncio.wait_for(ws.receive(), 5)
                assert message.type in (
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.ERROR,
                )
            async with http.get(f"http://127.0.0.1:{proxy.port}/healthz") as response:
                assert response.status == 200
    assert proxy.counts[FaultKind.TRUNCATE] == 1


def test_random_faults_are_reproducible_by_seed() -> None:
    first = [RandomFaults(7).next([1, 2, 3]) for _ in range(1)]
    a, b = RandomFaults(7), RandomFaults(7)
    run_a = [a.next([1, 2, 3]) for _ in range(50)]
    run_b = [b.next([1, 2, 3]) for _ in range(50)]
    assert run_a == run_b
    assert run_a[:1] == first
    assert {fault.kind for fault in run_a} == set(FaultKind)
    assert run_a != [RandomFaults(8).next([1, 2, 3]) for _ in range(50)]


async def test_a_schedule_applies_each_fault_at_its_time() -> None:
    async with proxied() as (proxy, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await wait_for_links(proxy)
        schedule = [
            (0.0, Fault(FaultKind.DELAY, seconds=0.1, latency=0.01)),
            (0.05, Fault(FaultKind.STALL, seconds=0.05, direction=Direction.UP)),
            (0.2, Fault(FaultKind.DROP)),
        ]
        await proxy.run_schedule(schedule)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert proxy.counts == {FaultKind.DELAY: 1, FaultKind.STALL: 1, FaultKind.DROP: 1}


def test_bad_fault_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="negative"):
        Fault(FaultKind.PARTITION, seconds=-1)
