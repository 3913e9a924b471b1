"""The relay's own WebSocket connections for ``GET /ws``, beside aiohttp's HTTP server.

Why: an open connection served by aiohttp keeps, for its whole life, the HTTP request as parsed,
aiohttp's connection protocol and HTTP parser, the WebSocketResponse with its reader, data queue
and writer, and two tasks: about 10 KiB of a relay's 24 KiB per connected device, where a
device's own state (its session, identity, subscriptions) is 6 KiB. Here a connection is one
slotted protocol object on the transport, and the relay's one task per connection.

How: every new connection starts on :class:`FrontProtocol`, which reads the request head. A
well-formed WebSocket upgrade of ``GET /ws`` (HTTP/1.1, version 13, a valid key, no body, no
subprotocol; extensions offered are declined, as aiohttp declines them) is answered here and the
socket handed to :class:`ServerWebSocket`; anything else, and anything unusual about an upgrade,
is handed with the bytes read so far to aiohttp's connection protocol, which answers it exactly
as before (426 for a plain GET, its own errors for a malformed head). The relay's Connection
talks to either through the same few methods (``receive``, ``send_bytes``, ``close``,
``closed``, ``close_code``, ``exception``), so aiohttp's path stays whole for other runners.

:class:`FrameReader` is the pure part, bytes in, frames out (RFC 6455, section 5): client frames
must be masked, control frames short and whole, no reserved bits (no extension is negotiated),
messages no larger than the limit, text valid UTF-8.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import WebSocketError, WSCloseCode, WSMessage, WSMsgType
from multidict import CIMultiDict, CIMultiDictProxy

from foliosync.sync.errors import FolioSyncError

__all__ = [
    "FrameReader",
    "FrontProtocol",
    "ProtocolViolation",
    "RequestHead",
    "ServerWebSocket",
    "WebSocketFront",
    "accept_key",
    "close_frame",
    "parse_head",
    "server_frame",
    "upgrade_key",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16 << 10  # larger heads go to aiohttp, which answers them with its own limits
HEAD_TIMEOUT = 10.0  # a head not complete by then goes to aiohttp as it is
_LINGER_S = 1.0  # after a violation: how long the peer's bytes are read and dropped before closing
READ_LIMIT = 64 << 10  # received bytes waiting for the relay above which reading pauses

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_CONTROL = frozenset((OP_CLOSE, OP_PING, OP_PONG))
_DATA = frozenset((OP_TEXT, OP_BINARY))
# Close codes a peer may send (RFC 6455, 7.4.1; 1005, 1006 and 1015 are never on the wire).
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


class ProtocolViolation(FolioSyncError):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _unmask(mask: bytes, data: bytes) -> bytes:
    """XOR with the 4-byte mask, as one big-integer operation (C speed, no per-byte loop)."""
    size = len(data)
    if not size:
        return data
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


class FrameReader:
    """Client frames from a byte stream: ``feed`` returns whole messages and control frames as
    (opcode, payload) pairs, a fragmented message once, whole; raises :class:`ProtocolViolation`
    at the first thing a client must not send. After a violation the reader is spent."""

    __slots__ = (
        "_buffer",
        "_chunks",
        "_fragments",
        "_fragments_size",
        "_have",
        "_max_size",
        "_need",
        "_opcode",
    )

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._buffer = b""  # the start of a frame whose header is not whole yet
        # A frame whose header was read and whose payload is under way: its bytes so far, kept
        # as read and joined once it is whole (joined at every read, a 4 MiB message read in
        # 64 KiB pieces was copied 64 times over).
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self._opcode = -1  # the opcode of the fragmented message under way; -1: none
        self._fragments: list[bytes] = []
        self._fragments_size = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._need:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._chunks)
            self._chunks = []
            self._have = self._need = 0
        else:
            buf = self._buffer + data if self._buffer else data
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        need = 0  # bytes of the frame at pos, if its header is whole and its payload is not
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if first & 0x70:
                raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "reserved bits set")
            if not second & 0x80:
                raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "client frame not masked")
            size = second & 0x7F
            head = 6
            if size == 126:
                if end - pos < 8:
                    break
                size = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 8
            elif size == 127:
                if end - pos < 14:
                    break
                size = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 14
            opcode, fin = first & 0x0F, first & 0x80
            if opcode in _CONTROL:
                if size > 125 or not fin:
                    raise ProtocolViolation(
                        WSCloseCode.PROTOCOL_ERROR, "control frame fragmented or over 125 bytes"
                    )
            elif size + self._fragments_size > self._max_size:
                raise ProtocolViolation(
                    WSCloseCode.MESSAGE_TOO_BIG,
                    f"message over the limit of {self._max_size} bytes",
                )
            if end - pos < head + size:
                need = head + size
                break
            mask = buf[pos + head - 4 : pos + head]
            payload = _unmask(mask, buf[pos + head : pos + head + size])
            pos += head + size
            self._frame(opcode, bool(fin), payload, out)
        rest = buf[pos:] if pos < end else b""
        if need:
            self._buffer = b""
            self._chunks = [rest]
            self._have, self._need = len(rest), need
        else:
            self._buffer = rest
        return out

    def _frame(self, opcode: int, fin: bool, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if opcode in _CONTROL:
            out.append((opcode, payload))
            return
        if opcode == OP_CONTINUATION:
            if self._opcode < 0:
                raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "continuation of nothing")
        elif opcode in _DATA:
            if self._opcode >= 0:
                raise ProtocolViolation(
                    WSCloseCode.PROTOCOL_ERROR, "a new message inside a fragmented one"
                )
            if fin:
                out.append((opcode, payload))
                return
            self._opcode = opcode
        else:
            raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
        self._fragments.append(payload)
        self._fragments_size += len(payload)
        if fin:
            out.append((self._opcode, b"".join(self._fragments)))
            self._opcode = -1
            self._fragments = []
            self._fragments_size = 0


def server_frame(opcode: int, payload: bytes) -> bytes:
    """A whole unmasked frame, as a server sends it."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


def close_frame(code: int, message: bytes = b"") -> bytes:
    return server_frame(OP_CLOSE, code.to_bytes(2, "big") + message[:123])


# -- the request head ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # as sent: path and query
    path: str
    headers: CIMultiDictProxy[str]


_NOT_VISIBLE = re.compile(rb"[^\x21-\x7e]")
_CONTROL_CHARS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_head(head: bytes) -> RequestHead | None:
    """The request line and header fields of an HTTP/1.1 head (without its blank line), or None
    if anything in it is not plainly well-formed: such a head is aiohttp's to answer."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
        return None
    method, target = parts[0], parts[1]
    if not method or not set(method) <= _TOKEN or _NOT_VISIBLE.search(target):
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not set(name) <= _TOKEN:
            return None  # obs-fold, a space before the colon, an empty name
        if _CONTROL_CHARS.search(value):
            return None
        headers.add(name.decode("ascii"), value.strip(b" \t").decode("latin-1"))
    text = target.decode("ascii")
    return RequestHead(
        method.decode("ascii"), text, text.partition("?")[0], CIMultiDictProxy(headers)
    )


def _tokens(headers: CIMultiDictProxy[str], name: str) -> list[str]:
    return [t.strip().lower() for value in headers.getall(name, ()) for t in value.split(",")]


def upgrade_key(head: RequestHead) -> str | None:
    """The Sec-WebSocket-Key of a plain WebSocket upgrade the relay takes itself; None for
    anything else (no upgrade, a body, another version, a subprotocol asked for, a key that is
    not 16 bytes in base64)."""
    headers = head.headers
    if head.method != "GET" or "websocket" not in _tokens(headers, "Upgrade"):
        return None
    if "upgrade" not in _tokens(headers, "Connection"):
        return None
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        return None
    if headers.getall("Sec-WebSocket-Version", ()) != ["13"]:
        return None
    # Extensions offered (browsers offer permessage-deflate) are declined by answering without
    # any, as RFC 6455 allows; a subprotocol asked for is aiohttp's to refuse.
    if "Sec-WebSocket-Protocol" in headers:
        return None
    keys = headers.getall("Sec-WebSocket-Key", ())
    if len(keys) != 1:
        return None
    try:
        if len(base64.b64decode(keys[0], validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return keys[0]


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def _switching(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode("ascii")


# -- the protocols ---------------------------------------------------------------------------

Take = Callable[[RequestHead, "ServerWebSocket", asyncio.Transport], None]


@dataclass(frozen=True, slots=True)
class WebSocketFront:
    """Which upgrades the relay serves itself, and how: ``take`` gets each upgraded connection
    (its head, its socket, the transport) once the 101 answer is written."""

    paths: frozenset[str]
    take: Take
    max_size: int  # a message over this many bytes closes the connection with 1009
    heartbeat: float | None  # seconds without a frame before a Ping; None: no heartbeat


class FrontProtocol(asyncio.Protocol):
    """A new connection until its request head is read: the relay's if it is a plain upgrade of
    one of the front's paths, aiohttp's (``make_http()``, given every byte read) otherwise."""

    __slots__ = ("_buffer", "_front", "_make_http", "_timer", "_transport")

    def __init__(self, make_http: Callable[[], asyncio.Protocol], front: WebSocketFront) -> None:
        self._make_http = make_http
        self._front = front
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not asyncio.Transport's
        # subclasses, though they offer all of it.
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HEAD_TIMEOUT, self._to_http)

    def data_received(self, data: bytes) -> None:
        searched = max(0, len(self._buffer) - 3)
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n", searched)
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._to_http()
            return
        head = parse_head(self._buffer[:end])
        front = self._front
        key = None
        if head is not None and head.path in front.paths:
            key = upgrade_key(head)
        if head is None or key is None:
            self._to_http()
            return
        self._cancel_timer()
        transport = self._transport
        assert transport is not None
        rest = self._buffer[end + 4 :]
        self._buffer = b""
        ws = ServerWebSocket(max_size=front.max_size, heartbeat=front.heartbeat)
        transport.set_protocol(ws)
        ws.connection_made(transport)
        transport.write(_switching(key))
        front.take(head, ws, transport)
        if rest:
            ws.data_received(rest)

    def eof_received(self) -> bool | None:
        protocol = self._to_http()
        return protocol.eof_received() if protocol is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._transport = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _to_http(self) -> asyncio.Protocol | None:
        """Hand the connection, and what it sent so far, to aiohttp."""
        self._cancel_timer()
        transport = self._transport
        if transport is None:
            return None
        self._transport = None
        protocol = self._make_http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._buffer:
            data, self._buffer = self._buffer, b""
            protocol.data_received(data)
        return protocol


_CLOSED = WSMessage(WSMsgType.CLOSED, None, None)
_CLOSING = WSMessage(WSMsgType.CLOSING, None, None)


class ServerWebSocket(asyncio.Protocol):
    """One upgraded connection: what aiohttp's WebSocketResponse offers the relay's Connection
    (``receive``, ``send_bytes``, ``close``, ``closed``, ``close_code``, ``exception``), with
    pings answered, a heartbeat (a Ping after ``heartbeat`` s without a frame; cut with 1006 if
    no Pong comes within half of it), and reading paused while the relay is behind."""

    __slots__ = (
        "_close_sent",
        "_closed",
        "_drain",
        "_exception",
        "_heartbeat",
        "_last_read",
        "_messages",
        "_paused",
        "_peer_closed",
        "_ping_timer",
        "_pong_timer",
        "_queued",
        "_reader",
        "_transport",
        "_waiter",
        "_write_paused",
        "close_code",
    )

    def __init__(self, *, max_size: int, heartbeat: float | None) -> None:
        self._reader: FrameReader | None = FrameReader(max_size)
        self._transport: asyncio.Transport | None = None
        # Only while messages wait: most sockets hold none between reads, and an empty deque
        # is 0.7 KiB of each (one made per burst of frames costs a fraction of a microsecond).
        self._messages: collections.deque[WSMessage] | None = None
        self._queued = 0  # bytes of the data messages waiting in _messages
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closed = False  # the socket is gone, or the closing handshake is over
        self._close_sent = False
        self._peer_closed: asyncio.Future[None] | None = None  # close(): the peer's Close frame
        self._exception: BaseException | None = None
        self._heartbeat = heartbeat
        self._last_read = 0.0
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self.close_code: int | None = None

    # -- what the relay's Connection uses

    @property
    def closed(self) -> bool:
        return self._closed or self._close_sent

    def exception(self) -> BaseException | None:
        return self._exception

    async def receive(self, timeout: float | None = None) -> WSMessage:
        while not self._messages:
            if self._closed:
                return _CLOSED
            if self._close_sent:
                return _CLOSING
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            try:
                if timeout is None:
                    await waiter
                else:
                    async with asyncio.timeout(timeout):
                        await waiter
            finally:
                self._waiter = None
        messages = self._messages
        assert messages is not None
        message = messages.popleft()
        if not messages:
            self._messages = None
        if message.type is WSMsgType.BINARY or message.type is WSMsgType.TEXT:
            self._queued -= len(message.data)
            if self._paused and self._queued < READ_LIMIT // 2 and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
        return message

    async def send_bytes(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self.closed:
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(server_frame(OP_BINARY, data))
        if self._write_paused:
            await self._drained()

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        """The closing handshake: a Close frame, then the peer's (frames before it are dropped);
        the caller bounds the wait. False if the socket was already closed or closing."""
        transport = self._transport
        if self._closed or self._close_sent or transport is None:
            return False
        self._close_sent = True
        self.close_code = code
        transport.write(close_frame(code, message))
        self._cancel_heartbeat()
        self._wake()  # a reader waiting gets CLOSING, as from aiohttp's close()
        self._peer_closed = asyncio.get_running_loop().create_future()
        try:
            await self._peer_closed
        finally:
            self._peer_closed = None
            self._closed = True
            transport.close()
        return True

    # -- asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: see FrontProtocol
        if self._heartbeat:
            self._last_read = time.monotonic()
            self._ping_timer = asyncio.get_running_loop().call_later(
                self._heartbeat, self._ping_due
            )

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            return
        self._last_read = time.monotonic()
        try:
            frames = reader.feed(data)
        except ProtocolViolation as exc:
            self._violation(exc)
            return
        for opcode, payload in frames:
            if opcode == OP_BINARY:
                self._push(WSMessage(WSMsgType.BINARY, payload, None), len(payload))
            elif opcode == OP_TEXT:
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    self._violation(ProtocolViolation(WSCloseCode.INVALID_TEXT, "invalid UTF-8"))
                    return
                self._push(WSMessage(WSMsgType.TEXT, text, None), len(payload))
            elif opcode == OP_PING:
                if not self._close_sent and self._transport is not None:
                    self._transport.write(server_frame(OP_PONG, payload))
            elif opcode == OP_PONG:
                if self._pong_timer is not None:
                    self._pong_timer.cancel()
                    self._pong_timer = None
            else:
                self._peer_close(payload)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._reader = None
        self._cancel_heartbeat()
        if not self._closed:
            self._closed = True
            if self.close_code is None:
                self.close_code = WSCloseCode.ABNORMAL_CLOSURE
        self._wake()
        if self._peer_closed is not None and not self._peer_closed.done():
            self._peer_closed.set_result(None)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the connection was lost"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    # -- inside

    async def _drained(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    def _push(self, message: WSMessage, size: int) -> None:
        if self._close_sent:
            return  # after our Close frame, frames until the peer's are dropped
        self._queue().append(message)
        self._queued += size
        if self._queued > READ_LIMIT and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def _queue(self) -> collections.deque[WSMessage]:
        messages = self._messages
        if messages is None:
            messages = self._messages = collections.deque()
        return messages

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _peer_close(self, payload: bytes) -> None:
        self._reader = None
        code: int = WSCloseCode.OK
        reason = ""
        if len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                reason = ""
        elif payload:
            code = WSCloseCode.PROTOCOL_ERROR
        if self._close_sent:  # the answer to ours: the handshake is over
            if self._peer_closed is not None and not self._peer_closed.done():
                self._peer_closed.set_result(None)
            return
        if len(payload) >= 2 and code not in _VALID_CLOSE and not 3000 <= code < 5000:
            code = WSCloseCode.PROTOCOL_ERROR
        self.close_code = code
        self._close_sent = True
        self._closed = True
        self._cancel_heartbeat()
        transport = self._transport
        if transport is not None:
            transport.write(close_frame(code if len(payload) >= 2 else WSCloseCode.OK))
            transport.close()
        self._queue().append(WSMessage(WSMsgType.CLOSE, code, reason))
        self._wake()

    def _violation(self, exc: ProtocolViolation) -> None:
        """The peer broke the protocol: as aiohttp does, an ERROR message for the reader, a
        Close frame with the code, and the socket closed."""
        self._reader = None
        self._exception = WebSocketError(exc.code, str(exc))
        self._queue().append(WSMessage(WSMsgType.ERROR, self._exception, None))
        self.close_code = exc.code
        self._close_sent = True
        self._closed = True
        self._cancel_heartbeat()
        transport = self._transport
        if transport is not None:
            transport.write(close_frame(exc.code, str(exc).encode()))
            # Not closed at once: bytes of the peer's still unread then make the kernel answer
            # with a reset, which can destroy the Close frame before the peer reads it. What
            # comes meanwhile is dropped (no reader).
            asyncio.get_running_loop().call_later(_LINGER_S, transport.close)
        self._wake()

    def _ping_due(self) -> None:
        self._ping_timer = None
        transport, heartbeat = self._transport, self._heartbeat
        if transport is None or not heartbeat or self.closed:
            return
        loop = asyncio.get_running_loop()
        quiet = time.monotonic() - self._last_read
        if quiet < heartbeat:  # a frame came since: wait the rest
            self._ping_timer = loop.call_later(heartbeat - quiet, self._ping_due)
            return
        transport.write(server_frame(OP_PING, b""))
        if self._pong_timer is None:
            self._pong_timer = loop.call_later(heartbeat / 2, self._pong_missed)
        self._ping_timer = loop.call_later(heartbeat, self._ping_due)

    def _pong_missed(self) -> None:
        """No Pong in time: cut the connection as aiohttp does (1006, a TimeoutError kept)."""
        self._pong_timer = None
        if self._closed:
            return
        self._exception = TimeoutError("No PONG received")
        self.close_code = WSCloseCode.ABNORMAL_CLOSURE
        self._closed = True
        self._reader = None
        self._cancel_heartbeat()
        if self._transport is not None:
            self._transport.abort()
        self._wake()

    def _cancel_heartbeat(self) -> None:
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = None
