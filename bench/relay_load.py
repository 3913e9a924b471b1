"""Load clients for the relay benchmark, and the process that runs many of them.

A thousand :class:`~foliosync.client.sync.SyncClient`\\ s would mean a thousand SQLite replicas and
aiohttp sessions; the relay cannot tell them from the lightweight devices here, which speak the
same protocol over the same WebSocket, keep their documents in plain pycrdt docs built with the
document models, and reconnect with the same :class:`~foliosync.client.sync.Backoff`. Two kinds:

- :class:`FolioDevice`: a foliosync device (Hello, Welcome, SyncRequest per document, SyncReply,
  Update of what the relay lacks, Ack). A *reader* (documents given as ``None``) asks for a whole
  document, keeps none of it, and only counts the Updates fanned out to it. A device may also
  follow prices (Subscribe after each Welcome; PriceBatch frames counted, and timed against each
  tick's time stamp when asked) and apply the Updates fanned out to it, as a real device does.
- :class:`YDevice`: a client of the y-websocket protocol (pycrdt-websocket's server), for the
  comparison: sync step 1/2, then counts the update messages of its room.

Both run on :class:`WsConnection`, a minimal RFC 6455 client on an asyncio protocol: a reading
client costs one callback per TCP read, so one process can keep a thousand sockets reading.

Run as ``python -m bench.relay_load``: a load process that reads one JSON command per line on
stdin and answers one JSON line on stdout (see :func:`serve`). It only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import math
import os
import random
import resource
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

import msgpack
from pycrdt import (
    Doc,
    TransactionEvent,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    merge_updates,
)

from foliosync.client.sync import Backoff
from foliosync.sync.errors import FolioSyncError
from foliosync.sync.model import (
    INDEX_DOCUMENT_ID,
    DocumentKind,
    DocumentModel,
    EditContext,
    Portfolio,
    UserIndex,
    Watchlist,
    document_id,
)
from foliosync.sync.protocol import (
    Acked,
    ClientSession,
    ErrorReceived,
    PingReceived,
    PricesReceived,
    SyncReplied,
    UpdateReceived,
    Welcomed,
)
from foliosync.sync.updates import decode_update

__all__ = [
    "FolioDevice",
    "WsConnection",
    "YDevice",
    "build_documents",
    "build_user_documents",
    "load_loop",
    "raise_nofile_limit",
    "run_load",
    "update_edits",
    "update_items",
    "update_key",
]

HOST = "127.0.0.1"
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
MAX_FRAME = 64 << 20
UPDATE_PREFIX = b"\x96\x0c"  # msgpack: a 6-element array whose type code is 12 (Update)
Y_UPDATE_PREFIX = b"\x00\x02"  # y-websocket: a sync message of type update
PRICE_BATCH_PREFIX = b"\x92\x2b"  # msgpack: [43, ticks], a PriceBatch
HEARTBEAT_S = 30.0  # a protocol Ping this often per connected device, as SyncClient sends it


def raise_nofile_limit(wanted: int = 65536) -> int:
    """Raise this process's open-file limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


@functools.lru_cache(maxsize=512)
def update_items(update: bytes) -> tuple[tuple[int, int], ...]:
    """(client, clock) of every edit in an update of several clients' blocks: the relay merges
    two editors' changes into one, and reaching the second block takes a walk of the first
    one's structs (:func:`foliosync.sync.updates.decode_update`). One clock per edit, as the
    fan-out's edits are (:func:`one_struct`). Cached: the relay sends the same merged update to
    every receiver, and a load process holds hundreds of them."""
    info = decode_update(update)
    return tuple(
        (client, clock)
        for client, span in info.structs.items()
        for start, end in info.covered.get(client) or (span,)
        for clock in range(start, end)
    )


def update_edits(update: bytes) -> tuple[int, int, int]:
    """(client id, first clock, structs) of a one-client update: the edits it carries, when each
    edit is one struct, as the fan-out's edits are (a set_note; :func:`one_struct` checks each).
    A relay that merges the changes of a busy document sends several in one update: their
    structs stay one per edit, consecutive in clock."""
    _, pos = _varuint(update, 0)  # clients in the update
    structs, pos = _varuint(update, pos)  # structs of the first client
    client, pos = _varuint(update, pos)
    clock, _ = _varuint(update, pos)
    return client, clock, structs


def one_struct(update: bytes) -> bytes:
    """``update`` if it is one struct of one client, else ValueError: what counting edits by
    structs (:func:`update_edits`) takes for granted."""
    clients, pos = _varuint(update, 0)
    structs, _ = _varuint(update, pos)
    if (clients, structs) != (1, 1):
        raise ValueError(f"an edit of {clients} clients and {structs} structs: counted wrong")
    return update


def update_key(update: bytes) -> tuple[int, int]:
    """(client id, first clock) of a one-client pycrdt update (Yjs v1): which edit it carries.

    The relay forwards an update as it got it and pycrdt-websocket re-encodes the transaction it
    applied, whose structs start at the same clock, so both sides of a hop agree on the key.
    """
    _, pos = _varuint(update, 0)  # clients in the update
    _, pos = _varuint(update, pos)  # structs of the first client
    client, pos = _varuint(update, pos)
    clock, _ = _varuint(update, pos)
    return client, clock


# -- the WebSocket ---------------------------------------------------------------------------


class WsConnection(asyncio.Protocol):
    """A minimal WebSocket client connection: binary messages in and out, pings answered."""

    def __init__(self, owner: Any, port: int, path: str) -> None:
        self.owner = owner
        self.port = port
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.buffer = b""  # the start of a frame not yet whole
        self.opened = False
        self.fragments: bytearray | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError("closed during the handshake"))
        if not self.done.done():
            self.done.set_result(None)
        self.owner.on_close(self)

    def data_received(self, data: bytes) -> None:
        # The hot path of every load process: a whole binary frame goes to the owner straight
        # from the bytes read, with one slice and no copy of the rest; only a partial frame is
        # kept for the next read.
        buffer = self.buffer + data if self.buffer else data
        if not self.opened:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            buffer = buffer[end + 4 :]
            if b" 101 " not in status:
                if not self.handshake.done():
                    self.handshake.set_exception(ConnectionError(status.decode(errors="replace")))
                self.abort()
                return
            self.opened = True
            self.handshake.set_result(None)
            self.owner.on_open(self)
        on_message = self.owner.on_message
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            length, start = second & 0x7F, pos + 2
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
            mask = b""
            if second & 0x80:  # servers do not mask, but a tolerant reader costs nothing
                if size - start < 4:
                    break
                mask = buffer[start : start + 4]
                start += 4
            end = start + length
            if end > size:
                break
            payload = buffer[start:end]
            pos = end
            if mask:
                payload = _xor(payload, mask)
            if first == 0x82:  # a whole binary message, nearly every frame
                on_message(self, payload)
                continue
            self._frame(first & 0x80, first & 0x0F, payload)
            if self.transport is None or self.transport.is_closing():
                break
        self.buffer = buffer[pos:] if pos < size else b""

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (1, 2):
            if fin:
                self.owner.on_message(self, payload)
            else:
                self.fragments = bytearray(payload)
        elif opcode == 0 and self.fragments is not None:
            self.fragments += payload
            if fin:
                message, self.fragments = bytes(self.fragments), None
                self.owner.on_message(self, message)
        elif opcode == 9:
            self.send(payload, opcode=0xA)
        elif opcode == 8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.send(payload[:2], opcode=8)
            if self.transport is not None:
                self.transport.close()

    def send(self, payload: bytes, opcode: int = 2) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        size = len(payload)
        if size < 126:
            head = bytes((0x80 | opcode, 0x80 | size))
        elif size < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
        mask = os.urandom(4)
        transport.write(head + mask + _xor(payload, mask))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.send((1000).to_bytes(2, "big"), opcode=8)
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _xor(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


# -- documents -------------------------------------------------------------------------------


def build_documents(
    device: str, watchlist: str | None, portfolio: str | None, symbols: int = 3
) -> dict[str, DocumentModel]:
    """A user's documents as a device would create them: the index, a watchlist, a portfolio."""
    context = EditContext(device)
    client_id = random.randrange(1, 2**31 - 1)
    index = UserIndex(Doc(client_id=client_id), context)
    models: dict[str, DocumentModel] = {INDEX_DOCUMENT_ID: index}
    if watchlist is not None:
        wl = Watchlist(Doc(client_id=client_id), context)
        wl.initialize(watchlist)
        wl.add([f"S{n:03d}" for n in range(symbols)])
        doc_id = document_id(DocumentKind.WATCHLIST, watchlist)
        index.register(doc_id, DocumentKind.WATCHLIST, watchlist)
        models[doc_id] = wl
    if portfolio is not None:
        pf = Portfolio(Doc(client_id=client_id), context)
        pf.initialize(portfolio)
        pf.add_trade("S000", 10, "101.25", 1_700_000_000_000)
        doc_id = document_id(DocumentKind.PORTFOLIO, portfolio)
        index.register(doc_id, DocumentKind.PORTFOLIO, portfolio)
        models[doc_id] = pf
    return models


def build_user_documents(
    device: str,
    watchlists: Sequence[str],
    portfolios: Sequence[str],
    *,
    create: bool = True,
    symbols: Sequence[str] = ("S000", "S001", "S002"),
) -> dict[str, DocumentModel]:
    """A user's index and documents, as the device that created them has them (``create``), or
    as another device of that user starts: the same document ids over empty docs, which its
    first sync fills from the relay (a second device never initializes a document itself)."""
    context = EditContext(device)
    client_id = random.randrange(1, 2**31 - 1)
    index = UserIndex(Doc(client_id=client_id), context)
    models: dict[str, DocumentModel] = {INDEX_DOCUMENT_ID: index}
    for name in watchlists:
        wl = Watchlist(Doc(client_id=client_id), context)
        doc_id = document_id(DocumentKind.WATCHLIST, name)
        if create:
            wl.initialize(name)
            wl.add(symbols)
            index.register(doc_id, DocumentKind.WATCHLIST, name)
        models[doc_id] = wl
    for name in portfolios:
        pf = Portfolio(Doc(client_id=client_id), context)
        doc_id = document_id(DocumentKind.PORTFOLIO, name)
        if create:
            pf.initialize(name)
            pf.add_trade(symbols[0], 10, "101.25", 1_700_000_000_000)
            index.register(doc_id, DocumentKind.PORTFOLIO, name)
        models[doc_id] = pf
    return models


def _nothing_missing(doc: Doc[Any], diff: bytes) -> bool:
    return diff == doc.get_update(doc.get_state())


# -- a foliosync device ----------------------------------------------------------------------


class FolioDevice:
    """A device speaking the foliosync protocol to the relay, without a replica."""

    def __init__(
        self,
        port: int,
        token: str,
        models: dict[str, DocumentModel | None],
        *,
        reconnect: bool = False,
        on_update: Callable[[FolioDevice, bytes], None] | None = None,
        name: str = "bench",
        subscribe: Sequence[str] = (),
        price_latency: list[float] | None = None,
        apply_remote: bool = False,
    ) -> None:
        self.port = port
        self.token = token
        self.models = models  # doc id -> model; None: read the document, keep nothing
        self.reconnect = reconnect
        self.on_update = on_update
        self.name = name
        self.subscribe = tuple(subscribe)  # symbols followed, subscribed after every Welcome
        # Where to put each received tick's age in ms (now - its time stamp); None: only count.
        self.price_latency = price_latency
        self.apply_remote = apply_remote  # apply fanned-out Updates to the models
        self.prices_live = False  # the PriceSnapshot of this connection's Subscribe came
        self.price_batches = 0
        self.price_ticks = 0
        self.backoff = Backoff()
        self.conn: WsConnection | None = None
        self.session: ClientSession | None = None
        self.seq = 0
        self.pending: dict[str, int] = {}  # doc -> seq of its newest local change not acked
        self.in_flight: dict[str, int] = {}
        self.live: set[str] = set()  # documents synced on this connection
        self.synced_at: float | None = None  # monotonic: when everything was last in sync
        self.welcomed_at: float | None = None  # monotonic: the last Welcome
        self.in_sync = asyncio.Event()
        self.updates = 0  # Updates fanned out to this device
        self.connects = 0
        self.failed_connects = 0
        self.disconnects = 0
        self.errors: list[str] = []
        self.acked: dict[int, float] = {}  # seq -> monotonic time of its Ack
        self.stopping = False
        # monotonic: this connection's last Ping, or its Welcome; none before it (inf)
        self.pinged_at = math.inf
        self._pings = 0
        self._captured: list[bytes] = []
        for model in models.values():
            if model is not None:
                model.doc.observe(self._capture)

    def _capture(self, event: TransactionEvent) -> None:
        self._captured.append(event.update)

    # -- life cycle

    async def connect(self, timeout: float = 10.0) -> WsConnection:
        """Open one connection and complete the WebSocket handshake (ConnectionError if not)."""
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: WsConnection(self, self.port, "/ws"), HOST, self.port
                ),
                timeout,
            )
            await asyncio.wait_for(conn.handshake, timeout)
        except (OSError, TimeoutError) as exc:
            self.failed_connects += 1
            raise ConnectionError(str(exc)) from exc
        self.connects += 1
        return conn

    async def run(self) -> None:
        """Connect; with ``reconnect``, keep reconnecting as SyncClient.run does."""
        while not self.stopping:
            try:
                conn = await self.connect()
                await conn.done
            except ConnectionError:
                pass
            if not self.reconnect or self.stopping:
                return
            await asyncio.sleep(self.backoff.next_delay())

    def close(self) -> None:
        self.stopping = True
        if self.conn is not None:
            self.conn.close()

    def drop(self) -> bool:
        """Cut the connection as a lost network would (no closing handshake); with
        ``reconnect``, run() comes back after its backoff. False if it was not connected."""
        if self.conn is None or self.stopping:
            return False
        self.conn.abort()
        return True

    # -- events

    def on_open(self, conn: WsConnection) -> None:
        self.conn = conn
        self.session = ClientSession(max_frame_size=MAX_FRAME)
        self.live.clear()
        self.in_flight.clear()
        self.prices_live = False
        self.pinged_at = math.inf  # until the Welcome
        conn.send(self.session.hello(self.token, self.name))

    def on_close(self, conn: WsConnection) -> None:
        if conn is not self.conn:
            return
        if conn.opened:
            self.disconnects += 1
        self.conn = None
        self.live.clear()
        self.in_sync.clear()
        if self.session is not None:
            self.session.close()

    def on_message(self, conn: WsConnection, payload: bytes) -> None:
        head = payload[:2]
        if head == UPDATE_PREFIX:
            # Edits, not frames: a merged Update carries several (one struct each).
            update = msgpack.unpackb(payload)[3]
            # One client's block says how many edits it holds; several editors' need a walk.
            self.updates += update_edits(update)[2] if update[0] == 1 else len(update_items(update))
            if self.on_update is not None:
                self.on_update(self, payload)
            if not self.apply_remote:
                return
        elif head == PRICE_BATCH_PREFIX:
            self._prices(payload)
            return
        session = self.session
        assert session is not None
        try:
            events = session.receive_data(payload)
        except FolioSyncError as exc:
            self.errors.append(f"protocol: {exc}")
            conn.abort()
            return
        for event in events:
            try:
                self._handle(conn, session, event)
            except FolioSyncError as exc:
                self.errors.append(f"{type(event).__name__}: {exc}")
                conn.abort()
                return

    def _prices(self, payload: bytes) -> None:
        """A PriceBatch: counted; with ``price_latency``, each tick's age on arrival (wall ms
        now minus the tick's time stamp: the feed stamps a tick when it makes it)."""
        self.price_batches += 1
        if self.price_latency is None:
            return
        ticks = msgpack.unpackb(payload)[1]
        self.price_ticks += len(ticks)
        now_ms = time.time() * 1000
        self.price_latency.extend(now_ms - tick[2] for tick in ticks)

    def _handle(self, conn: WsConnection, session: ClientSession, event: object) -> None:
        if isinstance(event, UpdateReceived):
            model = self.models.get(event.doc)
            if model is not None:
                model.doc.apply_update(event.update)
                self._captured.clear()
        elif isinstance(event, SyncReplied):
            model = self.models.get(event.doc)
            if model is None:
                self.live.add(event.doc)
            else:
                doc = model.doc
                doc.apply_update(event.update)
                self._captured.clear()
                diff = doc.get_update(event.state_vector)
                if event.doc in self.pending or not _nothing_missing(doc, diff):
                    seq = self.pending.get(event.doc) or self._next_seq()
                    self.in_flight[event.doc] = seq
                    conn.send(session.update(event.doc, seq, diff))
                else:
                    self.live.add(event.doc)
            self._check()
        elif isinstance(event, Acked):
            self.acked[event.seq] = time.monotonic()
            if self.in_flight.get(event.doc, 0) <= event.seq:
                self.in_flight.pop(event.doc, None)
                if self.pending.get(event.doc, 0) <= event.seq:
                    self.pending.pop(event.doc, None)
                self.live.add(event.doc)
            self._check()
        elif isinstance(event, Welcomed):
            self.welcomed_at = self.pinged_at = time.monotonic()
            self.backoff.reset()
            for doc_id, model in self.models.items():
                state = model.doc.get_state() if model is not None else b"\x00"
                conn.send(session.sync_request(doc_id, state))
            if self.subscribe:
                conn.send(session.subscribe(self.subscribe))
        elif isinstance(event, PricesReceived):
            if event.snapshot:
                self.prices_live = True
                self._check()
        elif isinstance(event, ErrorReceived):
            self.errors.append(f"{event.code}: {event.message}")
            if event.fatal:
                conn.abort()
        elif isinstance(event, PingReceived):
            conn.send(session.pong(event.nonce))

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def heartbeat(self, now: float) -> None:
        """A protocol Ping if the last one (or the Welcome) is ``HEARTBEAT_S`` old, as
        SyncClient pings: without it the relay ends a quiet device after its idle timeout, and a
        run longer than that measures reconnects instead of connected devices."""
        conn, session = self.conn, self.session
        if conn is None or session is None or session.closed or now - self.pinged_at < HEARTBEAT_S:
            return
        self.pinged_at = now
        self._pings += 1
        with contextlib.suppress(FolioSyncError):
            conn.send(session.ping(self._pings))

    def _check(self) -> None:
        done = (
            not self.in_flight
            and not self.pending
            and len(self.live) == len(self.models)
            and (self.prices_live or not self.subscribe)
        )
        if done and not self.in_sync.is_set():
            self.synced_at = time.monotonic()
            self.in_sync.set()

    # -- editing

    def edit(self, doc_id: str, change: Callable[[Any], object]) -> tuple[int, bytes]:
        """Edit a document; sent at once if connected and synced, else left pending.

        Returns (seq, update); the caller times the send itself.
        """
        model = self.models[doc_id]
        assert model is not None
        self._captured.clear()
        change(model)
        update = self._captured[0] if len(self._captured) == 1 else merge_updates(*self._captured)
        self._captured.clear()
        seq = self._next_seq()
        self.pending[doc_id] = seq
        self.in_sync.clear()
        if self.conn is not None and self.session is not None and doc_id in self.live:
            self.in_flight[doc_id] = seq
            self.conn.send(self.session.update(doc_id, seq, update))
        return seq, update


# -- a y-websocket client (pycrdt-websocket's protocol) ---------------------------------------


class YDevice:
    """A y-websocket client of one room: sync step 1/2, then counts update messages."""

    def __init__(
        self,
        port: int,
        room: str,
        model: DocumentModel | None = None,
        on_update: Callable[[YDevice, bytes], None] | None = None,
    ) -> None:
        self.port = port
        self.room = room
        self.model = model  # the sender's document; None: read, keep nothing
        self.on_update = on_update
        self.conn: WsConnection | None = None
        self.in_sync = asyncio.Event()
        self.synced_at: float | None = None
        self.updates = 0
        self.connects = 0
        self.failed_connects = 0
        self.disconnects = 0
        self.errors: list[str] = []
        self.stopping = False
        self.reconnect = False
        self._captured: list[bytes] = []
        if model is not None:
            model.doc.observe(lambda event: self._captured.append(event.update))

    async def connect(self, timeout: float = 10.0) -> WsConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: WsConnection(self, self.port, f"/{self.room}"), HOST, self.port
                ),
                timeout,
            )
            await asyncio.wait_for(conn.handshake, timeout)
        except (OSError, TimeoutError) as exc:
            self.failed_connects += 1
            raise ConnectionError(str(exc)) from exc
        self.connects += 1
        return conn

    async def run(self) -> None:
        with contextlib.suppress(ConnectionError):
            conn = await self.connect()
            await conn.done

    def close(self) -> None:
        self.stopping = True
        if self.conn is not None:
            self.conn.close()

    def on_open(self, conn: WsConnection) -> None:
        self.conn = conn
        doc = self.model.doc if self.model is not None else Doc()
        conn.send(create_sync_message(doc))  # step 1: our state; the reply has what we lack

    def on_close(self, conn: WsConnection) -> None:
        if conn is self.conn:
            if conn.opened:
                self.disconnects += 1
            self.conn = None
            self.in_sync.clear()

    def on_message(self, conn: WsConnection, payload: bytes) -> None:
        if payload[:2] == Y_UPDATE_PREFIX:
            self.updates += 1
            if self.on_update is not None:
                self.on_update(self, payload)
            return
        if payload[:1] != b"\x00" or len(payload) < 2:
            return  # awareness
        if payload[1] == 0:  # the server's step 1: send it what it lacks (the sender's content)
            if self.model is not None:
                reply = handle_sync_message(payload[1:], self.model.doc)
                if reply is not None:
                    conn.send(reply)
        elif payload[1] == 1:  # step 2: the room's document
            if self.model is not None:
                handle_sync_message(payload[1:], self.model.doc)
                self._captured.clear()
            if not self.in_sync.is_set():
                self.synced_at = time.monotonic()
                self.in_sync.set()

    def edit(self, change: Callable[[Any], object]) -> bytes:
        assert self.model is not None
        self._captured.clear()
        change(self.model)
        update = self._captured[0] if len(self._captured) == 1 else merge_updates(*self._captured)
        self._captured.clear()
        if self.conn is not None:
            self.conn.send(create_update_message(update))
        return update


def y_update_payload(message: bytes) -> bytes:
    """The update inside a y-websocket update message (type, subtype, varuint length, bytes)."""
    length, pos = _varuint(message, 2)
    return message[pos : pos + length]


# -- the load process --------------------------------------------------------------------------


async def connect_all(devices: list[Any], concurrency: int, timeout: float) -> dict[str, Any]:
    """Start every device's run() (``concurrency`` handshakes at a time); wait until in sync."""
    started = time.monotonic()
    gate = asyncio.Semaphore(concurrency)
    tasks: list[asyncio.Task[None]] = []

    async def start(device: Any) -> None:
        async with gate:
            task = asyncio.get_running_loop().create_task(device.run())
            tasks.append(task)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(device.in_sync.wait(), timeout)

    await asyncio.gather(*(start(d) for d in devices))
    in_sync = sum(1 for d in devices if d.in_sync.is_set())
    return {
        "devices": len(devices),
        "in_sync": in_sync,
        "seconds": time.monotonic() - started,
        "errors": _errors(devices),
        "_tasks": tasks,
    }


def _edit(rng: random.Random, model: Any) -> None:
    """One small edit, as a user makes it: a note in a watchlist, a trade in a portfolio."""
    if isinstance(model, Watchlist):
        symbols = model.symbols
        if not symbols:
            model.add(["S000"])
            return
        model.set_note(symbols[rng.randrange(len(symbols))], f"note {rng.randrange(10**6)}")
    else:
        model.add_trade("S001", rng.randrange(1, 100), f"{rng.randrange(50, 500)}.25")


def _errors(devices: list[Any]) -> list[str]:
    seen: list[str] = []
    for device in devices:
        seen.extend(device.errors)
    return seen[:10] + ([f"... {len(seen) - 10} more"] if len(seen) > 10 else [])


def _histogram(values: Sequence[float], per_ms: int) -> dict[str, int]:
    """Values in ms counted in buckets of 1/per_ms ms (JSON keys), to be merged across
    processes before taking percentiles."""
    counts: dict[str, int] = {}
    for value in values:
        key = str(max(0, int(value * per_ms)))
        counts[key] = counts.get(key, 0) + 1
    return counts


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadProcess:
    """The devices of one load process, driven by JSON commands."""

    def __init__(self) -> None:
        self.devices: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.price_latency: list[float] = []  # ms, of the devices sampling prices
        self.heartbeats: asyncio.Task[None] | None = None

    async def _heartbeats(self) -> None:
        """Every second, a Ping from each foliosync device whose last one is HEARTBEAT_S old."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for device in self.devices:
                if isinstance(device, FolioDevice):
                    device.heartbeat(now)

    async def cmd_start(
        self,
        proto: str,
        port: int,
        devices: list[dict[str, Any]],
        concurrency: int = 50,
        timeout: float = 60.0,
        reconnect: bool = False,
    ) -> dict[str, Any]:
        """Create devices and connect them. A foliosync device spec: {token, device, watchlist?,
        portfolio?, index?} (documents built here) or {token, read: doc_id}; a y device:
        {room}."""
        new: list[Any] = []
        for spec in devices:
            if proto == "folio" and "watchlists" in spec:
                new.append(self._user_device(port, spec, reconnect))
            elif proto == "folio":
                models: dict[str, DocumentModel | None]
                if "read" in spec:
                    models = {spec["read"]: None}
                else:
                    models = dict(
                        build_documents(
                            spec["device"], spec.get("watchlist"), spec.get("portfolio")
                        )
                    )
                    if not spec.get("index", True):
                        models.pop(INDEX_DOCUMENT_ID)
                new.append(FolioDevice(port, spec["token"], models, reconnect=reconnect))
            else:
                new.append(YDevice(port, spec["room"]))
        self.devices.extend(new)
        if self.heartbeats is None:
            self.heartbeats = asyncio.get_running_loop().create_task(self._heartbeats())
        result = await connect_all(new, concurrency, timeout)
        self.tasks.extend(result.pop("_tasks"))
        return result

    def _user_device(self, port: int, spec: dict[str, Any], reconnect: bool) -> FolioDevice:
        """A device of a user with several devices: {token, device, watchlists, portfolios,
        create, symbols?, subscribe?, sample_prices?}; its documents are built here, filled
        when ``create`` (the user's first device), else empty until its first sync."""
        models = build_user_documents(
            spec["device"],
            spec["watchlists"],
            spec.get("portfolios", ()),
            create=bool(spec.get("create", True)),
            symbols=spec.get("symbols") or ("S000", "S001", "S002"),
        )
        return FolioDevice(
            port,
            spec["token"],
            dict(models),
            reconnect=reconnect,
            name=spec["device"],
            subscribe=spec.get("subscribe", ()),
            price_latency=self.price_latency if spec.get("sample_prices") else None,
            apply_remote=True,
        )

    async def cmd_status(self) -> dict[str, Any]:
        """How many devices are connected, and in sync (every document live, prices too)."""
        return {
            "devices": len(self.devices),
            "connected": sum(1 for d in self.devices if d.conn is not None),
            "in_sync": sum(1 for d in self.devices if d.conn is not None and d.in_sync.is_set()),
            "connects": sum(d.connects for d in self.devices),
            "failed_connects": sum(d.failed_connects for d in self.devices),
            "disconnects": sum(d.disconnects for d in self.devices),
            "errors": _errors(self.devices),
        }

    async def cmd_mix(
        self, duration: float, edit_interval: float, drops_per_s: float, seed: int = 0
    ) -> dict[str, Any]:
        """The steady mix for ``duration`` s: each device edits one of its documents every
        ``edit_interval`` s on average (a set_note in a watchlist, an add_trade in a portfolio),
        and ``drops_per_s`` devices a second lose their connection and come back with their
        backoff. Only a device in sync edits, so that each edit's Ack times the relay alone.
        Answers with the edits and their Ack times, the drops and the reconnects done."""
        duration = min(max(duration, 0.0), 3600.0)
        rng = random.Random(seed)
        folio = [d for d in self.devices if isinstance(d, FolioDevice)]
        editable = [
            (d, doc_id)
            for d in folio
            for doc_id, model in d.models.items()
            if isinstance(model, Watchlist | Portfolio)
        ]
        edit_rate = len(folio) / edit_interval if edit_interval > 0 else 0.0
        connects0 = {id(d): d.connects for d in folio}
        disconnects0 = sum(d.disconnects for d in folio)
        self.price_latency.clear()
        prices0 = sum(d.price_batches for d in folio)
        sent: list[tuple[FolioDevice, int, float]] = []
        dropped: list[tuple[FolioDevice, float]] = []
        skipped = failed = 0
        started = time.monotonic()
        end = started + duration
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due_edits = int((now - started) * edit_rate) - len(sent) - skipped - failed
            for _ in range(min(due_edits, 10_000)):
                if not editable:
                    break
                device, doc_id = editable[rng.randrange(len(editable))]
                if device.conn is None or not device.in_sync.is_set():
                    skipped += 1
                    continue
                try:
                    seq, _ = device.edit(doc_id, functools.partial(_edit, rng))
                except FolioSyncError as exc:
                    device.errors.append(f"edit: {exc}")
                    failed += 1
                    continue
                sent.append((device, seq, time.monotonic()))
            due_drops = int((now - started) * drops_per_s) - len(dropped)
            for _ in range(min(due_drops, 10_000)):
                if not folio:
                    break
                device = folio[rng.randrange(len(folio))]
                if device.reconnect and device.drop():
                    dropped.append((device, time.monotonic()))
            await asyncio.sleep(0.02)
        settle = time.monotonic() + 10.0  # the last edits' Acks, the last reconnects
        while time.monotonic() < settle:
            acked = all(seq in d.acked for d, seq, _ in sent)
            back = all(d.conn is not None and d.in_sync.is_set() for d, _ in dropped)
            if acked and back:
                break
            await asyncio.sleep(0.05)
        acks = [(d.acked[seq] - at) * 1000 for d, seq, at in sent if seq in d.acked]
        return {
            "seconds": round(time.monotonic() - started, 3),
            "edits": len(sent),
            "skipped": skipped,
            "failed": failed,
            "acked": len(acks),
            "ack_hist": _histogram(acks, 10),
            "drops": len(dropped),
            "reconnects": sum(d.connects - connects0[id(d)] for d in folio),
            "back_in_sync": sum(
                1 for d in {id(d): d for d, _ in dropped}.values() if d.in_sync.is_set()
            ),
            "disconnects": sum(d.disconnects for d in folio) - disconnects0,
            "price_batches": sum(d.price_batches for d in folio) - prices0,
            "price_ticks_sampled": len(self.price_latency),
            "price_hist": _histogram(self.price_latency, 1),
            "errors": _errors(self.devices),
        }

    async def cmd_counts(self, reset: bool = False) -> dict[str, Any]:
        counts = [d.updates for d in self.devices]
        if reset:
            for device in self.devices:
                device.updates = 0
        return {
            "devices": len(self.devices),
            "updates_min": min(counts, default=0),
            "updates_max": max(counts, default=0),
            "updates_total": sum(counts),
            "connected": sum(1 for d in self.devices if d.conn is not None),
            "disconnects": sum(d.disconnects for d in self.devices),
            "errors": _errors(self.devices),
        }

    async def cmd_offline_edit(self) -> dict[str, Any]:
        """Every device edits its watchlist (while the relay is down: the edit stays pending)."""
        edited = 0
        for number, device in enumerate(self.devices):
            device.synced_at = device.welcomed_at = None
            for doc_id, model in device.models.items():
                if isinstance(model, Watchlist):
                    device.edit(doc_id, lambda m, n=number: m.add([f"X{n % 1000:03d}"]))
                    edited += 1
                    break
        return {"edited": edited}

    async def cmd_wait_in_sync(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.synced_at is not None and d.in_sync.is_set() for d in self.devices):
                break
            await asyncio.sleep(0.01)
        times = [d.synced_at for d in self.devices if d.synced_at is not None]
        welcomed = [d.welcomed_at for d in self.devices if d.welcomed_at is not None]
        lags = [
            d.synced_at - d.welcomed_at
            for d in self.devices
            if d.synced_at is not None and d.welcomed_at is not None
        ]
        return {
            "devices": len(self.devices),
            "in_sync": len(times),
            "synced_at": sorted(times),
            "welcomed_at": sorted(welcomed),
            "lags": sorted(lags),
            "failed_connects": sum(d.failed_connects for d in self.devices),
            "connects": sum(d.connects for d in self.devices),
            "errors": _errors(self.devices),
        }

    async def cmd_cpu(self) -> dict[str, Any]:
        return {"cpu_s": _cpu_seconds(), "now": time.monotonic()}

    async def cmd_stop(self) -> dict[str, Any]:
        if self.heartbeats is not None:
            self.heartbeats.cancel()
        for device in self.devices:
            device.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        return {"stopped": len(self.devices)}


async def serve() -> None:
    """Read JSON commands from stdin, one per line, and answer each on stdout."""
    raise_nofile_limit()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    process = LoadProcess()
    while True:
        line = await reader.readline()
        if not line:
            break
        request = json.loads(line)
        name = request.pop("cmd")
        try:
            reply = await getattr(process, f"cmd_{name}")(**request)
        except Exception as exc:  # reported to the driver, which fails the benchmark
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if name == "stop":
            break


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def run_load(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a load process's ``main`` on uvloop where it is installed (the ``bench`` extra), else
    on asyncio's own loop. The load shares the machine's cores with the server under test, and
    most of a reading client's cost is the loop's, per socket read (500 price clients: 37 % of a
    core on asyncio's loop, 31 % on uvloop)."""
    uvloop = _uvloop()
    if uvloop is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def load_loop() -> str:
    """The event loop :func:`run_load` uses here, for the benchmark's notes."""
    uvloop = _uvloop()
    return "asyncio" if uvloop is None else f"uvloop {uvloop.__version__}"


if __name__ == "__main__":
    run_load(serve())
