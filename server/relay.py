"""The relay: an aiohttp app serving ``/ws`` (sync) and ``/healthz``.

One :class:`Connection` per WebSocket drives a pure :class:`ServerSession`; this module only moves
bytes and decides what frames mean. The WebSocket itself is the relay's own
(:mod:`foliosync.server.websocket`) for a plain upgrade of ``/ws`` under
:class:`~foliosync.server.http_errors.JsonErrorAppRunner`, aiohttp's otherwise; a Connection
talks to both alike:

- Hello: the extensions authenticate the token (by default a JWT signed with the relay's secret)
  before any document is touched; a refused one gets an Error and a close.
- SyncRequest: the relay's diff against the client's state vector, its own state vector and the
  document's watermark, once the extensions allowed reading the document. Initial syncs share a
  bounded number of slots, so that after a restart a thousand reconnecting clients queue for
  them instead of starving live updates.
- Update: authorized, checked (its bytes, then the document it would make, by the extensions'
  ``before_apply``), applied, stored, then acknowledged and fanned out to the user's other
  connections that synced that document (:meth:`Relay.submit_update`); a refusal is an Error
  for that document and seq only. The session refuses (fatally) an Update before its
  document's SyncRequest or with a seq that does not increase; see ``PROTOCOL.md``. A device's
  updates are pipelined: the next one is read and checked while the last is written, so that a
  backlog shares the store's commits, and the Acks go out in order, each once stored.

A frame takes the direct path when nothing waits before it and the socket's buffer is small (the
common case: no task switch per receiver): it is appended to the connection's write buffer, and
every buffer filled during one turn of the event loop goes out once that turn ends, one
``transport.write`` per connection whatever it got meanwhile (updates, acks, a price batch:
several WebSocket frames in one write, in the order they were sent). With hundreds of devices on
one document, a ``send()`` per receiver per update was most of the relay's time. While changes
fan out to many connections at once, a document's changes wait ``fanout_flush_delay`` (20 ms)
and go to each receiver as one merged Update (:mod:`foliosync.server.held_changes`): one write,
one frame and one apply per receiver per flush, whatever the edit rate; acks, replies and
prices never wait for that. Whether a
connection may take the direct path is one flag (:attr:`Connection._direct`), kept up to date
where its inputs change (the writer starts or ends, a close begins, a flush finds the socket's
buffer full), so the fan-out pays one attribute read per receiver.

Otherwise a frame waits in an :class:`OutboundQueue` drained by a writer task, started for the
connection while something waits and ended when nothing does (a task per idle connection was
2 KiB of each), control frames before prices, so a slow reader never blocks the relay; one that
falls too far behind is disconnected (it catches up by state vector when it reconnects) rather
than allowed to grow the relay's memory. Its prices meanwhile wait as the newest per symbol, a
bounded backlog. The writer writes out the connection's buffer before anything of its own, so
the order holds.

Several relays (``store_url`` and ``redis_url``: PostgreSQL and Redis) serve as one: an update is
acknowledged once committed in PostgreSQL, its change reaches the other relays through Redis
(:mod:`foliosync.server.redis_fanout`) and their hot copies only, and prices go round through
:mod:`foliosync.server.redis_prices`. While either service is unreachable updates are refused
with the fatal ``internal`` Error, so nothing is acknowledged that not every relay can serve
(what reads do then: :mod:`foliosync.server.postgres_store`). A share granted or ended and
tokens revoked are stored in PostgreSQL, then acted on by the relay that stored them
(:meth:`Relay.apply_control`) and by every other, told through the fan-out's control channel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from pycrdt import Doc

from foliosync.server.auth import Identity, load_or_create_secret
from foliosync.server.data_lock import DataDirLock
from foliosync.server.documents import (
    Applied,
    BadUpdate,
    RelayDocuments,
    Staged,
    drop_idle_scratches_every,
)
from foliosync.server.extensions import (
    DEFAULT_HOOK_TIMEOUT,
    Access,
    ConnectionInfo,
    ConnectionRequest,
    Extension,
    HookRunner,
    ProposedUpdate,
    SharingAuthorization,
    StoredChange,
    TokenAuthentication,
    default_extensions,
    server_identity,
)
from foliosync.server.fanout import (
    Change,
    ControlEvent,
    FanOut,
    InProcessFanOut,
    ShareGranted,
    ShareRevoked,
    Subscription,
    TokensRevoked,
    websocket_binary_frame,
)
from foliosync.server.feeds import Feed, start_feed
from foliosync.server.held_changes import HeldChanges, HeldDocument
from foliosync.server.http_auth import HookRunnerKey, authorize_request, bearer_authentication
from foliosync.server.http_cors import add_cors, normalize_origins
from foliosync.server.http_errors import (
    DirectGetKey,
    JsonErrorAppRunner,
    WebSocketFrontKey,
    http_error,
    json_errors,
)
from foliosync.server.http_prices import add_price_routes
from foliosync.server.http_shares import add_share_routes
from foliosync.server.logs import bind_log_context, log_context
from foliosync.server.measured_store import MeasuredRelayStore
from foliosync.server.memory import collect_young_every, trim_memory_every
from foliosync.server.metrics import (
    CONTENT_TYPE,
    FrameCounts,
    RelayCounters,
    relay_registry,
    render,
)
from foliosync.server.prices import PriceHub, PricePolicy
from foliosync.server.readiness import check_readiness
from foliosync.server.sharing import (
    REVOKED,
    SHARED,
    MemoryShareStore,
    Revocation,
    Share,
    ShareStore,
    SQLiteShareStore,
    check_grant,
    owner_and_id,
    shared_id,
)
from foliosync.server.storage import RelayStore, RelayStoreError, SQLiteRelayStore
from foliosync.server.sync_slots import InitialSyncSlots
from foliosync.server.user_documents import UserDocuments, entry_names, listed_documents
from foliosync.server.websocket import RequestHead, ServerWebSocket, WebSocketFront
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import (
    AccessDenied,
    AuthError,
    ConfigError,
    ExtensionFailed,
    LocalProtocolError,
    RemoteProtocolError,
    UpdateRefused,
    ValidationError,
)
from foliosync.sync.model import INDEX_DOCUMENT_ID, DocumentKind, kind_of
from foliosync.sync.model.schema import DEFAULT_LIMITS, Candidate, SchemaLimits
from foliosync.sync.prices import LatestPrices, PricePoint, Tick, check_ticks
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
from foliosync.sync.protocol.limits import MessageRate, RefusalLimit
from foliosync.sync.updates import decode_state_vector
from foliosync.sync.validation import normalize_symbol

__all__ = [
    "Connection",
    "Relay",
    "RelayConfig",
    "RelayKey",
    "connection_request",
    "create_app",
    "websocket_binary_frame",
]

log = logging.getLogger("foliosync.relay")


_DURABILITIES = ("normal", "full")


def _check_count(name: str, value: object, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"invalid {name} {value!r}: a whole number, at least {least}")


def _check_seconds(name: str, value: object, *, zero: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        least = "0 or more" if zero else "more than 0"
        raise ConfigError(f"invalid {name} {value!r}: a finite number of seconds, {least}")


def _check_port(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
        label = name.replace("_", " ")
        raise ConfigError(f"invalid {label} {value!r} ({name}): 1 to 65535, or 0 for any free one")


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"invalid {name} {value!r}: a non-empty string")


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Every operator knob of the relay, each checked when the config is built (a ConfigError
    names the field), so that a wrong value stops the relay at start-up, not at first use."""

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
    max_symbols: int = 2000  # symbols one connection may follow
    max_documents: int = DEFAULT_MAX_DOCUMENTS  # distinct documents one connection may sync
    max_documents_per_user: int = 10_000
    """Distinct documents the relay stores for one user; an Update that would store one more is
    refused with a per-document ``too_many_documents``."""
    max_connections_per_user: int = 100
    """Connections one user may hold at once; the next Hello gets a fatal
    ``too_many_connections``."""
    message_rate: MessageRate = field(default_factory=MessageRate)
    """The token bucket every connection's messages go through (``rate_limited`` past it)."""
    refusal_limit: RefusalLimit = field(default_factory=RefusalLimit)
    """How many of a connection's frames the relay refuses within a window (weighted by
    ``foliosync.sync.protocol.session.refusal_weight``) before it ends the connection with a
    fatal ``too_many_refusals`` and close 1008."""
    idle_timeout: float = 120.0
    """Seconds a connection may send nothing (not even a Ping) before the relay ends it with a
    fatal ``idle_timeout``; 0: never. Clients ping more often than this (SyncClient every
    ``heartbeat`` seconds)."""
    trim_memory_every: float = 60.0  # seconds between handing freed memory back (0: never)
    gc_young_threshold: int = 10_000
    """Net container allocations between two collections of Python's youngest generation while
    the relay runs (the interpreter's default is 700; see :mod:`foliosync.server.memory`); 0
    leaves the interpreter's setting, for an app that embeds the relay and tunes its own
    collector. Process-wide, restored when the relay stops."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins (``https://dash.example.com``) that may call the HTTP API; none by
    default. Normalized as browsers send them; anything that is not an origin is a ConfigError."""
    metrics_port: int | None = None
    """Also serve ``GET /metrics`` without a token on 127.0.0.1 at this port (0: any free one,
    see :attr:`Relay.metrics_port`); None: only on the main port, with an admin token. Loopback
    only: whoever can reach it reads the relay's figures, so it is for a Prometheus on the
    same host (or behind a tunnel), never for the public address."""
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT
    """Seconds one extension's hook may take (see :mod:`foliosync.server.extensions`); past
    it the action is refused with ``extension_failed``."""
    schema_limits: SchemaLimits = DEFAULT_LIMITS
    """The limits :class:`~foliosync.server.extensions.SchemaValidation` checks
    (``foliosync.sync.model.schema.SchemaLimits``)."""
    store_url: str | None = None
    """``postgresql://USER@HOST:PORT/DB``: documents in PostgreSQL, shared by every relay of a
    group (:mod:`foliosync.server.postgres_store`); None: SQLite in ``data_dir``."""
    store_pool: int = 10  # connections to PostgreSQL, at most
    redis_url: str | None = None
    """``redis://HOST:PORT/DB``: changes and prices across the relays of a group
    (:mod:`foliosync.server.redis_fanout`, :mod:`foliosync.server.redis_prices`); None: this
    relay alone, fan-out in process."""
    redis_prefix: str = "foliosync:"
    fanout_flush_delay: float = 0.02
    """Seconds a fanned-out change may wait for more to share its write, while changes fan out
    to many connections at once (one write per device per change was most of a busy document's
    cost, the devices' reads as much as the relay's writes); 0: every loop turn. Acks, replies
    and prices never wait for it, nor changes while they reach few connections."""

    def __post_init__(self) -> None:
        _check_text("host", self.host)
        _check_port("port", self.port)
        if isinstance(self.data_dir, str):
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not isinstance(self.data_dir, Path):
            raise ConfigError(f"invalid data_dir {self.data_dir!r}: a path")
        _check_count("max_frame_size", self.max_frame_size, 1024)
        _check_count("max_send_size", self.max_send_size, 1024)
        _check_count("max_hot_documents", self.max_hot_documents)
        _check_count("max_initial_syncs", self.max_initial_syncs)
        _check_count("max_outbound_bytes", self.max_outbound_bytes, 1024)
        _check_seconds("hello_timeout", self.hello_timeout)
        _check_seconds("heartbeat", self.heartbeat)
        if self.durability not in _DURABILITIES:
            raise ConfigError(f"invalid durability {self.durability!r}: normal or full")
        _check_text("relay_id", self.relay_id)
        if not isinstance(self.feed, str):
            raise ConfigError(f"invalid feed {self.feed!r}: sim, sim:always, csv:PATH or none")
        _check_count("max_symbols", self.max_symbols)
        _check_count("max_documents", self.max_documents)
        _check_count("max_documents_per_user", self.max_documents_per_user)
        _check_count("max_connections_per_user", self.max_connections_per_user)
        if not isinstance(self.message_rate, MessageRate):
            raise ConfigError(f"invalid message_rate {self.message_rate!r}: a MessageRate")
        if not isinstance(self.refusal_limit, RefusalLimit):
            raise ConfigError(f"invalid refusal_limit {self.refusal_limit!r}: a RefusalLimit")
        _check_seconds("idle_timeout", self.idle_timeout, zero=True)
        _check_seconds("trim_memory_every", self.trim_memory_every, zero=True)
        _check_count("gc_young_threshold", self.gc_young_threshold, least=0)
        object.__setattr__(self, "cors_origins", normalize_origins(self.cors_origins))
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        _check_seconds("hook_timeout", self.hook_timeout)
        if not isinstance(self.schema_limits, SchemaLimits):
            raise ConfigError(f"invalid schema_limits {self.schema_limits!r}: a SchemaLimits")
        # A SyncReply carries a whole document and its state vector (no larger than the
        # document): a document the schema lets grow must fit one, or it could never be read.
        needed = 2 * self.schema_limits.max_document_bytes + 1024
        if needed > self.max_send_size:
            raise ConfigError(
                f"max_send_size {self.max_send_size} cannot carry a SyncReply of a document of "
                f"max_document_bytes {self.schema_limits.max_document_bytes}: at least {needed}"
            )
        if self.store_url is not None and not str(self.store_url).startswith(
            ("postgresql://", "postgres://")
        ):
            raise ConfigError(
                f"invalid store_url {self.store_url!r}: postgresql://USER@HOST:PORT/DB"
            )
        _check_count("store_pool", self.store_pool)
        if self.redis_url is not None and not str(self.redis_url).startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(f"invalid redis_url {self.redis_url!r}: redis://HOST:PORT/DB")
        _check_text("redis_prefix", self.redis_prefix)
        _check_seconds("fanout_flush_delay", self.fanout_flush_delay, zero=True)


class Relay:
    """The relay's shared state: documents, fan-out, secret, extensions and live connections.

    Server code edits a document the way a device does, through :meth:`edit_document`: the
    change is captured as an update and takes the path of a client's (checks, extensions,
    store, fan-out to every connection synced on it, ``after_store``)::

        def add_symbols(doc: Doc) -> None:
            Watchlist(doc, EditContext("server")).add(["AAPL", "MSFT"])

        await relay.edit_document("alice", document_id(DocumentKind.WATCHLIST, "Tech"),
                                  add_symbols)
    """

    def __init__(
        self,
        config: RelayConfig,
        store: RelayStore,
        fanout: FanOut,
        secret: bytes,
        *,
        extensions: Sequence[Extension] | None = None,
        price_policy: PricePolicy | None = None,
        shares: ShareStore | None = None,
    ) -> None:
        self.config = config
        # Shares and token revocations (foliosync.server.sharing): the default extensions that
        # were given no store of their own ask this one.
        self.shares: ShareStore = shares if shares is not None else MemoryShareStore()
        self.store = MeasuredRelayStore(store)  # every adapter's operations timed alike
        self.fanout = fanout
        self.secret = secret
        self.hooks = HookRunner(
            default_extensions(secret, config.schema_limits)
            if extensions is None
            else list(extensions),
            config.hook_timeout,
        )
        for extension in self.hooks.extensions:
            if isinstance(extension, SharingAuthorization) and extension.bound_by_relay:
                extension.shares = self.shares
            if isinstance(extension, TokenAuthentication) and extension.bound_by_relay:
                extension.revocations = self.shares
        self.documents = RelayDocuments(self.store, max_hot=config.max_hot_documents)
        policy = price_policy or PricePolicy()
        self.prices = PriceHub(window_override_ms=policy.window_ms)
        self.initial_sync_slots = InitialSyncSlots(config.max_initial_syncs)
        self.counters = RelayCounters()
        self.registry = relay_registry(self)
        # Where /metrics is served without a token, once bound (None: not served there).
        self.metrics_port: int | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.connections: set[Connection] = set()
        self._serving: set[asyncio.Task[None]] = set()  # connections on the relay's own sockets
        # Admitted connections per user, for max_connections_per_user.
        self.user_connections: dict[str, int] = {}
        # What counts toward max_documents_per_user for each user with a connection here: the
        # documents stored and those the user's index lists (foliosync.server.user_documents).
        # Read with the Welcome's list (and the index, once needed), grown by each stored update,
        # dropped with the user's last connection.
        self.user_documents: dict[str, UserDocuments] = {}
        self.feed: Feed | None = None  # the --feed task, once started; /readyz watches it
        self.started = time.monotonic()
        self._ids = itertools.count(1)
        # Connections with bytes in their write buffer, written out once this loop turn ends;
        # while changes fan out wide, their fanned-out changes a moment later (see _flush_soon).
        self._unflushed: list[Connection] = []
        # Changes held for a wide fan-out: one merged Update per document and receiver at the
        # next held flush (see foliosync.server.held_changes).
        self._held: HeldChanges[Connection] = HeldChanges()
        self._held_handle: asyncio.TimerHandle | None = None
        # Each user's connections, behind one fan-out subscription per user: a change of a
        # document held for a wide fan-out is then appended once, not handed to each of them.
        self._followers: dict[str, list[Connection]] = {}
        self._following: dict[str, Subscription] = {}
        self._wide_at = -math.inf  # when a flush last wrote to many connections (loop time)
        # Grants and revocations made through the other relays of a group, for the connections
        # held here (nothing comes in one process).
        self._peer_control = fanout.subscribe_control(self._on_peer_control)

    def _flush_soon(self, connection: Connection) -> None:
        """Write ``connection``'s buffer at the end of this loop turn."""
        if not self._unflushed:
            asyncio.get_running_loop().call_soon(self._flush_writes, context=_FLUSH_CONTEXT)
        self._unflushed.append(connection)
        connection._flush_due = True

    def hold_change(self, connection: Connection, change: Change) -> bool:
        """Hold a fanned-out change for ``connection`` until the held flush, if changes fan out
        to many connections now (or changes of its document wait already, which it must not
        overtake); False: send it at once. Held, a document's changes go out to each receiver as
        one merged Update ``config.fanout_flush_delay`` later, so that one write, one frame and
        one apply on the device carry every change of that delay (see
        :mod:`foliosync.server.held_changes`). Acks, replies and prices never wait for that.
        """
        held = self._held
        if held.get(change.user, change.doc_id) is None:
            delay = self.config.fanout_flush_delay
            # Held only while wide fan-outs come closer together than twice the delay: a busy
            # document; a change after a quiet spell goes at once.
            if delay <= 0:
                return False
            loop = asyncio.get_running_loop()
            if loop.time() - self._wide_at >= 2 * delay:
                return False
            if self._held_handle is None:
                self._held_handle = loop.call_later(delay, self._flush_held, context=_FLUSH_CONTEXT)
        held.hold(connection, change)
        return True

    def follow(self, connection: Connection) -> Subscription:
        """``connection`` gets the changes of its user's documents (those it synced) from now
        on, until the subscription returned is closed."""
        assert connection.identity is not None
        user = connection.identity.user
        followers = self._followers.get(user)
        if followers is None:
            followers = self._followers[user] = []
            self._following[user] = self.fanout.subscribe(
                user, functools.partial(self._fan, followers)
            )
        followers.append(connection)
        return _Following(self, user, connection)

    def _unfollow(self, user: str, connection: Connection) -> None:
        followers = self._followers.get(user, [])
        with contextlib.suppress(ValueError):  # closed twice
            followers.remove(connection)
        if user in self._followers and not followers:
            del self._followers[user]
            self._following.pop(user).close()

    def _fan(self, followers: list[Connection], change: Change) -> None:
        """A change of a user's document, for that user's connections here. While its document
        is held, it joins the held changes once; otherwise each connection takes it or not
        (:meth:`Connection._deliver`), and may hold it."""
        held = self._held.get(change.user, change.doc_id)
        if held is None or not held.whole:
            receivers = 0
            for connection in followers:
                try:
                    receivers += connection._deliver(change)
                except Exception:  # one connection's failure is not the others'
                    log.exception("connection %s failed to take a change", connection.id)
            if receivers >= _WIDE_FANOUT:
                # Wide from now on, not only from its flush: the next changes of a burst (a
                # device's backlog acknowledged at once, after a stall) are held, rather than
                # each written to every receiver, which would make the stall longer.
                self._wide_at = asyncio.get_running_loop().time()
            held = self._held.get(change.user, change.doc_id)
            if held is None:
                return
            held.whole = True
        else:
            held.append(change)
        if held.size >= _DIRECT_WRITE_LIMIT:  # a burst: no reason to hold it longer
            released = self._held.release(change)
            if released is not None:
                self._send_held([released])

    def synced(self, connection: Connection, user: str, doc_id: str) -> None:
        """``connection`` synced one of its user's documents: it joins that document's held
        changes, if some wait (those of later changes it gets; the SyncReply brings the rest)."""
        held = self._held.get(user, doc_id)
        if held is not None:
            held.join(connection)

    def _flush_writes(self) -> None:
        """One write per connection for all it was sent since the last flush."""
        unflushed, self._unflushed = self._unflushed, []
        for connection in unflushed:
            connection._flush_wire()
        if len(unflushed) >= _WIDE_FANOUT:
            self._wide_at = asyncio.get_running_loop().time()

    def _flush_held(self) -> None:
        self._held_handle = None
        if self._held.receivers() >= _WIDE_FANOUT:
            self._wide_at = asyncio.get_running_loop().time()
        self._send_held(self._held.take())

    def _send_held(self, documents: list[HeldDocument[Connection]]) -> None:
        for document in documents:
            for connection, changes in document.deliveries():
                connection._send_held(changes)

    def next_connection_id(self) -> str:
        return f"{self.config.relay_id}:{next(self._ids)}"

    # -- documents, for connections and for server code ----------------------------------------

    async def submit_update(
        self,
        identity: Identity,
        doc_id: str,
        update: bytes,
        *,
        seq: int,
        device: str,
        origin: str,
        now_ms: int,
        seen: int | None = None,
        listing: UserDocuments | None = None,
    ) -> Applied:
        """Check, apply and store one update of ``identity.user``'s ``doc_id``: the one path of
        every update, a device's or the relay's own (:meth:`stage_update`, then its write).

        In this order: the kind of the id (ValidationError), the extensions' ``authorize``
        (AccessDenied, AuthError), the wire checks of ``foliosync.sync.updates`` against the
        document's state vector (BadUpdate, UpdateV2, MissingDependencies), for the user's
        index with ``listing`` (what counts toward the user's limit) the documents it would list
        beyond ``max_documents_per_user`` (UpdateRefused ``too_many_documents``), the
        extensions' ``before_apply`` on the document as it would be (UpdateRefused,
        SchemaViolation); only then is it applied in memory and stored (RelayStoreError). A
        refused update changes nothing. The caller acknowledges, then calls
        :meth:`publish_change`."""
        relisted: list[tuple[frozenset[str], frozenset[str]]] = []  # (listed, unlisted)
        staged = await self.stage_update(
            identity,
            doc_id,
            update,
            seq=seq,
            device=device,
            origin=origin,
            now_ms=now_ms,
            seen=seen,
            listing=listing,
            relisted=relisted,
        )
        applied = await staged.stored()
        if listing is not None and relisted:
            listing.relist(*relisted[-1])
        return applied

    async def stage_update(
        self,
        identity: Identity,
        doc_id: str,
        update: bytes,
        *,
        seq: int,
        device: str,
        origin: str,
        now_ms: int,
        seen: int | None = None,
        listing: UserDocuments | None = None,
        relisted: list[tuple[frozenset[str], frozenset[str]]] | None = None,
    ) -> Staged:
        """:meth:`submit_update` up to the store's write: the checks passed, applied in memory,
        its append under way; ``await staged.stored()`` before acknowledging. What lets a
        connection check its next update while the last is written. With ``listing``,
        ``relisted`` gets what an index update lists and unlists, for ``listing`` once stored
        (what :meth:`submit_update` does: an index update that may list new documents is not
        pipelined)."""
        if relisted is None:
            relisted = []
        kind = kind_of(doc_id)
        hooks = self.hooks
        await hooks.authorize(identity, doc_id, "write")
        if not getattr(self.fanout, "reachable", True):
            # Stored now, it would reach the other relays' devices only once the bus is back:
            # refused instead, as a store that is down refuses, and resent after a reconnect.
            raise RelayStoreError("the relay cannot reach the other relays (Redis is down)")
        owner, local = _resolve(identity.user, doc_id)
        if kind is not DocumentKind.INDEX:
            listing = None

        async def before_apply(candidate: Candidate) -> None:
            if listing is not None:
                changed = candidate.changed.get("documents", frozenset())
                listed, unlisted = listed_documents(candidate.doc, changed)
                limit = self.config.max_documents_per_user
                beyond = listing.beyond(listed | {INDEX_DOCUMENT_ID}, limit)  # itself, too
                if beyond:
                    shown = entry_names(candidate.doc, beyond - {INDEX_DOCUMENT_ID})
                    raise UpdateRefused(
                        f"the relay keeps at most {limit} documents per user, listed or stored: "
                        f"no room for {shown}",
                        ErrorCode.TOO_MANY_DOCUMENTS,
                    )
                relisted[:] = [(listed, unlisted)]
            if hooks.uses("before_apply"):
                await hooks.before_apply(
                    ProposedUpdate(
                        identity=identity,
                        owner=owner,
                        doc_id=local,
                        kind=kind,
                        seq=seq,
                        update=update,
                        candidate=candidate,
                        device=device,
                        origin=origin,
                    )
                )

        return await self.documents.stage(
            owner,
            local,
            update,
            device=device,
            now_ms=now_ms,
            seen=seen,
            origin=origin,
            kind=kind,
            before_apply=(
                before_apply if listing is not None or hooks.uses("before_apply") else None
            ),
        )

    async def publish_change(
        self,
        owner: str,
        doc_id: str,
        update: bytes,
        applied: Applied,
        *,
        now_ms: int,
        device: str,
        origin: str,
    ) -> None:
        """Fan a stored change out to the connections synced on it (not to ``origin``): the
        owner's, and those of the users it is shared with; then tell the extensions'
        ``after_store``. ``doc_id`` is the owner's id of it."""
        if applied.recovered:  # read back from a shared store: the devices here lacked it
            recovered = encode_frame(Update(doc_id, 0, applied.recovered, now_ms, device))
            await self.fanout.publish(
                Change(
                    user=owner,
                    doc_id=doc_id,
                    update=applied.recovered,
                    changed_at=now_ms,
                    changed_by=device,
                    origin="",  # every connection, the sender's too: it may lack some of it
                    relay=self.config.relay_id,
                    frame=recovered,
                    wire=websocket_binary_frame(recovered),
                )
            )
        if applied.changed:
            # One encoding for every receiver: with hundreds of devices on one document, building
            # and encoding the same frame per receiver was a fifth of the relay's time.
            frame = encode_frame(Update(doc_id, 0, update, now_ms, device))
            await self.fanout.publish(
                Change(
                    user=owner,
                    doc_id=doc_id,
                    update=update,
                    changed_at=now_ms,
                    changed_by=device,
                    origin=origin,
                    relay=self.config.relay_id,
                    frame=frame,
                    wire=websocket_binary_frame(frame),
                )
            )
        if applied.changed and self.hooks.uses("after_store"):
            await self.hooks.after_store(
                StoredChange(owner, doc_id, update, applied.watermark, device, origin)
            )

    async def read_document(self, owner: str, doc_id: str) -> Doc[Any]:
        """A copy of ``owner``'s ``doc_id`` as the relay holds it now (empty if it has none).
        Changing the copy changes nothing; :meth:`edit_document` is how server code edits."""
        kind_of(doc_id)
        doc: Doc[Any] = Doc()
        doc.apply_update(await self.documents.snapshot(owner, doc_id))
        return doc

    async def edit_document(
        self,
        owner: str,
        doc_id: str,
        change: Callable[[Doc[Any]], None],
        *,
        device: str = "server",
    ) -> bool:
        """Edit ``owner``'s ``doc_id`` from server code: ``change`` edits a copy of it, and what
        it changed goes through exactly the path of a device's update (see
        :meth:`submit_update`), under :func:`server_identity` (scopes ``sync`` and ``server``),
        then to every connection synced on the document. Returns whether anything changed.

        Raises what refuses a device's update (UpdateRefused, SchemaViolation, AccessDenied,
        ExtensionFailed, ...): nothing is stored then."""
        doc = await self.read_document(owner, doc_id)
        before = doc.get_state()
        change(doc)
        update = doc.get_update(before)
        identity = server_identity(owner, device)
        origin = f"{self.config.relay_id}:server"
        now = wall_ms()
        applied = await self.submit_update(
            identity, doc_id, update, seq=0, device=device, origin=origin, now_ms=now
        )
        await self.publish_change(
            owner, doc_id, update, applied, now_ms=now, device=device, origin=origin
        )
        return applied.changed

    # -- sharing and revocation, for the HTTP API and server code ------------------------------

    async def grant_share(self, share_owner: str, doc_id: str, grantee: str, access: str) -> Share:
        """Share ``doc_id`` of ``share_owner`` (ValidationError for bad arguments); the grantee's
        open connections, on every relay of a group, are told at once by a ``shared`` notice
        naming ``owner/doc``. Changing a read-write share to read-only takes effect at the
        grantee's next Update."""
        share = await self.shares.grant(
            share_owner, doc_id, grantee, check_grant(share_owner, doc_id, grantee, access)
        )
        await self._control(ShareGranted(share.owner, share.doc_id, share.grantee, share.access))
        return share

    async def revoke_share(self, share_owner: str, doc_id: str, grantee: str) -> bool:
        """End a share; at once, the grantee's connections synced on it (on every relay of a
        group) get a ``revoked`` Error for ``owner/doc``, receive none of its changes and have
        their Updates of it refused. Told even when there was no share (False): a revocation
        asked again then reaches connections that a lost control event did not."""
        ended = await self.shares.revoke(share_owner, doc_id, grantee)
        await self._control(ShareRevoked(share_owner, doc_id, grantee))
        return ended

    async def revoke_tokens(self, revocation: Revocation) -> int:
        """Record a revocation (a device's tokens, or one token); every open connection it
        covers, on every relay of a group, gets a fatal ``auth_failed`` and is closed. Returns
        how many were on this relay."""
        await self.shares.revoke_tokens(revocation)
        return await self._control(
            TokensRevoked(revocation.revoked_at, revocation.user, revocation.device, revocation.jti)
        )

    async def _control(self, event: ControlEvent) -> int:
        """After the share store took ``event``: this relay's connections at once, then the
        other relays' through the fan-out. The store is the truth (every Hello, SyncRequest and
        Update reads it), so a fan-out that fails to tell the others is logged, not raised: the
        change is made, and the caller is not told it failed."""
        reached = self.apply_control(event)
        try:
            await self.fanout.publish_control(event)
        except Exception:
            log.exception("the other relays could not be told of %s", event)
        return reached

    def _on_peer_control(self, event: ControlEvent) -> None:
        log.debug("a peer relay's %s", event)
        self.apply_control(event)

    def apply_control(self, event: ControlEvent) -> int:
        """Bring this relay's open connections in line with a grant or revocation the share
        store holds already: the one path of those made here and of those another relay of the
        group made. Returns how many connections it reached (told, or closed)."""
        connections = list(self.connections)
        if isinstance(event, ShareGranted):
            wire_id = shared_id(event.owner, event.doc_id)
            message = f"{event.owner} shared {event.doc_id} with you" + (
                " (read-only)" if event.access == "read" else ""
            )
            return sum(c.tell_shared(event.grantee, wire_id, message) for c in connections)
        if isinstance(event, ShareRevoked):
            wire_id = shared_id(event.owner, event.doc_id)
            return sum(c.revoke_document(event.grantee, wire_id) for c in connections)
        revocation = Revocation(event.revoked_at, event.user, event.device, event.jti)
        return sum(c.end_if_revoked(revocation) for c in connections)

    async def recheck_connections(self) -> int:
        """Bring every open connection in line with the share store as it is now: end those
        whose token is revoked, and revoke the shared documents they synced that are no longer
        shared with them. What the relay does when it may have missed its peers' control events
        (the fan-out's ``on_missed``); a share granted meanwhile is listed by the next Welcome.
        Raises RelayStoreError if the store fails. Returns how many connections it reached."""
        revocations = await self.shares.revocations()
        by_jti = {r.jti: r for r in revocations if r.jti}
        by_device: dict[str, list[Revocation]] = {}
        for r in revocations:
            if not r.jti:
                by_device.setdefault(r.device, []).append(r)
        reached = 0
        shared: dict[str, set[str]] = {}  # grantee -> the OWNER/ids shared with them now
        for connection in list(self.connections):
            identity = connection.identity
            if identity is None:
                continue
            candidates = by_device.get(identity.device, [])
            if identity.token_id in by_jti:
                candidates = [by_jti[identity.token_id], *candidates]
            if any(connection.end_if_revoked(r) for r in candidates):
                reached += 1
                continue
            synced = connection.synced_shared_documents()
            if not synced:
                continue
            if identity.user not in shared:
                grants = await self.shares.by_grantee(identity.user)
                shared[identity.user] = {s.shared_id for s in grants}
            gone = [c for c in synced if c not in shared[identity.user]]
            if gone:
                reached += 1
                for wire_id in gone:
                    connection.revoke_document(identity.user, wire_id)
        return reached

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            heartbeat=self.config.heartbeat,
            max_msg_size=self.config.max_frame_size + _MESSAGE_SLACK,
            compress=False,
        )
        if not ws.can_prepare(request):  # a plain GET, e.g. a browser opening the URL
            raise http_error(
                web.HTTPUpgradeRequired,
                "this is the relay's WebSocket endpoint: connect with a WebSocket client",
                headers={"Upgrade": "websocket"},
            )
        await ws.prepare(request)
        await self._serve(Connection(self, ws, request.transport, connection_request(request)))
        return ws

    def take_websocket(
        self, head: RequestHead, ws: ServerWebSocket, transport: asyncio.Transport
    ) -> None:
        """An upgrade of ``/ws`` served on the relay's own WebSocket layer (see
        :mod:`foliosync.server.websocket`): the same Connection, on a task of its own."""
        peer = transport.get_extra_info("peername")
        remote = peer[0] if isinstance(peer, tuple) and peer else None
        request = ConnectionRequest(remote=remote, headers=head.headers, path=head.path)
        task = asyncio.get_running_loop().create_task(
            self._serve(Connection(self, ws, transport, request))
        )
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve(self, connection: Connection) -> None:
        self.connections.add(connection)
        self.counters.connections_opened += 1
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self.counters.connections_closed[connection.close_code_label()] += 1
            self.counters.prices_dropped_closed += connection.prices.replaced

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
        # aiohttp waits for its handlers before the store closes; the relay's own connections
        # are waited for here, so that what they still store and acknowledge is not cut off.
        serving = list(self._serving)
        if serving:
            _, late = await asyncio.wait(serving, timeout=_SHUTDOWN_TIMEOUT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    async def close(self) -> None:
        self._peer_control.close()
        await self.prices.close()
        await self.close_connections()
        await self.fanout.close()
        try:
            await self.store.close()
        finally:
            await self.shares.close()


def _resolve(user: str, doc_id: str) -> tuple[str, str]:
    """Whose document ``doc_id`` (as ``user`` names it) is, and its id there; the owner naming
    her own document ``user/...`` gets ``not_found`` (the owner's id is the plain one)."""
    owner, local = owner_and_id(user, doc_id)
    if owner == user and local != doc_id:
        raise AccessDenied(f"{doc_id}: your own documents have no owner prefix", "not_found")
    return owner, local


class Connection:
    """One client WebSocket: reads frames in order, writes through an outbound queue.

    Slotted: a relay holds one per connected device, and an instance dictionary for this many
    attributes was 1.5 KiB of each (an attribute added below needs its slot here)."""

    __slots__ = (
        "_acks",
        "_admitted_user",
        "_close_code",
        "_close_with",
        "_closing",
        "_connected",
        "_counters",
        "_direct",
        "_flush_due",
        "_log_ctx",
        "_owners",
        "_prices_since",
        "_prices_waiting",
        "_received_at",
        "_revoked",
        "_seen",
        "_sent_bytes",
        "_sent_frames",
        "_staging",
        "_subscription",
        "_synced_docs",
        "_transport",
        "_wire",
        "_wire_bytes",
        "_writer",
        "device",
        "id",
        "identity",
        "outbound",
        "prices",
        "relay",
        "request",
        "session",
        "ws",
    )

    def __init__(
        self,
        relay: Relay,
        ws: web.WebSocketResponse | ServerWebSocket,
        transport: asyncio.Transport | None = None,
        request: ConnectionRequest | None = None,
    ) -> None:
        self.relay = relay
        self.ws = ws
        self._transport = transport
        self.request = request or ConnectionRequest(remote=None)
        self._connected: ConnectionInfo | None = None  # once on_connect accepted it
        # The direct path's one test: no writer at work, nothing queued, no close begun, the
        # socket's buffer not found full at the last flush. Cleared and set where those change.
        self._direct = transport is not None
        self._wire: list[bytes] = []  # WebSocket frames for the next flush, in order
        self._wire_bytes = 0
        self._flush_due = False  # this connection waits in the relay's flush of this turn
        self.id = relay.next_connection_id()
        self.session = ServerSession(
            max_frame_size=relay.config.max_frame_size,
            max_send_size=relay.config.max_send_size,
            max_documents=relay.config.max_documents,
            message_rate=relay.config.message_rate,
            refusal_limit=relay.config.refusal_limit,
        )
        self._admitted_user: str | None = None  # counted in relay.user_connections
        self.identity: Identity | None = None
        self.device = ""
        self.outbound = OutboundQueue()
        self.prices = LatestPrices()  # released for this connection, not yet written
        self._prices_waiting = False  # prices were handed to the writer: none go around it
        self._prices_since = 0.0  # when the prices waiting now were first handed over
        # The task writing out what waits (the queue, then the prices), only while something
        # does: most connections never need one, and an idle task per connection with its
        # event cost 2 KiB each.
        self._writer: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        # Documents whose live changes this connection gets: those it sent a SyncRequest for
        # (and was allowed to read). The SyncReply brings everything up to then; from then on
        # every stored change of another connection follows, so nothing falls between the two.
        self._synced_docs: set[str] = set()
        # Shared documents: subscriptions to their owners' changes, and the ids whose share was
        # revoked while this connection lasted (their Updates get ``revoked``).
        self._owners: dict[str, Subscription] = {}
        self._revoked: set[str] = set()
        self._closing = False
        # Pipelined updates, checked and applied, waiting for their writes (made at first use),
        # and the task acknowledging them in order while some wait.
        self._staging: collections.deque[tuple[UpdateReceived, Staged, int, float]] | None = None
        self._acks: asyncio.Task[None] | None = None
        # Per document, the version (RelayDocuments.version) of its SyncReply or of its own last
        # update, whichever is newer: what makes an update of it concurrent or not.
        self._seen: dict[str, int] = {}
        self._received_at = 0.0  # when the frame being handled was read (perf_counter)
        self._close_code: int | None = None  # the code this connection closed with, once known
        # The code to close with when the conversation ends: 1000; 1011 after a failure of the
        # relay's own (a fatal ``internal`` Error, an unexpected exception); 1008 after the
        # client's abuse (``rate_limited``, ``too_many_refusals``), which tells a client to
        # back off for long rather than reconnect at once.
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
        try:
            await self._read_loop()
        except ConnectionError:
            # The socket closed under a write of aiohttp's own (a Pong to the peer's Ping): the
            # peer is gone, as when its read ends; nothing of the relay failed.
            log.debug("connection %s: the socket closed while answering the peer", self.id)
        except Exception:  # a relay bug: logged with its traceback, the peer told by 1011
            log.exception("connection %s failed", self.id)
            if not self.session.closed:
                self._fail_internal("the relay failed; reconnect and retry")
            self._close_with = 1011
        finally:
            # Pipelined updates are stored and acknowledged before the close, if the store
            # answers in time (their fan-out does not depend on this connection).
            await self._settle(timeout=_CLOSE_TIMEOUT)
            self._release_admission()
            self.relay.prices.unsubscribe(self)
            if self._subscription is not None:
                self._subscription.close()
            for subscription in self._owners.values():
                subscription.close()
            self._owners.clear()
            self.session.close()
            if self._connected is not None and self.identity is not None:
                await self.relay.hooks.on_disconnect(self.identity, self._connected)
            self._closing = True
            self._direct = False
            writer = self._start_writer()  # what still waits goes out before the close
            if writer is not None:
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

    def _release_admission(self) -> None:
        user = self._admitted_user
        if user is None:
            return
        self._admitted_user = None
        counts = self.relay.user_connections
        left = counts.get(user, 1) - 1
        if left > 0:
            counts[user] = left
        else:
            counts.pop(user, None)
            self.relay.user_documents.pop(user, None)

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self._closing = True
        self._direct = False
        self._start_writer()
        await self._close_ws(code, message)

    def close_code_label(self) -> str:
        """The ``code`` label of ``foliosync_connections_closed_total``: the code the relay
        closed with, or the peer's; else whatever code the socket ended with, such as 1009 when
        the WebSocket layer itself refused a message over its limit (no Error frame then), or 1006
        for a connection cut (a missed heartbeat, a peer that did not take its close frame);
        "none" for a socket that ended without any code."""
        if self._close_code is not None:
            return str(self._close_code)
        code = self.ws.close_code
        return "none" if code is None else str(int(code))

    def _note_ws_ended(self) -> None:
        """The socket ended under the read loop: by a missed heartbeat? Both WebSocket layers
        (the relay's own and aiohttp's ``WebSocketResponse(heartbeat=...)``) then close it with
        1006 and keep a ``TimeoutError`` ("No PONG received") as its exception; the only other
        TimeoutError aiohttp keeps is from a closing handshake, which the relay would have begun
        (a code noted)."""
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
        self._direct = False
        self._flush_wire()  # what was sent before the close frame goes before it
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

    def _buffer(self, wire: bytes) -> None:
        """The direct path: ``wire`` goes out with this connection's next flush (at the end of
        this loop turn, or now if the buffer holds a socket buffer's worth already)."""
        if not self._flush_due:  # due this turn, even if fanned-out changes wait in the buffer
            self.relay._flush_soon(self)
        self._wire.append(wire)
        self._wire_bytes += len(wire)
        if self._wire_bytes >= _DIRECT_WRITE_LIMIT:
            self._flush_wire()

    def _flush_wire(self) -> None:
        """Write the buffer in one ``transport.write``; a socket whose buffer is then full sends
        the next frames through the writer, which waits for it."""
        self._flush_due = False
        chunks = self._wire
        if not chunks:
            return
        self._wire = []
        self._wire_bytes = 0
        transport = self._transport
        if transport is None or transport.is_closing() or self.ws.closed:
            self._direct = False
            return
        transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if transport.get_write_buffer_size() >= _DIRECT_WRITE_LIMIT:
            self._direct = False  # set again by a writer once it has drained the socket

    def _send(self, data: bytes, wire: bytes = b"") -> None:
        """Send a control frame: at once if nothing is queued before it, else in turn.

        The direct path buffers a ready WebSocket frame for this loop turn's flush: with hundreds
        of devices on one document, waking a writer task per receiver for every change cost more
        than the write itself, and a write per frame most of the rest. Anything else goes through
        the queue and the writer, in order.
        """
        if self._direct:
            self._buffer(wire or websocket_binary_frame(data))
            code = data[1]
            self._sent_frames[code] += 1
            self._sent_bytes[code] += len(data)
            return
        self.outbound.push_control(data)
        self._start_writer()
        if self.outbound.control_bytes > self.relay.config.max_outbound_bytes and not self._closing:
            self._log_ctx.run(
                log.warning,
                "connection %s fell behind; disconnecting it",
                self.id,
                extra={"connection": self.id},
            )
            self._closing = True
            self._direct = False
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
        if self._direct and not self._prices_waiting:
            if self.session.closed:
                return
            try:
                frame = encode_price_frame(False, [p.wire_bytes() for p in points])
            except LocalProtocolError as exc:  # cannot happen with the limits we set; never fatal
                log.error("connection %s: %s", self.id, exc)
                return
            self._buffer(websocket_binary_frame(frame))
            self._sent_frames[_PRICE_BATCH_CODE] += 1
            self._sent_bytes[_PRICE_BATCH_CODE] += len(frame)
            return
        if self.session.closed:
            return
        self.prices.add(points)
        if not self._prices_waiting:
            self._prices_since = time.perf_counter()
        self._prices_waiting = True
        self._start_writer()

    def _start_writer(self) -> asyncio.Task[None] | None:
        """The writer, started if frames or prices wait for it and none runs yet (None: nothing
        waits). It runs in this connection's log context, whoever's task queued the frame."""
        writer = self._writer
        if writer is None and (self.outbound or self._prices_waiting):
            self._direct = False
            writer = self._writer = asyncio.get_running_loop().create_task(
                self._write_queued(), context=self._log_ctx.copy()
            )
        return writer

    async def _write_queued(self) -> None:
        """Control frames first, always; then the prices that wait, the newest per symbol (a slow
        reader gets newer prices later, never a backlog). Ends once nothing waits: the direct
        path takes over again, unless a close has begun."""
        try:
            self._flush_wire()  # what took the direct path before goes first
            while True:
                data = self.outbound.pop()
                queued_since = 0.0
                if data is None and self._prices_waiting:
                    self._prices_waiting = False
                    waiting = self.prices.take()
                    if waiting and not self.session.closed:
                        data = self.session.prices([p.wire_bytes() for p in waiting])
                        queued_since = self._prices_since
                if data is None:
                    if not self._closing:
                        self._direct = True  # nothing queued, and the socket took the last frame
                    return
                if self.ws.closed:
                    return
                try:
                    await self.ws.send_bytes(data)
                except (ConnectionError, RuntimeError):
                    return
                self._counters.sent.count(data)
                if queued_since:
                    self.relay.prices.queued.observe(time.perf_counter() - queued_since)
        finally:
            self._writer = None

    async def _read_loop(self) -> None:
        hello_deadline = self.relay.config.hello_timeout
        idle = self.relay.config.idle_timeout or None
        loop = asyncio.get_running_loop()
        last_frame = loop.time()
        turn = 0.0  # seconds this connection's frames have held the loop since it last yielded
        while not self.session.closed and not self._closing:
            try:
                if self.identity is None:
                    message = await self.ws.receive(timeout=hello_deadline)
                elif idle is None:
                    message = await self.ws.receive()
                else:
                    # Not receive(timeout=): aiohttp restarts that at every WebSocket ping and
                    # pong, which it answers itself, so a peer that only answers pings would
                    # never be idle. The deadline counts from the client's last frame, on
                    # either WebSocket layer.
                    async with asyncio.timeout_at(last_frame + idle):
                        message = await self.ws.receive()
                last_frame = loop.time()
            except TimeoutError:
                if self.identity is None:
                    self._counters.connections_refused["hello_timeout"] += 1
                    self._send(self.session.reject(ErrorCode.NOT_AUTHENTICATED, "no Hello in time"))
                    return
                # WebSocket pings are answered by the WebSocket layer and never reach this loop:
                # only the client's own frames (its protocol Pings among them) keep it open.
                self._counters.connections_cut["idle_timeout"] += 1
                log.info("connection %s sent nothing for %g s; closing it", self.id, idle)
                self._send(
                    self.session.error(
                        ErrorCode.IDLE_TIMEOUT, f"nothing received for {idle:g} s; ping sooner"
                    )
                )
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
                    # The WebSocket layer refused the message (1009: over its limit; 1002, 1007:
                    # a broken frame) and closed with its code; the socket itself may then end
                    # as 1006, its handshake cut short.
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
                events = self.session.receive_data(data, now=loop.time())
            except RemoteProtocolError as exc:
                assert self.session.error_reply is not None
                if exc.code in _ABUSE:
                    self._counters.connections_cut[exc.code] += 1
                    log.info("connection %s: %s; closing it", self.id, _ABUSE[exc.code])
                    self._close_with = WSCloseCode.POLICY_VIOLATION
                if self.identity is None:
                    self._counters.connections_refused["bad_hello"] += 1
                elif FrameCounts.code_of(data) == _UPDATE_CODE:
                    self._counters.updates_refused[exc.code] += 1
                self._send(self.session.error_reply)
                return
            for event in events:
                with log_context(doc=getattr(event, "doc", None)):
                    await self._handle(event)
            # receive() returns without yielding while frames are buffered: without a yield, a
            # client that sends a hundred costly frames at once has the relay to itself until
            # they are all handled, and every other connection waits. Yielding after every
            # frame was too much: a publisher's frames were then read one per loop turn, and a
            # turn that flushes prices to thousands of sockets takes tens of milliseconds, so
            # its ticks queued for seconds. A connection yields once its frames have taken
            # _FAIR_TURN_S of the loop since its last yield.
            turn += time.perf_counter() - self._received_at
            if turn >= _FAIR_TURN_S:
                turn = 0.0
                await asyncio.sleep(0)

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
        hooks = self.relay.hooks
        request = ConnectionRequest(
            self.request.remote, self.request.headers, event.client_name, self.request.path
        )
        self.request = request
        try:
            identity = await hooks.authenticate(event.token, request)
        except AuthError as exc:
            log.info("authentication failed: %s", exc)
            self._counters.connections_refused["auth_failed"] += 1
            self._send(self.session.reject(ErrorCode.AUTH_FAILED, str(exc)))
            return
        except ExtensionFailed:
            self._counters.connections_refused["auth_failed"] += 1
            self._send(
                self.session.reject(
                    ErrorCode.AUTH_FAILED, "the relay's authentication check failed; retry later"
                )
            )
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
        limit = self.relay.config.max_connections_per_user
        held = self.relay.user_connections.get(identity.user, 0)
        if held >= limit:
            log.info("connection refused: %s already holds %d connections", identity.user, held)
            self._counters.connections_refused["too_many_connections"] += 1
            self._send(
                self.session.reject(
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"this user already holds {limit} connections, the relay's limit; close one "
                    "or retry later",
                )
            )
            return
        # Counted from here (before the hooks await), so that simultaneous Hellos cannot all
        # pass the check.
        self.relay.user_connections[identity.user] = held + 1
        self._admitted_user = identity.user
        device = identity.device or event.client_name[:64] or self.id
        info = ConnectionInfo(self.id, device, request)
        try:
            await hooks.on_connect(identity, info)
        except (AuthError, AccessDenied, ExtensionFailed) as exc:
            code = exc.code if isinstance(exc, AccessDenied) else ErrorCode.AUTH_FAILED
            log.info("connection refused: %s", exc)
            self._counters.connections_refused["auth_failed"] += 1
            self._release_admission()
            self._send(self.session.reject(code, str(exc)))
            return
        self._connected = info
        self.identity = identity
        self.device = device
        bind_log_context(user=identity.user, device=self.device)
        self._log_ctx = contextvars.copy_context()
        log.debug("authenticated")
        try:
            documents = (
                await self.relay.documents.documents(identity.user)
                if "sync" in identity.scopes
                else []
            )
            if "sync" in identity.scopes:
                counted = self.relay.user_documents.setdefault(identity.user, UserDocuments())
                counted.stored(documents)
                # and what others share with this user: OWNER/id
                documents += [
                    s.shared_id for s in await self.relay.shares.by_grantee(identity.user)
                ]
        except RelayStoreError as exc:
            log.error("listing the documents of %s failed: %s", identity.user, exc)
            self._fail_internal("the relay cannot read its store now; reconnect later")
            return
        self._send(self.session.accept(identity.user, self.device, documents, wall_ms()))
        self._subscription = self.relay.follow(self)

    def _refuse(self, code: str, message: str, doc: str, seq: int | None) -> str:
        """A per-document Error (the connection goes on); returns its code."""
        self._send(self.session.error(code, message, doc=doc, seq=seq))
        return code

    async def _document_refusal(
        self, doc: str, access: Access, seq: int | None = None
    ) -> str | None:
        """Per-document authorization, by the extensions' ``authorize`` (the default: a user
        reaches their own documents only, with the sync scope), then whether the id names a
        document at all. Returns the code of the Error sent, or None if it may be used."""
        assert self.identity is not None
        try:
            await self.relay.hooks.authorize(self.identity, doc, access)
        except AccessDenied as exc:
            return self._refuse(exc.code, str(exc), doc, seq)
        except AuthError as exc:
            return self._refuse(ErrorCode.AUTH_FAILED, str(exc), doc, seq)
        except ExtensionFailed as exc:
            return self._refuse(ErrorCode.EXTENSION_FAILED, str(exc), doc, seq)
        try:
            kind_of(doc)
            _resolve(self.identity.user, doc)
        except ValidationError as exc:
            return self._refuse(ErrorCode.NOT_FOUND, str(exc), doc, seq)
        except AccessDenied as exc:
            return self._refuse(exc.code, str(exc), doc, seq)
        return None

    async def _on_sync_request(self, event: SyncRequested) -> None:
        assert self.identity is not None
        if await self._document_refusal(event.doc, "read") is not None:
            return
        try:
            decode_state_vector(event.state_vector)
        except BadUpdate as exc:
            self._send(self.session.error(ErrorCode.BAD_UPDATE, str(exc), doc=event.doc))
            return
        # Subscribed before the state is read: a change stored meanwhile is then in the reply,
        # or fanned out after it, or both (applying an update twice changes nothing).
        owner, local = owner_and_id(self.identity.user, event.doc)
        self._synced_docs.add(event.doc)
        self._revoked.discard(event.doc)
        if owner != self.identity.user and owner not in self._owners:
            self._owners[owner] = self.relay.fanout.subscribe(owner, self._deliver_shared)
        elif owner == self.identity.user:
            self.relay.synced(self, owner, local)
        async with self.relay.initial_sync_slots:
            try:
                diff, state_vector, watermark = await self.relay.documents.state(
                    owner, local, event.state_vector
                )
                self._saw(event.doc, self.relay.documents.version(owner, local))
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
        doc, seq = event.doc, event.seq
        try:
            kind_of(doc)
        except ValidationError:
            kind_ok = False
        else:
            kind_ok = True
        if not kind_ok:
            # Not a document id: told as today, after the authorization (a foreign owner's id
            # is "forbidden", not "not found").
            refusal = await self._document_refusal(doc, "write", seq)
            counters.updates_refused[refusal or ErrorCode.NOT_FOUND] += 1
            return
        if doc in self._revoked:
            message = "the share of this document was revoked"
            counters.updates_refused[self._refuse(REVOKED, message, doc, seq)] += 1
            return
        listing: UserDocuments | None = None
        try:
            if await self._over_document_limit(doc, seq):
                return
            if doc == INDEX_DOCUMENT_ID and self._counts_toward_limit(doc):
                listing = await self._counted_documents(with_index=True)
        except RelayStoreError as exc:
            counters.updates_refused[ErrorCode.INTERNAL] += 1
            log.error("counting the documents of %s failed: %s", self.identity.user, exc)
            self._fail_internal("the relay cannot read its store now; reconnect and retry")
            return
        received_at = self._received_at
        now = wall_ms()
        # Pipelined: checked and applied now, acknowledged once stored, while the next frames
        # are read, so that a device's backlog shares the store's commits instead of waiting
        # for one each. Not for an update that may add a document to what the user's limit
        # counts (a new document, an index update): the next one's check needs it counted.
        counted = self.relay.user_documents.get(self.identity.user)
        pipelined = listing is None and (
            not self._counts_toward_limit(doc) or (counted is not None and doc in counted)
        )
        try:
            if pipelined:
                staged = await self.relay.stage_update(
                    self.identity,
                    doc,
                    event.update,
                    seq=seq,
                    device=self.device,
                    origin=self.id,
                    now_ms=now,
                    seen=self._seen.get(doc),
                )
            else:
                await self._settle()  # what came before is acknowledged first
                applied = await self.relay.submit_update(
                    self.identity,
                    doc,
                    event.update,
                    seq=seq,
                    device=self.device,
                    origin=self.id,
                    now_ms=now,
                    seen=self._seen.get(doc),
                    listing=listing,
                )
        except (AccessDenied, UpdateRefused, BadUpdate) as exc:
            counters.updates_refused[self._refuse(exc.code, str(exc), doc, seq)] += 1
            return
        except AuthError as exc:
            counters.updates_refused[self._refuse(ErrorCode.AUTH_FAILED, str(exc), doc, seq)] += 1
            return
        except ExtensionFailed as exc:
            code = self._refuse(ErrorCode.EXTENSION_FAILED, str(exc), doc, seq)
            counters.updates_refused[code] += 1
            return
        except RelayStoreError as exc:
            self._store_failed(doc, exc)
            return
        if not pipelined:
            await self._stored(event, applied, now, received_at)
            return
        self._saw(doc, staged.version)
        staging = self._staging
        if staging is None:
            staging = self._staging = collections.deque()
        staging.append((event, staged, now, received_at))
        if self._acks is None:
            self._acks = asyncio.get_running_loop().create_task(self._acknowledge_staged())

    async def _acknowledge_staged(self) -> None:
        """The pipelined updates, in the order they came: each acknowledged and fanned out once
        stored, so that Acks keep the order of the Updates (an Ack tells the device that every
        earlier update of the document is stored too). One task for the whole backlog: a group
        commit that stores ten of them acknowledges all ten in one go, not one per loop turn."""
        staging = self._staging
        assert staging is not None
        try:
            while staging:
                event, staged, now, received_at = staging[0]
                try:
                    applied = await staged.stored()
                except RelayStoreError as exc:
                    staging.popleft()
                    if not self.session.closed:
                        self._store_failed(event.doc, exc)
                        self._end_aside()
                    continue  # the later ones are still fanned out once stored, never acked
                staging.popleft()
                await self._stored(event, applied, now, received_at)
        except Exception:  # a relay bug: logged, the device told, as in the read loop
            log.exception("connection %s: an update failed after its checks", self.id)
            staging.clear()
            if not self.session.closed:
                self._fail_internal("the relay failed; reconnect and retry")
                self._end_aside()
            self._close_with = 1011
        finally:
            self._acks = None

    def _end_aside(self) -> None:
        """The conversation ended (a fatal Error sent) outside the read loop, which may wait for
        the device's next frame: the connection is closed once the Error has gone."""
        if self._closing:
            return
        asyncio.get_running_loop().create_task(
            self._close_after_flush(self._close_with, b""), context=self._log_ctx
        )

    async def _settle(self, timeout: float | None = None) -> None:
        """Wait until this connection's pipelined updates are stored and acknowledged."""
        acks = self._acks
        if acks is not None:
            await asyncio.wait([acks], timeout=timeout)

    def _store_failed(self, doc: str, exc: RelayStoreError) -> None:
        self._counters.updates_refused[ErrorCode.INTERNAL] += 1
        log.error("storing an update of %s failed: %s", doc, exc)
        # Fatal (no doc): an Ack of a later update on this connection would settle this one
        # too. The client reconnects and resends what the relay lacks by state vector.
        why = (
            "its store is unreachable"
            if getattr(self.relay.fanout, "reachable", True)
            else "the other relays are unreachable"
        )
        self._fail_internal(
            f"the relay could not store an update of {doc} ({why}); reconnect and retry"
        )

    async def _stored(
        self, event: UpdateReceived, applied: Applied, now: int, received_at: float
    ) -> None:
        """An update is stored: acknowledged (unless the connection ended meanwhile), then fanned
        out to the other connections synced on it, which need it whether or not its sender is
        still there."""
        assert self.identity is not None
        counters = self._counters
        doc, seq = event.doc, event.seq
        self._saw(doc, applied.version)
        counted = self.relay.user_documents.get(self.identity.user)
        if counted is not None and "/" not in doc:
            counted.stored([doc])
        if not self.session.closed:
            self._send(self.session.ack(doc, seq))
            counters.update_store.observe(time.perf_counter() - received_at)
            counters.updates_acknowledged += 1
            log.debug("update %d stored and acknowledged", seq)
        if applied.concurrent:
            counters.updates_merged_concurrent += 1
        if applied.changed or applied.recovered:
            owner, local = owner_and_id(self.identity.user, doc)
            await self.relay.publish_change(
                owner,
                local,
                event.update,
                applied,
                now_ms=now,
                device=self.device,
                origin=self.id,
            )
            counters.update_fanout.observe(time.perf_counter() - received_at)

    async def _counted_documents(self, *, with_index: bool) -> UserDocuments:
        """What counts toward the user's limit (:attr:`Relay.user_documents`), so that the store
        is not asked per update; ``with_index``: the stored index's entries read in too (once
        per user while connected: only a new document or an index update needs them)."""
        assert self.identity is not None
        user = self.identity.user
        counted = self.relay.user_documents.get(user)
        if counted is None:
            stored = await self.relay.documents.documents(user)
            counted = self.relay.user_documents.setdefault(user, UserDocuments())
            counted.stored(stored)
        if with_index and not counted.index_read:
            listed: frozenset[str] = frozenset()  # an index never stored lists nothing
            if counted.stores(INDEX_DOCUMENT_ID):
                index = await self.relay.read_document(user, INDEX_DOCUMENT_ID)
                listed, _ = listed_documents(index)
            counted.read_index(listed)
        return counted

    def _counts_toward_limit(self, doc: str) -> bool:
        """Whether ``doc`` counts toward the user's document limit (and its updates are held
        to it)."""
        assert self.identity is not None
        # Not without the sync scope (refused anyway, by the authorization that follows), nor
        # for another user's document shared with this one (it counts as theirs).
        return "sync" in self.identity.scopes and "/" not in doc

    async def _over_document_limit(self, doc: str, seq: int) -> bool:
        """Whether an Update of ``doc`` would store one document more than the user may have
        (``max_documents_per_user``: stored or listed in the index); if so it is refused, for
        that document and seq only."""
        if not self._counts_toward_limit(doc):
            return False
        counted = await self._counted_documents(with_index=False)
        if doc in counted:
            return False
        counted = await self._counted_documents(with_index=True)
        limit = self.relay.config.max_documents_per_user
        if counted.admits(doc, limit):
            return False
        self._counters.updates_refused[ErrorCode.TOO_MANY_DOCUMENTS] += 1
        self._refuse(
            ErrorCode.TOO_MANY_DOCUMENTS,
            f"the relay keeps at most {limit} documents per user; delete some to make room",
            doc,
            seq,
        )
        return True

    # -- prices ------------------------------------------------------------------------------

    def _valid_symbols(self, symbols: tuple[str, ...]) -> list[str]:
        """The frame's valid symbols, canonical and each once. The invalid ones are told in ONE
        Error (``doc``: the first as sent), however many there are: an Error per symbol made a
        Subscribe of 2,000 bad symbols cost the relay thirty times the bytes it cost its sender,
        and delayed everyone else's frames behind them."""
        valid: dict[str, None] = {}
        invalid: list[str] = []
        for symbol in symbols:
            try:
                valid.setdefault(normalize_symbol(symbol), None)
            except ValidationError:
                invalid.append(symbol)
        if invalid:
            self._send(
                self.session.error(
                    ErrorCode.INVALID_SYMBOL, _invalid_symbols(invalid), doc=invalid[0][:64]
                )
            )
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
        # The first refusals only, each reason shortened: a batch of 10,000 tiny bad ticks would
        # otherwise be answered with several times its own size. The sender knows how many were
        # refused (len(ticks) - accepted).
        listed = tuple((index, reason[:_REASON_CHARS]) for index, reason in bad[:_LISTED_TICKS])
        self._send(self.session.send(Published(event.batch, len(good), listed)))

    def _deliver(self, change: Change) -> bool:
        """A stored change of one of the user's documents: sent on if this connection synced
        that document, and did not make the change itself (a sender is never echoed). Whether
        it synced the document (what makes a fan-out wide)."""
        if change.doc_id not in self._synced_docs:
            return False
        # Held with its origin among the receivers: the held flush never echoes a change, and
        # the origin must get the changes appended after its own (see Relay._fan).
        if change.wire and self.relay.hold_change(self, change):
            return True
        if change.origin == self.id:
            return True
        if self._direct and change.wire:  # the fan-out's hot path: one flag, one append
            if not self._flush_due:
                self.relay._flush_soon(self)
            self._wire.append(change.wire)
            self._wire_bytes += len(change.wire)
            self._sent_frames[_UPDATE_CODE] += 1
            self._sent_bytes[_UPDATE_CODE] += len(change.frame)
            if self._wire_bytes >= _DIRECT_WRITE_LIMIT:
                self._flush_wire()
            return True
        if self.session.closed or self._closing:
            return True
        frame = change.frame or encode_frame(
            Update(change.doc_id, 0, change.update, change.changed_at, change.changed_by)
        )
        self._send(frame, change.wire)
        return True

    def _send_held(self, changes: list[Change]) -> None:
        """The held flush: ``changes`` (one merged change, mostly) written out now, with what
        else this connection's buffer holds; through the queue if the socket fell behind since
        they were held."""
        for change in changes:
            if change.doc_id not in self._synced_docs:
                return
            if self._direct:
                self._wire.append(change.wire)
                self._wire_bytes += len(change.wire)
                self._sent_frames[_UPDATE_CODE] += 1
                self._sent_bytes[_UPDATE_CODE] += len(change.frame)
            elif not (self.session.closed or self._closing):
                self._send(change.frame, change.wire)
        self._flush_wire()

    def _deliver_shared(self, change: Change) -> None:
        """A stored change of a document another user owns: sent on, under its ``owner/id``, if
        this connection synced it and its share was not revoked since."""
        wire_id = shared_id(change.user, change.doc_id)
        if (
            change.origin == self.id
            or wire_id not in self._synced_docs
            or self.session.closed
            or self._closing
        ):
            return
        self._send(
            encode_frame(Update(wire_id, 0, change.update, change.changed_at, change.changed_by))
        )

    # -- sharing and revocation (called by the Relay) -----------------------------------------

    def _live_user(self, user: str) -> bool:
        identity = self.identity
        return (
            identity is not None
            and identity.user == user
            and "sync" in identity.scopes
            and not self.session.closed
            and not self._closing
        )

    def tell_shared(self, grantee: str, wire_id: str, message: str) -> bool:
        """A document was shared with this connection's user: a non-fatal notice naming it (a
        device then syncs it as it syncs a document the Welcome lists). Whether it was told."""
        if not self._live_user(grantee):
            return False
        self._send(self.session.error(SHARED, message, doc=wire_id))
        return True

    def revoke_document(self, grantee: str, wire_id: str) -> bool:
        """The share of ``wire_id`` with this connection's user ended: told once (``revoked``),
        then none of its changes, and its Updates refused. Whether it was synced here."""
        if not self._live_user(grantee) or wire_id not in self._synced_docs:
            return False
        self._synced_docs.discard(wire_id)
        self._revoked.add(wire_id)
        self._send(self.session.error(REVOKED, "the owner revoked this share", doc=wire_id))
        return True

    def synced_shared_documents(self) -> list[str]:
        """The ``OWNER/id`` documents of other users this connection synced (and still gets)."""
        return [doc for doc in self._synced_docs if "/" in doc]

    def end_if_revoked(self, revocation: Revocation) -> bool:
        """A fatal ``auth_failed`` and a close if this connection's token is revoked."""
        identity = self.identity
        if (
            identity is None
            or self.session.closed
            or self._closing
            or not revocation.covers(
                identity.user, identity.device, identity.token_id, identity.issued_at
            )
        ):
            return False
        self._send(self.session.error(ErrorCode.AUTH_FAILED, "token revoked"))
        asyncio.get_running_loop().create_task(self._close_after_flush(), context=self._log_ctx)
        return True

    async def _close_after_flush(self, code: int = 1000, message: bytes = b"token revoked") -> None:
        """Close once what is queued (the fatal Error above all) has gone, or after a second:
        for an end decided outside the read loop, which may be waiting for a frame."""
        deadline = time.monotonic() + 1.0
        while (self.outbound or self._wire) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.close(code=code, message=message)


RelayKey = web.AppKey("relay", Relay)

_ABUSE: dict[str, str] = {  # the fatal codes that end a connection for its abuse, as logged
    ErrorCode.RATE_LIMITED: "over the message rate",
    ErrorCode.TOO_MANY_REFUSALS: "too many of its frames refused",
}

_LISTED_SYMBOLS = 10  # invalid symbols quoted in the one Error that refuses them
_LISTED_TICKS = 100  # refused ticks listed in a Published
_REASON_CHARS = 80  # characters of each listed tick's reason


class _Following:
    """A connection's place among its user's followers (:meth:`Relay.follow`)."""

    __slots__ = ("_connection", "_relay", "_user")

    def __init__(self, relay: Relay, user: str, connection: Connection) -> None:
        self._relay, self._user, self._connection = relay, user, connection

    def close(self) -> None:
        self._relay._unfollow(self._user, self._connection)


def _invalid_symbols(invalid: Sequence[str]) -> str:
    """The message of the Error refusing ``invalid``: how many, and the first few, shortened
    (the session cuts it to 200 characters anyway)."""
    shown = ", ".join(repr(symbol[:16]) for symbol in invalid[:_LISTED_SYMBOLS])
    more = f" and {len(invalid) - _LISTED_SYMBOLS} more" if len(invalid) > _LISTED_SYMBOLS else ""
    noun = "symbol" if len(invalid) == 1 else "symbols"
    return f"{len(invalid)} invalid {noun}: {shown}{more}"


def connection_request(request: web.Request) -> ConnectionRequest:
    """What extensions see of an HTTP request or a WebSocket upgrade before authentication."""
    return ConnectionRequest(remote=request.remote, headers=request.headers, path=request.path)


_DIRECT_WRITE_LIMIT = 64 << 10  # above this many unsent bytes, frames wait for the writer
_UPDATE_CODE = FRAME_CODES["update"]
_PRICE_BATCH_CODE = FRAME_CODES["price_batch"]
_CLOSE_TIMEOUT = 2.0  # seconds a closing peer has to take what is left and the close frame
_SHUTDOWN_TIMEOUT = 15.0  # seconds the relay's own connections have to end when it stops
# Bytes past max_frame_size that a message may have and still be read, so that the session's
# own check answers it with a clear too_large; a larger one the WebSocket layer refuses (1009).
_MESSAGE_SLACK = 1024
_FLUSH_CONTEXT = contextvars.Context()  # the flush's log lines are no one connection's
_WIDE_FANOUT = 64  # connections written to in one flush from which fanned-out changes wait
_FAIR_TURN_S = 0.002  # a connection's frames hold the loop this long at most before it yields


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


async def _open_store(config: RelayConfig) -> RelayStore:
    """SQLite in the data directory, or PostgreSQL at ``config.store_url`` (shared)."""
    if not config.store_url:
        return await SQLiteRelayStore.open(
            config.data_dir / "relay.db", durability=config.durability
        )
    try:
        from foliosync.server.postgres_store import PostgresRelayStore
    except ImportError as exc:
        raise ConfigError(
            f"a PostgreSQL store needs pip install 'foliosync[scale]' ({exc})"
        ) from exc
    return await PostgresRelayStore.open(config.store_url, min_size=1, max_size=config.store_pool)


async def _open_shares(config: RelayConfig) -> ShareStore:
    """Shares and revocations beside the documents: ``shares.db`` in the data directory, or the
    same PostgreSQL database as the documents, so that every relay of a group reads the same."""
    if not config.store_url:
        return await SQLiteShareStore.open(config.data_dir / "shares.db")
    from foliosync.server.sharing_pg import PostgresShareStore

    return await PostgresShareStore.open(config.store_url)


def _redis_fanout(config: RelayConfig, relay: Callable[[], Relay], store_id: str = "") -> FanOut:
    """The shared bus of a relay group: a peer's change goes into this relay's hot copy only
    (it is stored already), and a relay that may have missed changes reloads its hot documents
    from the shared store and sends its devices what they lack."""
    try:
        from foliosync.server.redis_fanout import RedisFanOut
    except ImportError as exc:
        raise ConfigError(f"a Redis fan-out needs pip install 'foliosync[scale]' ({exc})") from exc
    from foliosync.server.storage import Watermark

    def on_peer_change(change: Change) -> None:
        relay().documents.apply_peer(
            change.user,
            change.doc_id,
            change.update,
            Watermark(change.changed_at, change.changed_by),
        )

    async def on_missed() -> None:
        # Control events may be missing too: the connections are checked against the share
        # store first, so that what the reload sends reaches no revoked grantee.
        try:
            await relay().recheck_connections()
        except RelayStoreError as exc:
            log.error("re-checking the open connections' shares and tokens failed: %s", exc)
        for user, doc_id, diff, watermark in await relay().documents.reload_hot():
            bus.deliver_local(
                Change(
                    user,
                    doc_id,
                    diff,
                    watermark.changed_at or 0,
                    watermark.changed_by or "",
                    origin="",
                    relay=config.relay_id,
                )
            )

    bus = RedisFanOut(
        config.redis_url or "",
        relay_id=config.relay_id,
        prefix=config.redis_prefix,
        on_peer_change=on_peer_change,
        on_missed=on_missed,
        store_id=store_id,
    )
    return bus


async def _redis_prices(config: RelayConfig, relay: Relay) -> Any:
    """Prices across the relays of a group: this relay's accepted ticks go to the channel, the
    peers' into this relay's hub (not forwarded again)."""
    from foliosync.server.redis_prices import RedisPriceBus

    hub = relay.prices

    def on_peer_ticks(ticks: list[Tick]) -> None:
        hub.publish_peer(ticks)

    prices_bus = RedisPriceBus(
        config.redis_url or "",
        relay_id=config.relay_id,
        prefix=config.redis_prefix,
        on_peer_ticks=on_peer_ticks,
    )
    hub.forward = prices_bus.publish
    await prices_bus.start()
    return prices_bus


def create_app(
    config: RelayConfig,
    *,
    extensions: Sequence[Extension] | None = None,
    store: RelayStore | None = None,
    fanout: FanOut | None = None,
    price_policy: PricePolicy | None = None,
    shares: ShareStore | None = None,
) -> web.Application:
    """The relay as an aiohttp application (store and fan-out default to SQLite, in-process).

    ``extensions`` replace :func:`~foliosync.server.extensions.default_extensions` (token
    authentication, owner authorization, schema validation); build on them with
    ``[*default_extensions(secret), MyRule()]``. A list with no ``authenticate`` is a
    ConfigError here, not an open relay. ``price_policy`` sets how prices are pushed
    (benchmarks fix the window; the default follows the smart-refresh policy).

    Serve it with :class:`~foliosync.server.http_errors.JsonErrorAppRunner` (as
    :func:`foliosync.server.serve.serve` does), so that even a request aiohttp's parser refuses is
    answered in the relay's JSON error shape.

    With the default store, the data directory is locked (:class:`DataDirLock`) from start-up to
    cleanup: starting a second relay on it raises :class:`DataDirLocked` from the runner's
    ``setup()``, and ``restore_store`` is refused while this one runs."""
    if extensions is not None:
        extensions = list(extensions)
        HookRunner(extensions, config.hook_timeout)  # refused now rather than at start-up
    app = web.Application(middlewares=[json_errors, bearer_authentication])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # The default store's directory is this relay's for as long as it runs, however the
        # relay is embedded: a second relay on it, or a restore under it, is refused.
        lock = DataDirLock(config.data_dir) if store is None and not config.store_url else None
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
        relay_store = store or await _open_store(config)
        bus: Any = None
        try:
            share_store = shares or await _open_shares(config)
        except BaseException:
            await relay_store.close()
            raise
        try:
            if fanout is None and config.redis_url:
                # A store that names itself (PostgreSQL) binds the group's Redis keys to it.
                store_id = str(getattr(relay_store, "store_id", "") or "")
                bus = _redis_fanout(config, lambda: relay, store_id)
            relay = Relay(
                config,
                relay_store,
                fanout or bus or InProcessFanOut(),
                secret,
                extensions=extensions,
                price_policy=price_policy,
                shares=share_store,
            )
        except BaseException:
            await relay_store.close()
            await share_store.close()
            raise
        app[RelayKey] = relay
        app[HookRunnerKey] = relay.hooks
        # Five coroutine frames fewer per open connection (see DirectGetKey).
        direct: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "/ws": relay.handle_ws
        }
        app[DirectGetKey] = direct
        app[WebSocketFrontKey] = WebSocketFront(
            paths=frozenset(("/ws",)),
            take=relay.take_websocket,
            max_size=config.max_frame_size + _MESSAGE_SLACK,
            heartbeat=config.heartbeat or None,
        )
        relay.prices.start()
        prices_bus: Any = None
        try:
            if bus is not None:
                await bus.start()  # after the Relay exists: its hooks use relay.documents
                prices_bus = await _redis_prices(config, relay)
            metrics_runner = await _serve_metrics(relay)
        except BaseException:
            if prices_bus is not None:
                await prices_bus.close()
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
        scratches = asyncio.get_running_loop().create_task(
            drop_idle_scratches_every(relay.documents)
        )
        release_collector = (
            collect_young_every(config.gc_young_threshold) if config.gc_young_threshold else None
        )
        yield
        if release_collector is not None:
            release_collector()
        scratches.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scratches
        if trimming is not None:
            trimming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimming
        if feed is not None:
            await feed.close()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if prices_bus is not None:
            relay.prices.forward = None
            await prices_bus.close()
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
    add_share_routes(app)
    add_cors(app, config.cors_origins)
    return app
