"""The relay's own WebSocket layer for ``/ws`` (server/websocket.py): the frame reader as a pure
state machine, the upgrade it takes or leaves to aiohttp, and real sockets against a real relay."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foliosync.server.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    ProtocolViolation,
    accept_key,
    parse_head,
    upgrade_key,
)
from foliosync.sync.protocol import ClientSession, Welcomed


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"\x12\x34\x56\x78"
) -> bytes:
    """A client frame as RFC 6455 has it: masked."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


# -- the frame reader ---------------------------------------------------------------------------

message = st.tuples(st.sampled_from([OP_BINARY, OP_TEXT]), st.binary(max_size=300))


@given(
    messages=st.lists(st.tuples(message, st.integers(1, 4), st.booleans()), max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
    mask=st.binary(min_size=4, max_size=4),
)
def test_messages_come_out_whole_however_the_stream_is_cut(
    messages: list[tuple[tuple[int, bytes], int, bool]], cuts: list[int], mask: bytes
) -> None:
    """Fragmented or not, with a Ping between fragments, and the bytes split anywhere."""
    stream = b""
    expected: list[tuple[int, bytes]] = []
    for (opcode, payload), parts, ping in messages:
        size = -(-len(payload) // parts) or 1
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        for n, chunk in enumerate(chunks):
            last = n == len(chunks) - 1
            stream += client_frame(opcode if n == 0 else 0, chunk, fin=last, mask=mask)
            if ping and not last:
                stream += client_frame(OP_PING, b"p", mask=mask)
                expected.append((OP_PING, b"p"))
        expected.append((opcode, payload))
    reader = FrameReader(max_size=1 << 20)
    got: list[tuple[int, bytes]] = []
    previous = 0
    for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
        got += reader.feed(stream[previous:cut])
        previous = cut
    assert got == expected


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(bytes((0x82, 0x01)) + b"x", 1002, id="unmasked"),
        pytest.param(
            client_frame(OP_BINARY, b"x")[:0] + bytes((0xC2,)) + client_frame(OP_BINARY, b"x")[1:],
            1002,
            id="reserved-bit",
        ),
        pytest.param(client_frame(OP_PING, b"x" * 126), 1002, id="long-control"),
        pytest.param(client_frame(OP_PING, b"x", fin=False), 1002, id="fragmented-control"),
        pytest.param(client_frame(0, b"x"), 1002, id="continuation-of-nothing"),
        pytest.param(
            client_frame(OP_BINARY, b"a", fin=False) + client_frame(OP_BINARY, b"b"),
            1002,
            id="message-inside-message",
        ),
        pytest.param(client_frame(0x3, b"x"), 1002, id="unknown-opcode"),
        pytest.param(client_frame(OP_BINARY, b"x" * 101), 1009, id="over-the-limit"),
        pytest.param(
            client_frame(OP_BINARY, b"x" * 60, fin=False) + client_frame(0, b"x" * 60),
            1009,
            id="fragments-over-the-limit",
        ),
    ],
)
def test_what_a_client_must_not_send_is_refused_with_its_code(data: bytes, code: int) -> None:
    with pytest.raises(ProtocolViolation) as refused:
        FrameReader(max_size=100).feed(data)
    assert refused.value.code == code


def test_a_large_message_read_in_small_pieces_comes_out_once_whole() -> None:
    """Its pieces are kept as read until the payload is whole, then a ping behind it follows."""
    payload = os.urandom(200_000)
    stream = client_frame(OP_BINARY, payload) + client_frame(OP_PING, b"after")
    reader = FrameReader(max_size=1 << 20)
    got: list[tuple[int, bytes]] = []
    for start in range(0, len(stream), 1000):
        got += reader.feed(stream[start : start + 1000])
    assert got == [(OP_BINARY, payload), (OP_PING, b"after")]


def test_an_oversized_message_is_refused_from_its_header_alone() -> None:
    """A 4 GiB length is refused before a byte of it is buffered."""
    header = bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 4 << 30) + b"mask"
    with pytest.raises(ProtocolViolation) as refused:
        FrameReader(max_size=1 << 20).feed(header)
    assert refused.value.code == 1009


# -- the upgrade ----------------------------------------------------------------------------------

KEY = base64.b64encode(b"0123456789abcdef").decode()
UPGRADE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade"
    f"\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13"
)


def test_the_accept_key_is_rfc_6455s() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_plain_upgrade_is_taken() -> None:
    head = parse_head(UPGRADE.encode())
    assert head is not None and head.path == "/ws" and head.headers["host"] == "127.0.0.1"
    assert upgrade_key(head) == KEY


@pytest.mark.parametrize(
    "change",
    [
        ("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
        (f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Key: c2hvcnQ="),
        (f"Sec-WebSocket-Key: {KEY}", f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}"),
        ("Upgrade: websocket", "Upgrade: h2c"),
        ("Connection: keep-alive, Upgrade", "Connection: keep-alive"),
        ("Host: 127.0.0.1", "Host: 127.0.0.1\r\nContent-Length: 3"),
        ("Host: 127.0.0.1", "Host: 127.0.0.1\r\nSec-WebSocket-Protocol: chat"),
        ("GET /ws", "POST /ws"),
    ],
    ids=[
        "version",
        "short-key",
        "two-keys",
        "not-websocket",
        "no-connection-upgrade",
        "body",
        "subprotocol",
        "post",
    ],
)
def test_anything_but_a_plain_upgrade_is_left_to_aiohttp(change: tuple[str, str]) -> None:
    head = parse_head(UPGRADE.replace(*change).encode())
    assert head is not None and upgrade_key(head) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /ws HTTP/1.0\r\nHost: x",
        b"GET ws HTTP/1.1\r\nHost: x",
        b"GET /ws HTTP/1.1\r\nHost : x",
        b"GET /ws HTTP/1.1\r\nHost: x\r\n folded",
        b"GET /ws HTTP/1.1\r\nHost: x\x00y",
        b"GET /w s HTTP/1.1\r\nHost: x",
    ],
    ids=["http-1.0", "relative", "space-before-colon", "obs-fold", "nul", "space-in-target"],
)
def test_a_head_not_plainly_well_formed_is_aiohttps(raw: bytes) -> None:
    assert parse_head(raw) is None


# -- real sockets, a real relay ----------------------------------------------------------------


class RawClient:
    """A WebSocket client written out by hand, to send what a library would not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = dict(line.split(": ", 1) for line in lines[1:] if line)
        return status, {k.lower(): v for k, v in fields.items()}

    async def frame(self) -> tuple[int, bytes]:
        first, second = await asyncio.wait_for(self.reader.readexactly(2), 5)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        assert not second & 0x80, "server frames are not masked"
        return first & 0x0F, await self.reader.readexactly(size)

    async def frame_of(self, opcode: int) -> bytes:
        """The next frame of this opcode (the relay may send others first, e.g. a Ping)."""
        while True:
            got, payload = await self.frame()
            if got == opcode:
                return payload

    async def closed(self) -> bool:
        """Whether the relay closed the TCP connection (EOF) within 5 s."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), 5):
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


def upgrade(extra: str = "") -> bytes:
    return (UPGRADE + extra + "\r\n\r\n").encode()


def aiohttp_connections(relay: Any) -> int:
    return len(relay.runner.server.connections)


async def hello(client: RawClient, relay: Any) -> None:
    session = ClientSession()
    client.send(client_frame(OP_BINARY, session.hello(relay.token("alice", "laptop"), "t")))
    events = session.receive_data(await client.frame_of(OP_BINARY))
    assert any(isinstance(e, Welcomed) for e in events)


async def test_an_upgrade_is_served_by_the_relays_own_layer(relay: Any) -> None:
    """The 101 carries RFC 6455's accept key, a Hello sent in the same packet as the upgrade is
    answered, and aiohttp holds nothing of the connection."""
    client = await RawClient.connect(relay.port)
    session = ClientSession()
    frame = client_frame(OP_BINARY, session.hello(relay.token("alice", "laptop"), "t"))
    client.send(upgrade() + frame)
    status, fields = await client.head()
    assert status == 101 and fields["sec-websocket-accept"] == accept_key(KEY)
    events = session.receive_data(await client.frame_of(OP_BINARY))
    assert any(isinstance(e, Welcomed) for e in events)
    assert len(relay.relay.connections) == 1 and aiohttp_connections(relay) == 0
    client.send(client_frame(OP_PING, b"are you there"))
    assert await client.frame_of(OP_PONG) == b"are you there"
    client.send(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
    assert (await client.frame_of(OP_CLOSE))[:2] == (1000).to_bytes(2, "big")
    assert await client.closed()
    for _ in range(100):
        if not relay.relay.connections:
            break
        await asyncio.sleep(0.02)
    assert not relay.relay.connections
    client.close()


async def test_a_head_dribbled_a_byte_at_a_time_is_taken(relay: Any) -> None:
    client = await RawClient.connect(relay.port)
    for byte in upgrade():
        client.send(bytes((byte,)))
        await client.writer.drain()
    status, _ = await client.head()
    assert status == 101
    await hello(client, relay)
    client.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(bytes((0x82, 0x03)) + b"abc", 1002, id="unmasked"),
        pytest.param(client_frame(OP_BINARY, os.urandom((64 << 10) + 2048)), 1009, id="too-big"),
        pytest.param(client_frame(OP_TEXT, b"\xff\xfe"), 1007, id="bad-utf8"),
    ],
)
async def test_a_broken_frame_closes_with_its_code(relay: Any, frame: bytes, code: int) -> None:
    client = await RawClient.connect(relay.port)
    client.send(upgrade())
    assert (await client.head())[0] == 101
    await hello(client, relay)
    client.send(frame)
    closing = await client.frame_of(OP_CLOSE)
    assert int.from_bytes(closing[:2], "big") == code
    assert await client.closed()
    client.close()
    scraped = ""
    for _ in range(100):
        scraped = relay.relay.metrics_response().text or ""
        if f'foliosync_connections_closed_total{{code="{code}"}} 1' in scraped:
            break
        await asyncio.sleep(0.02)
    assert f'foliosync_connections_closed_total{{code="{code}"}} 1' in scraped


async def test_a_plain_get_is_still_aiohttps_426(relay: Any) -> None:
    client = await RawClient.connect(relay.port)
    client.send(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, fields = await client.head()
    assert status == 426 and fields["upgrade"] == "websocket"
    body = await asyncio.wait_for(client.reader.readexactly(int(fields["content-length"])), 5)
    assert "WebSocket client" in json.loads(body)["error"]
    client.close()


@pytest.mark.parametrize(
    ("first", "extra", "on_aiohttp"),
    [
        pytest.param(
            b"",
            "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
            0,
            id="extension-offered",
        ),
        pytest.param(b"", "\r\nSec-WebSocket-Protocol: chat", 1, id="subprotocol"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "", 1, id="after-a-get"),
    ],
)
async def test_which_layer_serves_an_upgrade(
    relay: Any, first: bytes, extra: str, on_aiohttp: int
) -> None:
    """An extension offered, as browsers offer permessage-deflate, is declined and the upgrade
    is the relay's own; asked for a subprotocol (which neither agrees to), or on a connection
    that served a request before, it is aiohttp's. Either way no extension is agreed and the
    conversation is the same."""
    client = await RawClient.connect(relay.port)
    if first:
        client.send(first)
        status, fields = await client.head()
        assert status == 200
        await client.reader.readexactly(int(fields["content-length"]))
    client.send(upgrade(extra))
    status, fields = await client.head()
    assert status == 101 and "sec-websocket-extensions" not in fields
    await hello(client, relay)
    assert aiohttp_connections(relay) == on_aiohttp
    client.close()


async def test_a_stopping_relay_closes_its_own_sockets_with_1001(
    tmp_path: Path, relay_server: Any
) -> None:
    async with relay_server(tmp_path / "relay") as relay:
        client = await RawClient.connect(relay.port)
        client.send(upgrade())
        assert (await client.head())[0] == 101
        await hello(client, relay)
        stopping = asyncio.get_running_loop().create_task(relay.stop())
        closing = await client.frame_of(OP_CLOSE)
        assert int.from_bytes(closing[:2], "big") == 1001
        client.send(client_frame(OP_CLOSE, closing[:2]))
        await asyncio.wait_for(stopping, 10)
        assert await client.closed()
        client.close()
