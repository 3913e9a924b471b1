"""A minimal WebSocket client for load processes: what a benchmark's clients cost is theirs.

The price benchmark's load processes share two cores with the server under test. With aiohttp's
client each received frame cost a reader task's wake-up, a message object and a queue (about
15 µs), so at 1,000 clients the load alone took a core and its scheduling delay showed up in the
servers' latency. :class:`RawWebSocket` is an :class:`asyncio.Protocol` that does the opening
handshake (RFC 6455 section 4.1), masks what it sends and hands each received binary frame's
payload to a callback from ``data_received``: no task or object per frame. It answers the
server's pings, takes no fragmented or compressed messages (servers under test send neither),
and is for benchmarks only: it trusts the server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["RawWebSocket", "connect"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_BINARY, _CLOSE, _PING, _PONG = 0x2, 0x8, 0x9, 0xA
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def _client_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        head = bytes((0x80 | opcode, 0x80 | 126)) + _U16.pack(n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + _U64.pack(n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class RawWebSocket(asyncio.Protocol):
    """One client connection; ``on_frame(payload)`` is called for each binary frame received."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._buffer = b""
        self._upgraded = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.on_frame: Callable[[bytes], None] = lambda payload: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_bytes(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_client_frame(_BINARY, payload))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_client_frame(_CLOSE, _U16.pack(1000)))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the upgrade: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            self._handshake(buffer[: end + 4])
            buffer = buffer[end + 4 :]
            if self.transport is None or self.transport.is_closing():
                return
        at, size = 0, len(buffer)
        on_frame = self.on_frame
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length = second & 0x7F
            start = at + 2
            if length == 126:
                if size - start < 2:
                    break
                (length,) = _U16.unpack_from(buffer, start)
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                (length,) = _U64.unpack_from(buffer, start)
                start += 8
            if second & 0x80:  # a server never masks
                self._fail("a masked frame from the server")
                return
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode == _BINARY and first & 0x80:
                on_frame(buffer[start:end])
            elif opcode == _PING:
                assert self.transport is not None
                self.transport.write(_client_frame(_PONG, buffer[start:end]))
            elif opcode == _CLOSE:
                self.close()
                return
            elif opcode != _PONG:
                self._fail(f"unexpected frame (opcode {opcode}, fin {first >> 7})")
                return
            at = end
        self._buffer = buffer[at:] if at < size else b""

    def _handshake(self, head: bytes) -> None:
        status, _, rest = head.partition(b"\r\n")
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in rest.split(b"\r\n") if line)
        }
        if status.split(b" ")[1:2] != [b"101"] or headers.get(b"sec-websocket-accept") != expected:
            self._fail(f"no upgrade: {status.decode(errors='replace')}")
            return
        self._upgraded = True
        self.opened.set_result(None)

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        assert self.transport is not None
        self.transport.abort()


async def connect(url: str) -> RawWebSocket:
    """Open ``ws://host:port/path`` and wait for the upgrade."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
        raise ValueError(f"a ws://host:port/path URL, not {url!r}")
    key = base64.b64encode(os.urandom(16))
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        lambda: RawWebSocket(key), parts.hostname, parts.port
    )
    assert protocol.transport is not None
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    protocol.transport.write(request.encode())
    try:
        await protocol.opened
    except BaseException:
        protocol.transport.abort()
        raise
    return protocol
