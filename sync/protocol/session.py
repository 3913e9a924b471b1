"""The two ends of a connection as pure state machines: bytes in, events out; frames in, bytes out.

A session owns no socket and no clock, so the relay and the client wrap it in whatever I/O they
use and tests drive it synchronously. It knows who may send what and when; the shells decide what
the frames mean (verify tokens, store updates, apply deltas).

One WebSocket message is one frame, so :meth:`receive_data` takes one whole message and returns
the events it produced (today always exactly one; a list so that a later version may produce more
without changing the API). Its failures are uniform: whenever the peer broke the protocol,
including a Hello of an unsupported version, it raises :class:`RemoteProtocolError`, the session is
then CLOSED and :attr:`error_reply` holds the Error frame to send before closing the socket::

    try:
        events = session.receive_data(message)
    except RemoteProtocolError:
        await ws.send_bytes(session.error_reply)
        await ws.close()

Our own misuse (sending a document frame before the handshake, anything after CLOSED) raises
:class:`LocalProtocolError` and changes nothing.

Both ends enforce the two ordering rules of a client's Updates (``PROTOCOL.md``, "Sequence
rules"): on one connection, a document's Updates come after its SyncRequest (``not_synced``), and
their seqs strictly increase (``bad_seq``). Broken by the client, either is fatal: an Ack settles
every earlier seq of its document, so a refused Update followed by any later Ack would tell the
client that something the relay never stored is safe. Closing instead costs a reconnect, whose
state-vector sync repairs whatever was in flight. A session never sends a frame larger than its
``max_send_size`` (by default its own ``max_frame_size``: a peer with the same limit would refuse
it). The two differ where the peers' limits do: the relay accepts small client frames but sends
whole documents to clients, which accept large ones.

The relay's session also meters the client: given a :class:`MessageRate`, every message spends
tokens of a :class:`TokenBucket` (one, and one more per hundred symbols or ticks it carries, as
those cost the relay a reply of that size), and a client that stays over the rate past the
bucket's grace gets a fatal ``rate_limited``. The shell passes its clock in
(``receive_data(data, now=loop.time())``), so the limit is tested without sleeping.

Given a :class:`RefusalLimit`, it also counts the per-document Errors it sends (the relay's
refusals), weighted by :func:`refusal_weight`, and once more than the limit's count fall within
its window, the client's next frame gets a fatal ``too_many_refusals`` instead of being handled:
a client that sends nothing but refused frames would otherwise stay connected for as long as it
keeps within the message rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from types import MappingProxyType

from foliosync.sync.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from foliosync.sync.protocol.document_sync import DocumentSync
from foliosync.sync.protocol.events import (
    Acked,
    ClientEvent,
    ErrorReceived,
    HelloReceived,
    PingReceived,
    PongReceived,
    PricesReceived,
    PublishedReceived,
    PublishReceived,
    ResyncRequested,
    ServerEvent,
    SubscribeRequested,
    SyncReplied,
    SyncRequested,
    UpdateReceived,
    Welcomed,
)
from foliosync.sync.protocol.frames import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Ping,
    Pong,
    PriceBatch,
    PriceSnapshot,
    Publish,
    Published,
    Resync,
    Subscribe,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    decode_frame,
    encode_frame,
    encode_price_frame,
)
from foliosync.sync.protocol.limits import (
    DEFAULT_MAX_DOCUMENTS,
    DEFAULT_MAX_FRAME_SIZE,
    MessageRate,
    RefusalLimit,
    RefusalWindow,
    TokenBucket,
)

__all__ = ["ClientSession", "ClientState", "ServerSession", "ServerState", "refusal_weight"]

_MAX_REPLY_MESSAGE = 200
"""Characters of an exception message echoed in an error reply: enough to debug, and a hostile
frame cannot make the reply large (messages may quote what the peer sent)."""


class ServerState(Enum):
    """Where the relay's end of a connection is."""

    AWAITING_HELLO = "awaiting_hello"
    """Nothing received yet; only a Hello is acceptable."""
    AUTHENTICATING = "authenticating"
    """A Hello arrived; the shell is checking its token and will call accept() or reject()."""
    READY = "ready"
    """Welcome sent; document frames flow both ways."""
    CLOSED = "closed"
    """Done: after a fatal error either way, reject(), or close()."""


class ClientState(Enum):
    """Where the client's end of a connection is."""

    IDLE = "idle"
    """Connected, Hello not sent yet."""
    AWAITING_WELCOME = "awaiting_welcome"
    """Hello sent; waiting for the relay's Welcome (or its refusal)."""
    READY = "ready"
    """Welcome received; document frames flow both ways."""
    CLOSED = "closed"
    """Done: after a fatal error either way, or close()."""


# What one refusal weighs in a RefusalLimit's count (any other code weighs 1: the change itself
# is at fault, by the relay's checks or an extension's rule, and a device that rolls it back never
# sends it again).
_NOT_COUNTED = frozenset(
    {
        ErrorCode.EXTENSION_FAILED,  # the relay's own failure: the change is not at fault
        ErrorCode.INTERNAL,
        "shared",  # a notice (foliosync.server.sharing), not an answer to anything
    }
)
_PER_DOCUMENT = frozenset(
    {
        # Whatever the change: every change of the document is refused alike, so a device gets
        # one per change it had in flight (an offline import into a document past the user's
        # limit: thousands at once), cheap refusals, bounded by the message rate.
        ErrorCode.TOO_MANY_DOCUMENTS,
        ErrorCode.FORBIDDEN,
        ErrorCode.NOT_FOUND,
        ErrorCode.AUTH_FAILED,
        "read_only",
        "revoked",
        # The relay's copy lacks what the changes build on (restored from a backup): every
        # change in flight after the first one missing is refused too, then the device resyncs.
        ErrorCode.MISSING_DEPENDENCIES,
    }
)
_PER_DOCUMENT_WEIGHT = 0.01


def refusal_weight(code: str, seq: int | None) -> float:
    """What a per-document Error of ``code`` weighs in a :class:`RefusalLimit`'s count.

    1 for a change at fault (``bad_update``, ``invalid_document``, ``refused``, an extension's
    own code...), which a device that follows the protocol rolls back and never sends again;
    1/100 for a refusal of the document as a whole, which a device gets once per change it had
    in flight; 0 for the relay's own failures and for notices (``shared``, and ``revoked``
    without a seq: the relay tells of it unasked)."""
    if code in _NOT_COUNTED or (code == "revoked" and seq is None):
        return 0.0
    if code in _PER_DOCUMENT:
        return _PER_DOCUMENT_WEIGHT
    return 1.0


def _violation(message: str, code: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=code)


def _error_event(frame: Error) -> ErrorReceived:
    return ErrorReceived(frame.code, frame.message, frame.doc, frame.seq, frame.fatal)


_RELAY_FRAMES = (Welcome, SyncReply, Ack, PriceSnapshot, PriceBatch, Published)
_CLIENT_FRAMES = (Hello, SyncRequest, Subscribe, Resync, Publish)


class _Session:
    """What both ends share: decoding with a size limit, the error reply, the closed state."""

    __slots__ = ("_closed", "_error_reply", "_max_frame_size", "_max_send_size")

    def __init__(self, max_frame_size: int, max_send_size: int | None = None) -> None:
        for name, value in (("max_frame_size", max_frame_size), ("max_send_size", max_send_size)):
            if value is None and name == "max_send_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, not {value!r}")
        self._max_frame_size = max_frame_size
        self._max_send_size = max_send_size if max_send_size is not None else max_frame_size
        self._error_reply: bytes | None = None
        self._closed = False

    @property
    def max_frame_size(self) -> int:
        """Largest message accepted, in bytes."""
        return self._max_frame_size

    @property
    def max_send_size(self) -> int:
        """Largest message sent, in bytes."""
        return self._max_send_size

    @property
    def error_reply(self) -> bytes | None:
        """The Error frame to send before closing, once :meth:`receive_data` raised
        :class:`RemoteProtocolError`; None before that."""
        return self._error_reply

    @property
    def closed(self) -> bool:
        """Whether the conversation is over (nothing may be sent or received any more)."""
        return self._closed

    def close(self) -> None:
        """Mark the conversation over, e.g. when the socket closed. Idempotent."""
        self._closed = True

    def _decode(self, data: bytes) -> Frame:
        if self._closed:
            raise LocalProtocolError("the session is closed; stop reading from the socket")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise LocalProtocolError(f"receive_data() takes bytes, not {type(data).__name__}")
        return decode_frame(data, max_frame_size=self._max_frame_size)

    def _fail(self, exc: RemoteProtocolError) -> None:
        message = str(exc)
        if len(message) > _MAX_REPLY_MESSAGE:
            message = message[: _MAX_REPLY_MESSAGE - 1] + "…"
        self._closed = True
        self._error_reply = encode_frame(Error(exc.code, message))

    def _encode(self, frame: Frame) -> bytes:
        if self._closed:
            raise LocalProtocolError(f"the session is closed; cannot send {type(frame).__name__}")
        data = encode_frame(frame)
        if len(data) > self._max_send_size:
            raise LocalProtocolError(
                f"{type(frame).__name__} of {len(data)} bytes exceeds the frame limit of "
                f"{self._max_send_size}",
                code=ErrorCode.TOO_LARGE,
            )
        return data


class ServerSession(_Session):
    """The relay's end of one client connection."""

    __slots__ = (
        "_bucket",
        "_last_received",
        "_max_documents",
        "_received_seqs",
        "_refusals",
        "_state",
        "_supported",
        "_synced",
        "protocol",
    )

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_send_size: int | None = None,
        supported_protocols: frozenset[int] = frozenset({PROTOCOL_VERSION}),
        max_documents: int = DEFAULT_MAX_DOCUMENTS,
        message_rate: MessageRate | None = None,
        refusal_limit: RefusalLimit | None = None,
    ) -> None:
        super().__init__(max_frame_size, max_send_size)
        if message_rate is not None and not isinstance(message_rate, MessageRate):
            raise ConfigError(f"message_rate must be a MessageRate, not {message_rate!r}")
        if refusal_limit is not None and not isinstance(refusal_limit, RefusalLimit):
            raise ConfigError(f"refusal_limit must be a RefusalLimit, not {refusal_limit!r}")
        self._bucket = TokenBucket(message_rate) if message_rate is not None else None
        self._refusals = RefusalWindow(refusal_limit) if refusal_limit is not None else None
        # When the last frame was received: the time of the refusals sent in answer to it.
        self._last_received: float | None = None
        if not supported_protocols:
            raise ConfigError("supported_protocols must not be empty")
        if isinstance(max_documents, bool) or not isinstance(max_documents, int):
            raise ConfigError(f"max_documents must be an int, not {max_documents!r}")
        if max_documents < 1:
            raise ConfigError(f"max_documents must be at least 1, not {max_documents}")
        self._max_documents = max_documents
        self._supported = frozenset(supported_protocols)
        self._state = ServerState.AWAITING_HELLO
        # Highest seq received per document, so that the relay cannot ack an update it never got
        # and refuses a seq that does not increase.
        self._received_seqs: dict[str, int] = {}
        # Documents with a SyncRequest on this connection: only those may get Updates.
        self._synced: set[str] = set()
        self.protocol: int | None = None
        """The version agreed in the handshake, once a supported Hello arrived."""

    @property
    def state(self) -> ServerState:
        """Where the conversation is."""
        return ServerState.CLOSED if self._closed else self._state

    # --- Receiving ----------------------------------------------------------------------------

    @property
    def message_rate(self) -> MessageRate | None:
        """The rate this session holds the client to (None: unmetered)."""
        return None if self._bucket is None else self._bucket.limit

    @property
    def tokens(self) -> float | None:
        """What is left of the client's message bucket (negative: in debt); None: unmetered."""
        return None if self._bucket is None else self._bucket.tokens

    @property
    def refusal_limit(self) -> RefusalLimit | None:
        """The refusals this session allows the client (None: not counted)."""
        return None if self._refusals is None else self._refusals.limit

    def refusals(self, now: float) -> float | None:
        """The weight of the refusals counted at ``now``; None: not counted."""
        return None if self._refusals is None else self._refusals.weight(now)

    def receive_data(self, data: bytes, now: float | None = None) -> list[ServerEvent]:
        """The events of one WebSocket binary message from the client, received at ``now`` (a
        monotonic clock in seconds; needed when the session meters a :class:`MessageRate`).

        Raises :class:`RemoteProtocolError` if the client broke the protocol, ``rate_limited``
        and ``too_many_refusals`` included; the session is then closed and :attr:`error_reply`
        holds the bytes to send before closing the socket.
        """
        try:
            frame = self._decode(data)
            if self._bucket is not None or self._refusals is not None:
                if now is None:
                    raise LocalProtocolError("a metered session needs the time: receive_data(now=)")
                self._last_received = now
                if self._bucket is not None:
                    self._meter(frame, now)
                if self._refusals is not None and self._refusals.exceeded(now):
                    limit = self._refusals.limit
                    raise _violation(
                        f"more than {limit.count} of this connection's frames refused within "
                        f"{limit.window:g} s; stop resending what the relay refuses",
                        ErrorCode.TOO_MANY_REFUSALS,
                    )
            return [self._receive(frame)]
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _meter(self, frame: Frame, now: float) -> None:
        assert self._bucket is not None
        cost = 1
        if isinstance(frame, Subscribe | Resync):
            cost += len(frame.symbols) // 100
        elif isinstance(frame, Publish):
            cost += len(frame.ticks) // 100
        if not self._bucket.take(cost, now):
            limit = self._bucket.limit
            raise _violation(
                f"more than {limit.rate:g} messages a second (burst {limit.burst}) for over "
                f"{limit.grace:g} s; slow down",
                ErrorCode.RATE_LIMITED,
            )

    def _receive(self, frame: Frame) -> ServerEvent:
        state = self._state
        if isinstance(frame, Error) and frame.fatal:
            self._closed = True
            return _error_event(frame)
        if isinstance(frame, _RELAY_FRAMES):
            raise _violation(
                f"{type(frame).__name__} is a relay frame; a client cannot send it",
                ErrorCode.UNEXPECTED_FRAME,
            )
        if isinstance(frame, Hello):
            if state is not ServerState.AWAITING_HELLO:
                raise _violation("a second Hello", ErrorCode.UNEXPECTED_FRAME)
            if frame.protocol not in self._supported:
                spoken = ", ".join(str(version) for version in sorted(self._supported))
                raise _violation(
                    f"relay speaks protocol {spoken}, client sent {frame.protocol}",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            self.protocol = frame.protocol
            self._state = ServerState.AUTHENTICATING
            return HelloReceived(frame.protocol, frame.token, frame.client_name)
        if state is not ServerState.READY:
            raise _violation(
                f"{type(frame).__name__} before the handshake completed",
                ErrorCode.NOT_AUTHENTICATED,
            )
        match frame:
            case SyncRequest(doc, state_vector):
                if doc not in self._synced and len(self._synced) >= self._max_documents:
                    raise _violation(
                        f"SyncRequest of a document past this connection's limit of "
                        f"{self._max_documents} documents",
                        ErrorCode.TOO_MANY_DOCUMENTS,
                    )
                self._synced.add(doc)
                return SyncRequested(doc, state_vector)
            case Update(doc, seq, update, changed_at_ms, changed_by):
                if seq == 0:
                    raise _violation("an Update from a client needs a seq > 0", ErrorCode.BAD_FRAME)
                if changed_at_ms is not None:
                    raise _violation(
                        "an Update from a client cannot carry a watermark; the relay sets it",
                        ErrorCode.BAD_FRAME,
                    )
                if doc not in self._synced:
                    raise _violation(
                        f"Update of {doc!r} before its SyncRequest on this connection",
                        ErrorCode.NOT_SYNCED,
                    )
                last = self._received_seqs.get(doc, 0)
                if seq <= last:
                    raise _violation(
                        f"Update seq {seq} of {doc!r} after seq {last}: seqs must increase",
                        ErrorCode.BAD_SEQ,
                    )
                self._received_seqs[doc] = seq
                return UpdateReceived(doc, seq, update, changed_at_ms, changed_by)
            case Ping(nonce):
                return PingReceived(nonce)
            case Pong(nonce):
                return PongReceived(nonce)
            case Error():
                return _error_event(frame)
            case Subscribe(symbols):
                return SubscribeRequested(symbols)
            case Resync(symbols):
                return ResyncRequested(symbols)
            case Publish(batch, ticks):
                return PublishReceived(batch, ticks)
        raise AssertionError(f"unhandled frame {frame!r}")  # pragma: no cover

    # --- Sending ------------------------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """The bytes of ``frame``, if the relay may send it now; otherwise LocalProtocolError."""
        state = self.state
        name = type(frame).__name__
        if isinstance(frame, _CLIENT_FRAMES):
            raise LocalProtocolError(f"{name} is a client frame; the relay cannot send it")
        if isinstance(frame, Error) and frame.fatal:
            data = self._encode(frame)
            self._closed = True
            return data
        if isinstance(frame, Welcome):
            if state is not ServerState.AUTHENTICATING:
                raise LocalProtocolError(f"Welcome needs a Hello first (state {state.value})")
            if frame.protocol != self.protocol:
                raise LocalProtocolError(
                    f"Welcome for protocol {frame.protocol}, but the client asked for "
                    f"{self.protocol}"
                )
            data = self._encode(frame)
            self._state = ServerState.READY
            return data
        if state is not ServerState.READY:
            raise LocalProtocolError(f"{name} before the handshake completed (state {state.value})")
        if isinstance(frame, Update) and (frame.seq != 0 or frame.changed_at_ms is None):
            raise LocalProtocolError("an Update from the relay has seq 0 and a watermark")
        if isinstance(frame, Ack) and not 0 < frame.seq <= self._received_seqs.get(frame.doc, 0):
            raise LocalProtocolError(
                f"Ack of seq {frame.seq} of {frame.doc!r}, which this connection never received"
            )
        data = self._encode(frame)
        # A refusal answers a frame: it is counted at the time that frame was received.
        received = self._last_received
        if isinstance(frame, Error) and self._refusals is not None and received is not None:
            self._refusals.add(refusal_weight(frame.code, frame.seq), received)
        return data

    def prices(self, packed_ticks: Sequence[bytes], *, snapshot: bool = False) -> bytes:
        """A PriceBatch (or PriceSnapshot) of ticks packed once by ``pack_price_tick``."""
        if self.state is not ServerState.READY:
            raise LocalProtocolError(f"prices before the handshake completed ({self.state.value})")
        data = encode_price_frame(snapshot, packed_ticks)
        if len(data) > self._max_send_size:
            raise LocalProtocolError(
                f"a price frame of {len(data)} bytes exceeds {self._max_send_size}",
                code=ErrorCode.TOO_LARGE,
            )
        return data

    def accept(
        self, user: str, device: str, documents: Iterable[str], server_time_ms: int
    ) -> bytes:
        """The Welcome that completes the handshake, after the shell verified the Hello's token."""
        if self.protocol is None:
            raise LocalProtocolError(f"accept() needs a Hello first (state {self.state.value})")
        return self.send(Welcome(self.protocol, user, device, server_time_ms, tuple(documents)))

    def reject(self, code: str = ErrorCode.AUTH_FAILED, message: str = "") -> bytes:
        """The fatal Error that refuses the Hello (e.g. a bad token); the session is then closed."""
        if self.state not in (ServerState.AWAITING_HELLO, ServerState.AUTHENTICATING):
            raise LocalProtocolError(f"reject() is for the handshake (state {self.state.value})")
        return self.send(Error(code, message))

    def sync_reply(
        self,
        doc: str,
        update: bytes,
        state_vector: bytes,
        changed_at_ms: int | None = None,
        changed_by: str | None = None,
    ) -> bytes:
        """Answer to a SyncRequest; the watermark is None for a document the relay never saw."""
        return self.send(SyncReply(doc, update, state_vector, changed_at_ms, changed_by))

    def update(self, doc: str, update: bytes, changed_at_ms: int, changed_by: str) -> bytes:
        """Fan out another device's change (seq 0) with the document's new watermark."""
        return self.send(Update(doc, 0, update, changed_at_ms, changed_by))

    def ack(self, doc: str, seq: int) -> bytes:
        """Acknowledge that update ``seq`` of ``doc`` (and every earlier one) is durably stored."""
        return self.send(Ack(doc, seq))

    def error(
        self, code: str, message: str, doc: str | None = None, seq: int | None = None
    ) -> bytes:
        """An Error; without ``doc`` it is fatal and the session is then closed."""
        return self.send(Error(code, message, doc, seq))

    def ping(self, nonce: int) -> bytes:
        """A Ping the client answers with a Pong of the same nonce."""
        return self.send(Ping(nonce))

    def pong(self, nonce: int) -> bytes:
        """The answer to a Ping."""
        return self.send(Pong(nonce))


class ClientSession(_Session):
    """The client's end of its connection to the relay."""

    __slots__ = ("_documents", "_state", "device", "protocol", "user")

    def __init__(
        self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, max_send_size: int | None = None
    ) -> None:
        super().__init__(max_frame_size, max_send_size)
        self._state = ClientState.IDLE
        # What this connection sent of each document (its SyncRequest: only then may Updates
        # follow; the highest seq: an Ack of an update never sent is caught, as acting on it the
        # client would forget an update the relay does not have). The one record of it: the
        # device's sync machine (DeviceSync) reads the same objects.
        self._documents: dict[str, DocumentSync] = {}
        self.protocol: int = PROTOCOL_VERSION
        """The version this client speaks, and that the Welcome must confirm."""
        self.user: str | None = None
        """The user the relay authenticated, once welcomed."""
        self.device: str | None = None
        """This device's id as the relay knows it, once welcomed."""

    @property
    def state(self) -> ClientState:
        """Where the conversation is."""
        return ClientState.CLOSED if self._closed else self._state

    @property
    def documents(self) -> Mapping[str, DocumentSync]:
        """What this connection sent of each document it touched (read-only)."""
        return MappingProxyType(self._documents)

    def document(self, doc: str) -> DocumentSync:
        """The record of ``doc`` on this connection, made on first use."""
        found = self._documents.get(doc)
        if found is None:
            found = self._documents[doc] = DocumentSync(doc)
        return found

    # --- Receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        """The events of one WebSocket binary message from the relay.

        Raises :class:`RemoteProtocolError` if the relay broke the protocol; the session is then
        closed and :attr:`error_reply` holds the bytes to send before closing the socket.
        """
        try:
            return [self._receive(self._decode(data))]
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _receive(self, frame: Frame) -> ClientEvent:
        if isinstance(frame, Error) and frame.fatal:
            self._closed = True
            return _error_event(frame)
        name = type(frame).__name__
        if isinstance(frame, _CLIENT_FRAMES):
            raise _violation(
                f"{name} is a client frame; the relay cannot send it", ErrorCode.UNEXPECTED_FRAME
            )
        if isinstance(frame, Welcome):
            if self._state is not ClientState.AWAITING_WELCOME:
                raise _violation(
                    f"Welcome in state {self._state.value}", ErrorCode.UNEXPECTED_FRAME
                )
            if frame.protocol != self.protocol:
                raise _violation(
                    f"client speaks protocol {self.protocol}, relay welcomed {frame.protocol}",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            self._state = ClientState.READY
            self.user, self.device = frame.user, frame.device
            return Welcomed(
                frame.protocol, frame.user, frame.device, frame.server_time_ms, frame.documents
            )
        if self._state is not ClientState.READY:
            raise _violation(f"{name} before the Welcome", ErrorCode.UNEXPECTED_FRAME)
        match frame:
            case SyncReply(doc, update, state_vector, changed_at_ms, changed_by):
                return SyncReplied(doc, update, state_vector, changed_at_ms, changed_by)
            case Update(doc, seq, update, changed_at_ms, changed_by):
                if seq != 0 or changed_at_ms is None:
                    raise _violation(
                        "an Update from the relay has seq 0 and a watermark", ErrorCode.BAD_FRAME
                    )
                return UpdateReceived(doc, seq, update, changed_at_ms, changed_by)
            case Ack(doc, seq):
                sent = self._documents.get(doc)
                if sent is None or not 0 < seq <= sent.sent_upto:
                    raise _violation(
                        f"Ack of seq {seq} of {doc!r}, which this connection never sent",
                        ErrorCode.UNEXPECTED_FRAME,
                    )
                return Acked(doc, seq)
            case Ping(nonce):
                return PingReceived(nonce)
            case Pong(nonce):
                return PongReceived(nonce)
            case Error():
                return _error_event(frame)
            case PriceSnapshot(ticks):
                return PricesReceived(ticks, snapshot=True)
            case PriceBatch(ticks):
                return PricesReceived(ticks, snapshot=False)
            case Published(batch, accepted, rejected):
                return PublishedReceived(batch, accepted, rejected)
        raise AssertionError(f"unhandled frame {frame!r}")  # pragma: no cover

    # --- Sending ------------------------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """The bytes of ``frame``, if the client may send it now; otherwise LocalProtocolError."""
        state = self.state
        name = type(frame).__name__
        if isinstance(frame, _RELAY_FRAMES):
            raise LocalProtocolError(f"{name} is a relay frame; a client cannot send it")
        if isinstance(frame, Error) and frame.fatal:
            data = self._encode(frame)
            self._closed = True
            return data
        if isinstance(frame, Hello):
            if state is not ClientState.IDLE:
                raise LocalProtocolError(f"Hello is sent once, first (state {state.value})")
            data = self._encode(frame)
            self.protocol = frame.protocol
            self._state = ClientState.AWAITING_WELCOME
            return data
        if state is not ClientState.READY:
            raise LocalProtocolError(f"{name} before the Welcome (state {state.value})")
        if isinstance(frame, Update):
            if frame.seq == 0:
                raise LocalProtocolError("an Update from a client needs a seq > 0")
            if frame.changed_at_ms is not None:
                raise LocalProtocolError("the relay sets the watermark, not the client")
            sent = self._documents.get(frame.doc)
            if sent is None or not sent.requested:
                raise LocalProtocolError(
                    f"Update of {frame.doc!r} before its SyncRequest", code=ErrorCode.NOT_SYNCED
                )
            sent._check_update(frame.seq)
            data = self._encode(frame)
            sent._record_update(frame.seq)
            return data
        data = self._encode(frame)
        if isinstance(frame, SyncRequest):
            self.document(frame.doc)._record_request()
        return data

    def subscribe(self, symbols: Iterable[str]) -> bytes:
        """Follow exactly these symbols (replaces the previous set)."""
        return self.send(Subscribe(tuple(symbols)))

    def resync(self, symbols: Iterable[str]) -> bytes:
        """Ask for a fresh snapshot of these symbols."""
        return self.send(Resync(tuple(symbols)))

    def publish(self, batch: int, ticks: Iterable[object]) -> bytes:
        """Publish ticks ``[symbol, price, time_ms, size?]`` (needs a token with ``publish``)."""
        return self.send(Publish(batch, tuple(ticks)))

    def hello(self, token: str, client_name: str = "") -> bytes:
        """The first frame: our protocol version and the token that says who we are."""
        return self.send(Hello(PROTOCOL_VERSION, token, client_name))

    def sync_request(self, doc: str, state_vector: bytes) -> bytes:
        """Ask for what we lack of ``doc``, given what we have (its state vector)."""
        return self.send(SyncRequest(doc, state_vector))

    def update(self, doc: str, seq: int, update: bytes) -> bytes:
        """Send a local change; ``seq`` comes back in the Ack once the relay stored it.

        Needs a :meth:`sync_request` of ``doc`` first, and a seq above the previous Update's of
        ``doc`` on this connection (a new connection starts afresh, so resending after a
        reconnect is fine); LocalProtocolError otherwise, as the relay would close the
        connection."""
        return self.send(Update(doc, seq, update))

    def error(
        self, code: str, message: str, doc: str | None = None, seq: int | None = None
    ) -> bytes:
        """An Error; without ``doc`` it is fatal and the session is then closed."""
        return self.send(Error(code, message, doc, seq))

    def ping(self, nonce: int) -> bytes:
        """A Ping the relay answers with a Pong of the same nonce."""
        return self.send(Ping(nonce))

    def pong(self, nonce: int) -> bytes:
        """The answer to a Ping."""
        return self.send(Pong(nonce))
