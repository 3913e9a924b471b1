"""The relay: an aiohttp app serving ``/ws`` (sync) and ``/healthz``.

One :class:`Connection` per WebSocket drives a pure :class:`ServerSession`; this module only moves
bytes and decides what frames mean:

- Hello: the token is verified before any document is touched; a bad one gets an Error and a close.
- SyncRequest: the relay's diff against the client's state vector, its own state vector and the
  document's watermark. Initial syncs share a bounded number of slots, so that after a restart
  a thousand reconnecting clients queue for them instead of starving live updates.
- Update: applied, stored, then acknowledged and fanned out to the user's other connections that
  synced that document. The session refuses (fatally) an Update before its document's
  SyncRequest or with a seq that does not increase; see ``PROTOCOL.md``.

A frame goes straight to the socket when nothing waits before it and the socket's buffer is small
(the common case: no task switch per receiver). Otherwise it waits in an :class:`OutboundQueue`
drained by the connection's writer task, control frames before prices, so a slow reader never
blocks the relay; one that falls too far behind is disconnected (it catches up by state vector
when it reconnects) rather than allowed to grow the relay's memory. Its prices meanwhile wait as
the newest per symbol, a bounded backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WebSocketError, WSMsgType, web

from foliosync.server.auth import Identity, load_or_create_secret, verify_token
from foliosync.server.data_lock import DataDirLock
from foliosync.server.documents import BadUpdate, RelayDocuments
from foliosync.server.fanout import Change, FanOut, InProcessFanOut, Subscription
from foliosync.server.feeds import Feed, start_feed
from foliosync.server.http_auth import authorize_request
from foliosync.server.http_cors import add_cors, normalize_origins
from foliosync.server.http_errors import JsonErrorAppRunner, http_error, json_errors
from foliosync.server.http_prices import add_price_routes
from foliosync.server.logs import bind_log_context, log_context
from foliosync.server.measured_store import MeasuredRelayStore
from foliosync.server.memory import trim_memory_every
from foliosync.server.metrics import (
    CONTENT_TYPE,
    FrameCounts,
    RelayCounters,
    relay_registry,
    render,
)
from foliosync.server.prices import PriceHub
from foliosync.server.readiness import check_readiness
from foliosync.server.storage import RelayStore, RelayStoreError, SQLiteRelayStore
from foliosync.server.sync_slots import InitialSyncSlots
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import (
    AuthError,
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
    ValidationError,
)
from foliosync.sync.model import kind_of
from foliosync.sync.prices import LatestPrices, PricePoint, check_ticks
from foliosync.sync.protocol import (
    DEFAULT_MAX_DOCUMENTS,
    FRAME_CODES,
    ErrorCode,
    ErrorReceived,
    HelloReceived,
    OutboundQueue,
    PingReceived,
    Published,
    PublishReceived,
    ResyncRequested,
    ServerSession,
    SubscribeRequested,
    SyncRequested,
    Update,
    UpdateReceived,
    encode_frame,
    encode_price_frame,
)
from foliosync.sync.validation import normalize_symbol

__all__ = [
    "Connection",
    "Relay",
    "RelayConfig",
    "RelayKey",
    "create_app",
    "websocket_binary_frame",
]

log = logging.getLogger("foliosync.relay")


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: Path = Path("relay-data")
    max_frame_size: int = 4 << 20  # largest frame accepted from a client
    max_send_size: int = 64 << 20  # largest frame sent (a whole document in a SyncReply)
    max_hot_documents: int = 1000
    max_initial_syncs: int = 32  # documents synced at once across all connections
    max_outbound_bytes: int = 16 << 20  # a reader further behind than this is disconnected
    hello_timeout: float = 10.0
    heartbeat: float = 30.0
    durability: str = "normal"
    relay_id: str = field(default="relay-1")
    feed: str = "none"  # "sim", "sim:always", "csv:PATH" or "none"; see foliosync.server.feeds
    price_window_ms: int | None = None  # fixed push window instead of the policy's (benchmarks)
    max_symbols: int = 2000  # symbols one connection may follow
    max_documents: int = DEFAULT_MAX_DOCUMENTS  # distinct documents one connection may sync
    trim_memory_every: float = 60.0  # seconds between handing freed memory back (0: never)
    cors_origins: tuple[str, ...] = ()
    """Browser origins (``https://dash.example.com``) that may call the HTTP API; none by
    default. Normalized as browsers send them; anything that is not an origin is a ConfigError."""
    metrics_port: int | None = None
    """Also serve ``GET /metrics`` without a token on 127.0.0.1 at this port (0: any free one,
    see :attr:`Relay.metrics_port`); None: only on the main port, with an admin token. Loopback
    only: whoever can reach it reads the relay's figures, so it is for a Prometheus on the
    same host (or behind a tunnel), never for the public address."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", normalize_origins(self.cors_origins))
        documents = self.max_documents
        if isinstance(documents, bool) or not isinstance(documents, int) or documents < 1:
            raise ConfigError(f"invalid max_documents {documents!r}: at least 1")
        port = self.metrics_port
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536
        ):
            raise ConfigError(f"invalid metrics port {port!r}: 1 to 65535, or 0 for any free one")


class Relay:
    """The relay's shared state: documents, fan-out, secret and live connections."""

    def __init__(
        self, config: RelayConfig, store: RelayStore, fanout: FanOut, secret: bytes
    ) -> None:
        self.config = config
        self.store = MeasuredRelayStore(store)  # every adapter's operations timed alike
        self.fanout = fanout
        self.secret = secret
        self.documents = RelayDocuments(self.store, max_hot=config.max_hot_documents)
        self.prices = PriceHub(window_override_ms=config.price_window_ms)
        self.initial_sync_slots = InitialSyncSlots(config.max_initial_syncs)
        self.counters = RelayCounters()
        self.registry = relay_registry(self)
        # Where /metrics is served without a token, once bound (None: not served there).
        self.metrics_port: int | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.connections: set[Connection] = set()
        self.feed: Feed | None = None  # the --feed task, once started; /readyz watches it
        self.started = time.monotonic()
        self._ids = itertools.count(1)

    def next_connection_id(self) -> str:
        return f"{self.config.relay_id}:{next(self._ids)}"

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            heartbeat=self.config.heartbeat,
            max_msg_size=self.config.max_frame_size + 1024,  # our own check gives the clear error
            compress=False,
        )
        if not ws.can_prepare(request):  # a plain GET, e.g. a browser opening the URL
            raise http_error(
                web.HTTPUpgradeRequired,
                "this is the relay's WebSocket endpoint: connect with a WebSocket client",
                headers={"Upgrade": "websocket"},
            )
        await ws.prepare(request)
        connection = Connection(self, ws, request.transport)
        self.connections.add(connection)
        self.counters.connections_opened += 1
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self.counters.connections_closed[connection.close_code_label()] += 1
            self.counters.prices_dropped_closed += connection.prices.replaced
        return ws

    async def handle_metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics`` on the main port: the admin scope's, checked as the price API checks
        its tokens (401 without a valid token, 403 without the scope, in JSON)."""
        authorize_request(request, self.secret, "admin")
        return self.metrics_response()

    def metrics_response(self) -> web.Response:
        response = web.Response(body=render(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "connections": len(self.connections),
                "hot_documents": self.documents.hot_count,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "prices": {
                    "symbols": len(self.prices.book),
                    "followed": len(self.prices.subscribed_symbols()),
                    "subscribers": self.prices.subscriber_count,
                    "ticks_in": self.prices.ticks_in,
                    "market_open": self.prices.market_open(),
                },
                # The alert condition: followed symbols without a price for too long in session.
                "alerts": [
                    {"kind": "stalled_feed", **stalled.to_json()}
                    for stalled in self.prices.stalled()
                ],
            }
        )

    async def handle_ready(self, request: web.Request) -> web.Response:
        readiness = await check_readiness(
            self.store, self.fanout, self.config.feed, self.feed, self.prices
        )
        return web.json_response(readiness.to_json(), status=200 if readiness.ready else 503)

    async def close_connections(self) -> None:
        # All at once: each close may wait up to _CLOSE_TIMEOUT for a peer that does not read.
        await asyncio.gather(
            *(c.close(code=1001, message=b"relay shutting down") for c in list(self.connections))
        )

    async def close(self) -> None:
        await self.prices.close()
        await self.close_connections()
        await self.fanout.close()
        await self.store.close()


class Connection:
    """One client WebSocket: reads frames in order, writes through an outbound queue."""

    def __init__(
        self,
        relay: Relay,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None = None,
    ) -> None:
        self.relay = relay
        self.ws = ws
        self._transport = transport
        self._writer_busy = False
        self.id = relay.next_connection_id()
        self.session = ServerSession(
            max_frame_size=relay.config.max_frame_size,
            max_send_size=relay.config.max_send_size,
            max_documents=relay.config.max_documents,
        )
        self.identity: Identity | None = None
        self.device = ""
        self.outbound = OutboundQueue()
        self.prices = LatestPrices()  # released for this connection, not yet written
        self._prices_waiting = False  # prices were handed to the writer: none go around it
        self._wakeup = asyncio.Event()
        self._subscription: Subscription | None = None
        # Documents whose live changes this connection gets: those it sent a SyncRequest for
        # (and was allowed to read). The SyncReply brings everything up to then; from then on
        # every stored change of another connection follows, so nothing falls between the two.
        self._synced_docs: set[str] = set()
        self._closing = False
        # Per document, the version (RelayDocuments.version) of its SyncReply or of its own last
        # update, whichever is newer: what makes an update of it concurrent or not.
        self._seen: dict[str, int] = {}
        self._received_at = 0.0  # when the frame being handled was read (perf_counter)
        self._close_code: int | None = None  # the code this connection closed with, once known
        # The code to close with when the conversation ends: 1000, or 1011 after a failure of
        # the relay's own (a fatal ``internal`` Error, an unexpected exception).
        self._close_with = 1000
        # This connection's log context (its id, then its user and device), for what runs on
        # its behalf from another connection's task: a fan-out runs every receiver's _deliver
        # in the sender's context, which would tag this connection's lines with the sender.
        self._log_ctx = contextvars.Context()
        self._counters = relay.counters
        # Frames this relay encodes are msgpack arrays whose second byte is the type code:
        # counted by two list increments, the cost the fan-out pays per receiver.
        self._sent_frames = relay.counters.sent.frames
        self._sent_bytes = relay.counters.sent.bytes

    # -- life cycle --------------------------------------------------------------------------

    async def run(self) -> None:
        bind_log_context(connection=self.id)  # this task's lines, and the writer's, name it
        self._log_ctx = contextvars.copy_context()
        log.debug("connection opened")
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            await self._read_loop()
        except Exception:  # a relay bug: logged with its traceback, the peer told by 1011
            log.exception("connection %s failed", self.id)
            if not self.session.closed:
                self._fail_internal("the relay failed; reconnect and retry")
            self._close_with = 1011
        finally:
            self.relay.prices.unsubscribe(self)
            if self._subscription is not None:
                self._subscription.close()
            self.session.close()
            self._closing = True
            self._wakeup.set()
            try:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, TimeoutError):
                    await asyncio.wait_for(writer, timeout=_CLOSE_TIMEOUT)
            except Exception:
                log.exception("connection %s: its writer failed", self.id)
                self._close_with = 1011
            if not writer.done():
                writer.cancel()
            await self._close_ws(self._close_with)
            log.debug("connection closed")
            # A socket closed with bytes its peer never takes would stay open for as long as the
            # peer keeps the connection: cut it once a healthy peer would have had them.
            asyncio.get_running_loop().call_later(_CLOSE_TIMEOUT, self._abort_if_stuck)

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self._closing = True
        self._wakeup.set()
        await self._close_ws(code, message)

    def close_code_label(self) -> str:
        """The ``code`` label of ``foliosync_connections_closed_total``: the code the relay
        closed with, or the peer's; else whatever code the socket ended with, such as 1009 when
        aiohttp itself refused a message over ``max_msg_size`` (no Error frame then), or 1006
        for a connection cut (a missed heartbeat, a peer that did not take its close frame);
        "none" for a socket that ended without any code."""
        if self._close_code is not None:
            return str(self._close_code)
        code = self.ws.close_code
        return "none" if code is None else str(int(code))

    def _note_ws_ended(self) -> None:
        """The socket ended under the read loop: by a missed heartbeat? aiohttp's
        ``WebSocketResponse(heartbeat=...)`` then closes it with 1006 and keeps the
        ``TimeoutError`` ("No PONG received") as its exception; the only other TimeoutError it
        keeps is from a closing handshake, which the relay would have begun (a code noted)."""
        if (
            self._close_code is None
            and self.ws.close_code == 1006
            and isinstance(self.ws.exception(), TimeoutError)
        ):
            self._close_code = 1006
            self._counters.heartbeats_missed += 1

    async def _close_ws(self, code: int = 1000, message: bytes = b"") -> None:
        """The closing handshake if the peer takes it in time; else the connection is cut, so
        that a peer that stopped reading holds neither a shutdown nor a socket."""
        if self.ws.closed:
            return
        if self._close_code is None:
            self._close_code = code
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message), _CLOSE_TIMEOUT)
        except TimeoutError:
            log.info("connection %s did not take its close frame; cutting it", self.id)
            if self._transport is not None:
                self._transport.abort()
        except (ConnectionError, RuntimeError):
            pass

    def _abort_if_stuck(self) -> None:
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size() > 0:
            log.info("connection %s left unread bytes behind; cutting it", self.id)
            transport.abort()

    def _can_write_now(self) -> bool:
        """Whether a frame may go straight to the socket: the writer idle, nothing queued before
        it, and the socket's buffer small (else the writer, which waits for the socket, sends it
        in turn)."""
        transport = self._transport
        return (  # cheapest first: every connection asks at every price flush
            not self._writer_busy
            and transport is not None
            and not self.outbound
            and transport.get_write_buffer_size() < _DIRECT_WRITE_LIMIT
            and not self._closing
            and not transport.is_closing()
            and not self.ws.closed
        )

    def _send(self, data: bytes, wire: bytes = b"") -> None:
        """Send a control frame: at once if nothing is queued before it, else in turn.

        The direct path writes a ready WebSocket frame to the transport: with hundreds of devices
        on one document, waking a writer task per receiver for every change cost more than the
        write itself. Anything else goes through the queue and the writer, in order.
        """
        if self._can_write_now():
            assert self._transport is not None
            self._transport.write(wire or websocket_binary_frame(data))
            code = data[1]
            self._sent_frames[code] += 1
            self._sent_bytes[code] += len(data)
            return
        self.outbound.push_control(data)
        self._wakeup.set()
        if self.outbound.control_bytes > self.relay.config.max_outbound_bytes and not self._closing:
            self._log_ctx.run(
                log.warning,
                "connection %s fell behind; disconnecting it",
                self.id,
                extra={"connection": self.id},
            )
            self._closing = True
            asyncio.get_running_loop().create_task(
                self.close(code=1013, message=b"too far behind; reconnect to catch up"),
                context=self._log_ctx,
            )

    def deliver_prices(self, points: list[PricePoint]) -> None:
        """The hub's flush hands over the prices released for this connection.

        They go out in one PriceBatch at once when the socket is free, as a bare broadcast loop
        would send them. Otherwise they wait, the newest per symbol, until the writer has sent
        what is queued before them; prices that arrive meanwhile replace older ones.
        """
        if self.session.closed:
            return
        transport = self._transport
        if not self._prices_waiting and self._can_write_now():
            assert transport is not None
            try:
                frame = encode_price_frame(False, [p.wire_bytes() for p in points])
            except LocalProtocolError as exc:  # cannot happen with the limits we set; never fatal
                log.error("connection %s: %s", self.id, exc)
                return
            transport.write(websocket_binary_frame(frame))
            self._sent_frames[_PRICE_BATCH_CODE] += 1
            self._sent_bytes[_PRICE_BATCH_CODE] += len(frame)
            return
        self.prices.add(points)
        self._prices_waiting = True
        self._wakeup.set()

    async def _write_loop(self) -> None:
        """Control frames first, always; then the prices that wait, the newest per symbol (a slow
        reader gets newer prices later, never a backlog)."""
        while True:
            self._writer_busy = False
            await self._wakeup.wait()
            self._wakeup.clear()
            self._writer_busy = True
            while True:
                data = self.outbound.pop()
                if data is None and self._prices_waiting:
                    self._prices_waiting = False
                    waiting = self.prices.take()
                    if waiting and not self.session.closed:
                        data = self.session.prices([p.wire_bytes() for p in waiting])
                if data is None:
                    break
                if self.ws.closed:
                    return
                try:
                    await self.ws.send_bytes(data)
                except (ConnectionError, RuntimeError):
                    return
                self._counters.sent.count(data)
            if self._closing:
                return

    async def _read_loop(self) -> None:
        hello_deadline = self.relay.config.hello_timeout
        while not self.session.closed and not self._closing:
            try:
                timeout = hello_deadline if self.identity is None else None
                message = await self.ws.receive(timeout=timeout)
            except TimeoutError:
                self._counters.connections_refused["hello_timeout"] += 1
                self._send(self.session.reject(ErrorCode.NOT_AUTHENTICATED, "no Hello in time"))
                return
            if message.type == WSMsgType.CLOSE:
                if self._close_code is None and isinstance(message.data, int):
                    self._close_code = message.data  # the peer's
                return
            if message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                self._note_ws_ended()
                return
            if message.type == WSMsgType.ERROR:
                if self._close_code is None and isinstance(message.data, WebSocketError):
                    # aiohttp refused the message (1009: over max_msg_size) and closed with its
                    # code; the socket itself may then end as 1006, its handshake cut short.
                    self._close_code = message.data.code
                self._note_ws_ended()
                log.info("connection %s: %s", self.id, self.ws.exception())
                return
            if message.type != WSMsgType.BINARY:
                if self.identity is None:
                    self._counters.connections_refused["bad_hello"] += 1
                self._send(self.session.error(ErrorCode.BAD_FRAME, "frames are binary msgpack"))
                return
            data = message.data
            self._received_at = time.perf_counter()
            self._counters.received.count(data)
            try:
                events = self.session.receive_data(data)
            except RemoteProtocolError as exc:
                assert self.session.error_reply is not None
                if self.identity is None:
                    self._counters.connections_refused["bad_hello"] += 1
                elif FrameCounts.code_of(data) == _UPDATE_CODE:
                    self._counters.updates_refused[exc.code] += 1
                self._send(self.session.error_reply)
                return
            for event in events:
                with log_context(doc=getattr(event, "doc", None)):
                    await self._handle(event)

    # -- events ------------------------------------------------------------------------------

    async def _handle(self, event: object) -> None:
        if isinstance(event, UpdateReceived):
            await self._on_update(event)
        elif isinstance(event, SyncRequested):
            await self._on_sync_request(event)
        elif isinstance(event, HelloReceived):
            await self._on_hello(event)
        elif isinstance(event, SubscribeRequested):
            self._on_subscribe(event)
        elif isinstance(event, ResyncRequested):
            self._on_resync(event)
        elif isinstance(event, PublishReceived):
            self._on_publish(event)
        elif isinstance(event, PingReceived):
            self._send(self.session.pong(event.nonce))
        elif isinstance(event, ErrorReceived):
            log.info("client %s reported %s: %s", self.id, event.code, event.message)

    async def _on_hello(self, event: HelloReceived) -> None:
        try:
            identity = verify_token(self.relay.secret, event.token)
        except AuthError as exc:
            log.info("authentication failed: %s", exc)
            self._counters.connections_refused["auth_failed"] += 1
            self._send(self.session.reject(ErrorCode.AUTH_FAILED, str(exc)))
            return
        if not identity.scopes & {"sync", "publish"}:
            log.info("authentication failed: token has neither the sync nor the publish scope")
            self._counters.connections_refused["scope"] += 1
            self._send(
                self.session.reject(
                    ErrorCode.AUTH_FAILED, "token has neither the sync nor the publish scope"
                )
            )
            return
        self.identity = identity
        self.device = identity.device or event.client_name[:64] or self.id
        bind_log_context(user=identity.user, device=self.device)
        self._log_ctx = contextvars.copy_context()
        log.debug("authenticated")
        documents = (
            await self.relay.documents.documents(identity.user) if "sync" in identity.scopes else []
        )
        self._send(self.session.accept(identity.user, self.device, documents, wall_ms()))
        self._subscription = self.relay.fanout.subscribe(identity.user, self._deliver)

    def _document_refusal(self, doc: str, seq: int | None = None) -> str | None:
        """Per-document authorization: a user reaches their own documents only. Returns the
        code of the Error sent, or None if the document may be used."""
        if self.identity is not None and "sync" not in self.identity.scopes:
            self._send(
                self.session.error(
                    ErrorCode.AUTH_FAILED, "this token may not sync documents", doc=doc, seq=seq
                )
            )
            return ErrorCode.AUTH_FAILED
        owner, slash, _ = doc.partition("/")
        if slash and self.identity is not None and owner != self.identity.user:
            self._send(
                self.session.error(
                    ErrorCode.FORBIDDEN, f"{doc} belongs to another user", doc=doc, seq=seq
                )
            )
            return ErrorCode.FORBIDDEN
        try:
            kind_of(doc)
        except ValidationError as exc:
            self._send(self.session.error(ErrorCode.NOT_FOUND, str(exc), doc=doc, seq=seq))
            return ErrorCode.NOT_FOUND
        return None

    async def _on_sync_request(self, event: SyncRequested) -> None:
        assert self.identity is not None
        if self._document_refusal(event.doc) is not None:
            return
        # Subscribed before the state is read: a change stored meanwhile is then in the reply,
        # or fanned out after it, or both (applying an update twice changes nothing).
        self._synced_docs.add(event.doc)
        async with self.relay.initial_sync_slots:
            try:
                diff, state_vector, watermark = await self.relay.documents.state(
                    self.identity.user, event.doc, event.state_vector
                )
                self._saw(event.doc, self.relay.documents.version(self.identity.user, event.doc))
            except BadUpdate as exc:
                self._send(self.session.error(ErrorCode.BAD_UPDATE, str(exc), doc=event.doc))
                return
            except RelayStoreError as exc:
                log.error("loading %s failed: %s", event.doc, exc)
                self._fail_internal("the relay cannot read it now")
                return
        self._send(
            self.session.sync_reply(
                event.doc, diff, state_vector, watermark.changed_at, watermark.changed_by
            )
        )

    def _fail_internal(self, message: str) -> None:
        """The relay failed on its own (its store): a fatal ``internal`` Error, then close 1011,
        the code that tells operators (FoliosyncWebSocketInternalErrors) it was the relay."""
        self._close_with = 1011
        self._send(self.session.error(ErrorCode.INTERNAL, message))

    def _saw(self, doc: str, version: int) -> None:
        if version > self._seen.get(doc, 0):
            self._seen[doc] = version

    async def _on_update(self, event: UpdateReceived) -> None:
        assert self.identity is not None
        counters = self._counters
        refusal = self._document_refusal(event.doc, event.seq)
        if refusal is not None:
            counters.updates_refused[refusal] += 1
            return
        received_at = self._received_at
        now = wall_ms()
        try:
            applied = await self.relay.documents.apply(
                self.identity.user,
                event.doc,
                event.update,
                device=self.device,
                now_ms=now,
                seen=self._seen.get(event.doc),
                origin=self.id,
            )
        except BadUpdate as exc:
            counters.updates_refused[ErrorCode.BAD_UPDATE] += 1
            self._send(
                self.session.error(ErrorCode.BAD_UPDATE, str(exc), doc=event.doc, seq=event.seq)
            )
            return
        except RelayStoreError as exc:
            counters.updates_refused[ErrorCode.INTERNAL] += 1
            log.error("storing an update of %s failed: %s", event.doc, exc)
            # Fatal (no doc): an Ack of a later update on this connection would settle this one
            # too. The client reconnects and resends what the relay lacks by state vector.
            self._fail_internal(
                f"the relay could not store an update of {event.doc}; reconnect and retry"
            )
            return
        if self.session.closed:
            return
        self._saw(event.doc, applied.version)
        self._send(self.session.ack(event.doc, event.seq))
        counters.update_store.observe(time.perf_counter() - received_at)
        counters.updates_acknowledged += 1
        if applied.concurrent:
            counters.updates_merged_concurrent += 1
        log.debug("update %d stored and acknowledged", event.seq)
        if applied.changed:
            # One encoding for every receiver: with hundreds of devices on one document, building
            # and encoding the same frame per receiver was a fifth of the relay's time.
            frame = encode_frame(Update(event.doc, 0, event.update, now, self.device))
            wire = websocket_binary_frame(frame)
            await self.relay.fanout.publish(
                Change(
                    user=self.identity.user,
                    doc_id=event.doc,
                    update=event.update,
                    changed_at=now,
                    changed_by=self.device,
                    origin=self.id,
                    relay=self.relay.config.relay_id,
                    frame=frame,
                    wire=wire,
                )
            )
            counters.update_fanout.observe(time.perf_counter() - received_at)

    # -- prices ------------------------------------------------------------------------------

    def _valid_symbols(self, symbols: tuple[str, ...]) -> list[str]:
        valid: dict[str, None] = {}
        for symbol in symbols:
            try:
                valid.setdefault(normalize_symbol(symbol), None)
            except ValidationError as exc:
                self._send(self.session.error("invalid_symbol", str(exc), doc=symbol[:64]))
        return list(valid)

    def _may_follow_prices(self) -> bool:
        """Following prices (Subscribe, Resync) takes the sync scope; a publisher's token may
        only publish."""
        assert self.identity is not None
        if "sync" in self.identity.scopes:
            return True
        self._send(
            self.session.error(
                ErrorCode.FORBIDDEN, "this token may not follow prices", doc="prices"
            )
        )
        return False

    def _on_subscribe(self, event: SubscribeRequested) -> None:
        if not self._may_follow_prices():
            return
        symbols = self._valid_symbols(event.symbols)[: self.relay.config.max_symbols]
        snapshot = self.relay.prices.subscribe(self, symbols)
        self._send(self.session.prices([p.wire_bytes() for p in snapshot], snapshot=True))

    def _on_resync(self, event: ResyncRequested) -> None:
        if not self._may_follow_prices():
            return
        symbols = self._valid_symbols(event.symbols)
        self.prices.forget(symbols)
        snapshot = self.relay.prices.book.snapshot(symbols)
        self._send(self.session.prices([p.wire_bytes() for p in snapshot], snapshot=True))

    def _on_publish(self, event: PublishReceived) -> None:
        assert self.identity is not None
        if "publish" not in self.identity.scopes:
            self._send(
                self.session.error(ErrorCode.FORBIDDEN, "this token may not publish", doc="prices")
            )
            return
        good, bad = check_ticks(event.ticks, wall_ms())
        self.relay.prices.reject(len(bad))
        self.relay.prices.publish(good)
        self._send(self.session.send(Published(event.batch, len(good), tuple(bad))))

    def _deliver(self, change: Change) -> None:
        """A stored change of one of the user's documents: sent on if this connection synced
        that document, and did not make the change itself (a sender is never echoed)."""
        if (
            change.origin == self.id
            or change.doc_id not in self._synced_docs
            or self.session.closed
            or self._closing
        ):
            return
        frame = change.frame or encode_frame(
            Update(change.doc_id, 0, change.update, change.changed_at, change.changed_by)
        )
        self._send(frame, change.wire)


RelayKey = web.AppKey("relay", Relay)

_DIRECT_WRITE_LIMIT = 64 << 10  # above this many unsent bytes, frames wait for the writer
_UPDATE_CODE = FRAME_CODES["update"]
_PRICE_BATCH_CODE = FRAME_CODES["price_batch"]
_CLOSE_TIMEOUT = 2.0  # seconds a closing peer has to take what is left and the close frame


def websocket_binary_frame(payload: bytes) -> bytes:
    """A whole unmasked WebSocket binary frame (RFC 6455, 5.2): what a server sends.

    Unmasked, the same bytes serve every receiver, so a fanned-out change is framed once.
    """
    size = len(payload)
    if size < 126:
        return bytes((0x82, size)) + payload
    if size < 65536:
        return bytes((0x82, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x82, 127)) + size.to_bytes(8, "big") + payload


async def _serve_metrics(relay: Relay) -> web.AppRunner | None:
    """``GET /metrics`` without a token on 127.0.0.1:``config.metrics_port``, if set.

    Bound to the loopback address whatever ``--host`` is: the port trusts whoever reaches it.
    """
    port = relay.config.metrics_port
    if port is None:
        return None

    async def metrics(request: web.Request) -> web.StreamResponse:
        return relay.metrics_response()

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/metrics", metrics)
    runner = JsonErrorAppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}"
            " (choose another --metrics-port)"
        ) from exc
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    relay.metrics_address = sockets[0].getsockname()[:2] if sockets else ("127.0.0.1", port)
    relay.metrics_port = relay.metrics_address[1]
    log.info("metrics on http://127.0.0.1:%d/metrics", relay.metrics_port)
    return runner


def create_app(
    config: RelayConfig,
    *,
    store: RelayStore | None = None,
    fanout: FanOut | None = None,
) -> web.Application:
    """The relay as an aiohttp application (store and fan-out default to SQLite, in-process).

    Serve it with :class:`~foliosync.server.http_errors.JsonErrorAppRunner` (as
    :func:`foliosync.server.serve.serve` does), so that even a request aiohttp's parser refuses is
    answered in the relay's JSON error shape.

    With the default store, the data directory is locked (:class:`DataDirLock`) from start-up to
    cleanup: starting a second relay on it raises :class:`DataDirLocked` from the runner's
    ``setup()``, and ``restore_store`` is refused while this one runs."""
    app = web.Application(middlewares=[json_errors])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # The default store's directory is this relay's for as long as it runs, however the
        # relay is embedded: a second relay on it, or a restore under it, is refused.
        lock = DataDirLock(config.data_dir) if store is None else None
        if lock is not None:
            lock.acquire()
        try:
            async for _ in _run(app):
                yield
        finally:
            if lock is not None:
                lock.release()

    async def _run(app: web.Application) -> AsyncIterator[None]:
        secret = load_or_create_secret(config.data_dir)
        relay_store = store or await SQLiteRelayStore.open(
            config.data_dir / "relay.db", durability=config.durability
        )
        relay = Relay(config, relay_store, fanout or InProcessFanOut(), secret)
        app[RelayKey] = relay
        relay.prices.start()
        try:
            metrics_runner = await _serve_metrics(relay)
        except BaseException:
            await relay.close()
            raise
        try:
            feed = relay.feed = start_feed(config.feed, relay.prices)
        except BaseException:  # a bad --feed: release the store, or its thread keeps us alive
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            await relay.close()
            raise
        trimming = (
            asyncio.get_running_loop().create_task(trim_memory_every(config.trim_memory_every))
            if config.trim_memory_every > 0
            else None
        )
        yield
        if trimming is not None:
            trimming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimming
        if feed is not None:
            await feed.close()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await relay.close()

    async def close_connections(app: web.Application) -> None:
        # on_shutdown runs before aiohttp waits for the running handlers, cleanup_ctx after: a
        # WebSocket handler only returns once its socket closes, so close them here.
        relay = app.get(RelayKey)
        if relay is not None:
            await relay.close_connections()

    async def ws(request: web.Request) -> web.StreamResponse:
        return await request.app[RelayKey].handle_ws(request)

    async def health(request: web.Request) -> web.StreamResponse:
        return await request.app[RelayKey].handle_health(request)

    async def metrics(request: web.Request) -> web.StreamResponse:
        return await request.app[RelayKey].handle_metrics(request)

    async def ready(request: web.Request) -> web.StreamResponse:
        return await request.app[RelayKey].handle_ready(request)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_connections)
    app.router.add_get("/ws", ws)
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/readyz", ready)
    add_price_routes(app)
    add_cors(app, config.cors_origins)
    return app
