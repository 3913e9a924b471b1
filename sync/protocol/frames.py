"""The frames of protocol version 1 and their msgpack codec.

Every WebSocket binary message carries exactly one frame: a msgpack array ``[type, field, ...]``.
Arrays rather than maps keep the frames small and quick to decode, and a fixed arity per type makes
decoding strict: a frame with a field too many or too few is refused rather than guessed at.

====  ===========  ============  ======================================================
code  frame        direction     fields, in wire order (``?`` = may be nil)
====  ===========  ============  ======================================================
1     Hello        client→relay  protocol, token, client_name
2     Welcome      relay→client  protocol, user, device, server_time_ms, documents
3     Error        both          code, message, doc?, seq?
4     Ping         both          nonce
5     Pong         both          nonce
10    SyncRequest  client→relay  doc, state_vector
11    SyncReply    relay→client  doc, update, state_vector, changed_at_ms?, changed_by?
12    Update       both          doc, seq, update, changed_at_ms?, changed_by?
13    Ack          relay→client  doc, seq
40    Subscribe    client→relay  symbols
41    Resync       client→relay  symbols
42    PriceSnapshot relay→client ticks
43    PriceBatch   relay→client  ticks
44    Publish      client→relay  batch, ticks
45    Published    relay→client  batch, accepted, rejected
====  ===========  ============  ======================================================

An Update from a client has ``seq`` > 0 and no watermark; from the relay ``seq`` is 0 and the
watermark (``changed_at_ms``, ``changed_by``) is set. A watermark is always set or nil as a whole.

Codes 40-59 are the price frames, which share the socket with the documents (the relay's outbound
queue keeps them behind acknowledgements and deltas). ``Subscribe`` replaces the set of symbols the
client follows (the relay answers with a PriceSnapshot of the symbols new to the set); ``Resync``
asks for a fresh snapshot of symbols (after a gap in a symbol's sequence numbers). A price tick on
the wire is ``[symbol, price, time_ms, seq, size?]``: the price and size are decimal text, exact,
and ``seq`` counts the symbol's prices on the relay. A publisher's ``Publish`` carries
``[symbol, price, time_ms, size?]`` items checked one by one by the relay, which answers with
``Published``: how many it took and, for each one refused, ``[index, reason]``. Other codes are
unassigned.

Field types: ids (``doc``, ``user``, ``device``, ``changed_by``, each document of ``documents``)
are non-empty strings of at most :data:`~.limits.MAX_ID_LENGTH` characters; CRDT updates and state
vectors (Yjs V1 encoding) are msgpack bin; times are int milliseconds since the epoch (UTC);
``protocol``, ``seq``, ``nonce`` and times are ints from 0 to :data:`~.limits.MAX_UINT`.

The shape of Hello is frozen for every future protocol version: a relay must be able to read the
version of any client, however new, to answer ``unsupported_version`` instead of ``bad_frame``.

There is no Close frame. A fatal :class:`Error` (one without a ``doc``) ends the conversation and
the sender then closes the WebSocket; an ordinary goodbye is just a WebSocket close. A second way
to say the same thing would only be a second thing for the peers to disagree about.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import ClassVar, TypeAlias

import msgpack

from foliosync.sync.errors import LocalProtocolError, RemoteProtocolError
from foliosync.sync.protocol.limits import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_CODE_LENGTH,
    MAX_ID_LENGTH,
    MAX_UINT,
)

__all__ = [
    "FRAME_CODES",
    "FRAME_NAMES",
    "PROTOCOL_VERSION",
    "RESERVED_PRICE_CODES",
    "Ack",
    "Error",
    "ErrorCode",
    "Frame",
    "Hello",
    "Ping",
    "Pong",
    "PriceBatch",
    "PriceSnapshot",
    "Publish",
    "Published",
    "Resync",
    "Subscribe",
    "SyncReply",
    "SyncRequest",
    "Update",
    "Welcome",
    "decode_frame",
    "encode_frame",
    "encode_price_frame",
    "pack_price_tick",
]

PROTOCOL_VERSION = 1
"""The protocol version this module speaks."""

RESERVED_PRICE_CODES = range(40, 60)
MAX_SYMBOLS = 2000
"""Most symbols in one Subscribe or Resync."""
MAX_TICKS = 10000
"""Most ticks in one frame."""
_MAX_DECIMAL_TEXT = 40
"""Type codes kept free for the price frames, so that adding them breaks no document frame."""


class ErrorCode(StrEnum):
    """The error codes this version sends. Peers must accept codes they do not know: whether an
    error is fatal is told by the frame (no ``doc``), not by the code, so a newer peer can add codes
    without breaking an older one."""

    # Fatal: sent without a doc, then the sender closes the connection.
    AUTH_FAILED = "auth_failed"
    """The token of the Hello was refused."""
    UNSUPPORTED_VERSION = "unsupported_version"
    """The Hello (or the Welcome) named a protocol version the receiver does not speak."""
    BAD_FRAME = "bad_frame"
    """A message that is not a well-formed frame of this version."""
    TOO_LARGE = "too_large"
    """A message over the receiver's ``max_frame_size``."""
    NOT_AUTHENTICATED = "not_authenticated"
    """A document frame before the handshake completed."""
    UNEXPECTED_FRAME = "unexpected_frame"
    """A well-formed frame the receiver may not get in its state or from that side."""
    NOT_SYNCED = "not_synced"
    """An Update of a document before the SyncRequest of that document on this connection."""
    BAD_SEQ = "bad_seq"
    """An Update whose seq is not above the previous Update's of that document on this
    connection (seqs strictly increase per document and connection)."""
    INTERNAL = "internal"
    """The sender failed on its own; the peer did nothing wrong."""
    TOO_MANY_DOCUMENTS = "too_many_documents"
    """A SyncRequest naming one document more than the relay's per-connection limit. With a
    ``doc`` (not fatal): an Update that would store one document more than the relay keeps per
    user; the change is refused for good unless the user deletes documents."""
    TOO_MANY_CONNECTIONS = "too_many_connections"
    """The Hello of one connection more than the relay accepts per user at once: close another
    device's connection, or reconnect later."""
    RATE_LIMITED = "rate_limited"
    """The client sent more messages than the relay's rate allows, for longer than its grace."""
    TOO_MANY_REFUSALS = "too_many_refusals"
    """The relay refused more of the client's frames than its limit allows within its window
    (``RefusalLimit``): the client keeps sending what it was told is refused. Like
    ``rate_limited``, reconnect only after a long backoff."""
    IDLE_TIMEOUT = "idle_timeout"
    """Nothing came from the client (not even a Ping) for the relay's idle timeout."""
    # Per document: sent with the doc (and the seq of the update, if any); the connection stays.
    FORBIDDEN = "forbidden"
    """The user may not read or write that document."""
    NOT_FOUND = "not_found"
    """No such document."""
    BAD_UPDATE = "bad_update"
    """The bytes of an update or state vector are not a valid Yjs V1 encoding (truncated, trailing
    bytes, unknown content). The device rolls the change back."""
    UPDATE_V2 = "update_v2"
    """A Yjs V2 update: the protocol carries V1 (``encodeStateAsUpdate``). Rolled back."""
    MISSING_DEPENDENCIES = "missing_dependencies"
    """The update refers to items the relay has never seen: the device resyncs the document
    (a SyncRequest with its state vector), whose diff carries what was missing."""
    INVALID_DOCUMENT = "invalid_document"
    """The document the update would produce breaks its kind's layout (section 6). Rolled back."""
    REFUSED = "refused"
    """A relay extension refused the update (an app's rule). Rolled back."""
    EXTENSION_FAILED = "extension_failed"
    """A relay extension failed (raised or timed out) on this action: nothing was stored, the
    change is not at fault, and the device keeps it to send again on its next connection."""
    INVALID_SYMBOL = "invalid_symbol"
    """Symbols of a Subscribe or Resync that are not valid symbols: one Error per frame, ``doc``
    the first of them as sent, the message listing them (bounded); the others are taken."""


# --- Field checks -----------------------------------------------------------------------------
# Each returns what is wrong with a value, or None. The same checks guard frames built by our own
# code (LocalProtocolError) and frames decoded from the peer (RemoteProtocolError).

_Check = Callable[[object], str | None]


def _uint(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be an int, not {type(value).__name__}"
    if not 0 <= value <= MAX_UINT:
        return f"must be between 0 and {MAX_UINT}, not {value}"
    return None


def _opt_uint(value: object) -> str | None:
    return None if value is None else _uint(value)


def _text(limit: int | None, *, empty: bool) -> _Check:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return f"must be a str, not {type(value).__name__}"
        if not empty and not value:
            return "must not be empty"
        if limit is not None and len(value) > limit:
            return f"must be at most {limit} characters, not {len(value)}"
        return None

    return check


_id = _text(MAX_ID_LENGTH, empty=False)
_code = _text(MAX_CODE_LENGTH, empty=False)
_name = _text(MAX_ID_LENGTH, empty=True)
_free_text = _text(None, empty=True)


def _opt_id(value: object) -> str | None:
    return None if value is None else _id(value)


def _bin(value: object) -> str | None:
    if not isinstance(value, bytes):
        return f"must be bytes, not {type(value).__name__}"
    return None


def _ids(value: object) -> str | None:
    if not isinstance(value, tuple):
        return f"must be a tuple of ids, not {type(value).__name__}"
    for index, item in enumerate(value):
        problem = _id(item)
        if problem is not None:
            return f"item {index} {problem}"
    return None


def _symbols(value: object) -> str | None:
    if not isinstance(value, tuple):
        return f"must be a tuple of symbols, not {type(value).__name__}"
    if len(value) > MAX_SYMBOLS:
        return f"must hold at most {MAX_SYMBOLS} symbols"
    for index, item in enumerate(value):
        if not isinstance(item, str) or not 0 < len(item) <= 32:
            return f"item {index} must be a symbol of 1 to 32 characters"
    return None


def _decimal_text(value: object, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_DECIMAL_TEXT:
        return "must be decimal text"
    return None


def _price_ticks(value: object) -> str | None:
    """Relay ticks: ``(symbol, price, time_ms, seq, size?)`` each."""
    if not isinstance(value, tuple):
        return f"must be a tuple of ticks, not {type(value).__name__}"
    if len(value) > MAX_TICKS:
        return f"must hold at most {MAX_TICKS} ticks"
    for index, tick in enumerate(value):
        if not isinstance(tick, tuple) or len(tick) != 5:
            return f"tick {index} must be [symbol, price, time_ms, seq, size]"
        symbol, price, time_ms, seq, size = tick
        problem = (
            (None if isinstance(symbol, str) and 0 < len(symbol) <= 32 else "symbol is not text")
            or _decimal_text(price, optional=False)
            or _uint(time_ms)
            or _uint(seq)
            or _decimal_text(size, optional=True)
        )
        if problem is not None:
            return f"tick {index}: {problem}"
    return None


def _raw_ticks(value: object) -> str | None:
    """A publisher's ticks: only their number and nesting are checked here; the relay checks
    each one and refuses the bad ones by index, so that good ticks of a batch pass."""
    if not isinstance(value, tuple):
        return f"must be a tuple of ticks, not {type(value).__name__}"
    if len(value) > MAX_TICKS:
        return f"must hold at most {MAX_TICKS} ticks"
    return None


def _rejections(value: object) -> str | None:
    if not isinstance(value, tuple):
        return f"must be a tuple of [index, reason], not {type(value).__name__}"
    for item in value:
        if (
            not isinstance(item, tuple)
            or len(item) != 2
            or _uint(item[0]) is not None
            or not isinstance(item[1], str)
        ):
            return "each rejection is [index, reason]"
    return None


def _watermark_problem(changed_at_ms: int | None, changed_by: str | None) -> str | None:
    if (changed_at_ms is None) != (changed_by is None):
        return "changed_at_ms and changed_by must be set together"
    return None


class _Checked:
    """Validates a frame's fields when it is built, so that no invalid frame exists: the encoder
    can trust what it is given and the decoder gets its checks for free."""

    __slots__ = ()
    _CODE: ClassVar[int]
    _CHECKS: ClassVar[tuple[_Check, ...]]

    def __post_init__(self) -> None:
        for field, check in zip(dataclasses.fields(self), self._CHECKS, strict=True):  # type: ignore[arg-type]
            problem = check(getattr(self, field.name))
            if problem is not None:
                raise LocalProtocolError(f"{type(self).__name__}.{field.name} {problem}")
        problem = self._cross_problem()
        if problem is not None:
            raise LocalProtocolError(f"{type(self).__name__}: {problem}")

    def _cross_problem(self) -> str | None:
        return None


# --- Frames -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(_Checked):
    """First frame of a client: the protocol it speaks and the token that says who it is."""

    _CODE: ClassVar[int] = 1
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_uint, _free_text, _name)

    protocol: int
    token: str
    client_name: str = ""


@dataclass(frozen=True, slots=True)
class Welcome(_Checked):
    """The relay accepted the Hello. ``documents`` are the ids the relay holds for this user, so
    that a new device knows what to ask for."""

    _CODE: ClassVar[int] = 2
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_uint, _id, _id, _uint, _ids)

    protocol: int
    user: str
    device: str
    server_time_ms: int
    documents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Error(_Checked):
    """An error. With a ``doc`` it concerns that document only (and, with a ``seq``, that update)
    and the connection stays open; without one it is fatal and the sender closes the connection."""

    _CODE: ClassVar[int] = 3
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_code, _free_text, _opt_id, _opt_uint)

    code: str
    message: str
    doc: str | None = None
    seq: int | None = None

    @property
    def fatal(self) -> bool:
        """Whether the connection ends after this error."""
        return self.doc is None

    def _cross_problem(self) -> str | None:
        if self.seq is not None and self.doc is None:
            return "a seq needs a doc"
        return None


@dataclass(frozen=True, slots=True)
class Ping(_Checked):
    """Asks the peer for a Pong with the same nonce; proves the whole path, not just TCP."""

    _CODE: ClassVar[int] = 4
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_uint,)

    nonce: int


@dataclass(frozen=True, slots=True)
class Pong(_Checked):
    """Answer to a Ping."""

    _CODE: ClassVar[int] = 5
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_uint,)

    nonce: int


@dataclass(frozen=True, slots=True)
class SyncRequest(_Checked):
    """Client to relay: this is what I have of ``doc`` (its state vector); send what I lack."""

    _CODE: ClassVar[int] = 10
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_id, _bin)

    doc: str
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncReply(_Checked):
    """Relay to client: the relay's diff against the client's state vector, the relay's own state
    vector (so that the client can send what the relay lacks), and when and from which device the
    document last changed on the relay (both nil for a document the relay has never seen)."""

    _CODE: ClassVar[int] = 11
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_id, _bin, _bin, _opt_uint, _opt_id)

    doc: str
    update: bytes
    state_vector: bytes
    changed_at_ms: int | None
    changed_by: str | None

    def _cross_problem(self) -> str | None:
        return _watermark_problem(self.changed_at_ms, self.changed_by)


@dataclass(frozen=True, slots=True)
class Update(_Checked):
    """A CRDT delta. From a client ``seq`` is positive and names the update for its Ack; from the
    relay (another device's change, fanned out) ``seq`` is 0 and the watermark is set."""

    _CODE: ClassVar[int] = 12
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_id, _uint, _bin, _opt_uint, _opt_id)

    doc: str
    seq: int
    update: bytes
    changed_at_ms: int | None = None
    changed_by: str | None = None

    def _cross_problem(self) -> str | None:
        return _watermark_problem(self.changed_at_ms, self.changed_by)


@dataclass(frozen=True, slots=True)
class Ack(_Checked):
    """Relay to client: the update ``seq`` of ``doc``, and every earlier one of that document on
    this connection, is durably stored; the client may forget it."""

    _CODE: ClassVar[int] = 13
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_id, _uint)

    doc: str
    seq: int


@dataclass(frozen=True, slots=True)
class Subscribe(_Checked):
    """Client to relay: follow these symbols (the whole set; it replaces the previous one)."""

    _CODE: ClassVar[int] = 40
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_symbols,)

    symbols: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resync(_Checked):
    """Client to relay: send a fresh snapshot of these symbols (a gap was seen)."""

    _CODE: ClassVar[int] = 41
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_symbols,)

    symbols: tuple[str, ...]


PriceTickTuple: TypeAlias = tuple[str, str, int, int, str | None]


@dataclass(frozen=True, slots=True)
class PriceSnapshot(_Checked):
    """Relay to client: the latest price of each symbol asked for (those that have one)."""

    _CODE: ClassVar[int] = 42
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_price_ticks,)

    ticks: tuple[PriceTickTuple, ...]


@dataclass(frozen=True, slots=True)
class PriceBatch(_Checked):
    """Relay to client: the newest price of each symbol that moved in the last delivery window."""

    _CODE: ClassVar[int] = 43
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_price_ticks,)

    ticks: tuple[PriceTickTuple, ...]


@dataclass(frozen=True, slots=True)
class Publish(_Checked):
    """Publisher to relay: a batch of ticks ``[symbol, price, time_ms, size?]`` to broadcast."""

    _CODE: ClassVar[int] = 44
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_uint, _raw_ticks)

    batch: int
    ticks: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Published(_Checked):
    """Relay to publisher: how many ticks of ``batch`` were taken; why the others were not."""

    _CODE: ClassVar[int] = 45
    _CHECKS: ClassVar[tuple[_Check, ...]] = (_uint, _uint, _rejections)

    batch: int
    accepted: int
    rejected: tuple[tuple[int, str], ...]


Frame: TypeAlias = (
    Hello
    | Welcome
    | Error
    | Ping
    | Pong
    | SyncRequest
    | SyncReply
    | Update
    | Ack
    | Subscribe
    | Resync
    | PriceSnapshot
    | PriceBatch
    | Publish
    | Published
)
"""Any frame of protocol version 1."""

_FRAME_TYPES: tuple[type[_Checked], ...] = (
    Hello,
    Welcome,
    Error,
    Ping,
    Pong,
    SyncRequest,
    SyncReply,
    Update,
    Ack,
    Subscribe,
    Resync,
    PriceSnapshot,
    PriceBatch,
    Publish,
    Published,
)
_BY_CODE: dict[int, type[_Checked]] = {cls._CODE: cls for cls in _FRAME_TYPES}
_FIELD_NAMES: dict[type[_Checked], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    for cls in _FRAME_TYPES
}
assert len(_BY_CODE) == len(_FRAME_TYPES), "two frames share a type code"

FRAME_NAMES: Mapping[int, str] = MappingProxyType(
    {cls._CODE: re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower() for cls in _FRAME_TYPES}
)
"""Every frame's type code and its name in snake case (``8`` is ``update``, ``11`` is
``sync_reply``): the one table that code outside this module (the relay's frame counters, the
``type`` label of its metrics) reads, instead of copying it."""
FRAME_CODES: Mapping[str, int] = MappingProxyType({n: c for c, n in FRAME_NAMES.items()})
"""The same table by name: ``FRAME_CODES["update"]`` is the Update frame's type code."""
_PRICE_FRAMES = (Subscribe, Resync, PriceSnapshot, PriceBatch, Publish, Published)
assert all(cls._CODE in RESERVED_PRICE_CODES for cls in _PRICE_FRAMES), "price codes are 40-59"
assert not any(
    cls._CODE in RESERVED_PRICE_CODES for cls in _FRAME_TYPES if cls not in _PRICE_FRAMES
), "a document frame took a price code"


# --- Codec ------------------------------------------------------------------------------------


def encode_frame(frame: Frame) -> bytes:
    """The bytes of one WebSocket binary message carrying ``frame``."""
    names = _FIELD_NAMES.get(type(frame))
    if names is None:
        raise LocalProtocolError(f"not a frame: {type(frame).__name__}")
    values = [frame._CODE, *(getattr(frame, name) for name in names)]
    try:
        return msgpack.packb(values, use_bin_type=True)  # type: ignore[no-any-return]
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a lone surrogate in a str
        raise LocalProtocolError(f"cannot encode {type(frame).__name__}: {exc}") from exc


def pack_price_tick(tick: PriceTickTuple) -> bytes:
    """One price tick in its wire form, packed once and reused for every subscriber."""
    problem = _price_ticks((tick,))
    if problem is not None:
        raise LocalProtocolError(f"price tick: {problem}")
    return msgpack.packb(tick, use_bin_type=True)  # type: ignore[no-any-return]


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def encode_price_frame(snapshot: bool, packed_ticks: Sequence[bytes]) -> bytes:
    """A PriceSnapshot or PriceBatch from ticks packed by :func:`pack_price_tick`.

    The same bytes as ``encode_frame(PriceBatch(ticks))``, without re-checking and re-packing
    every tick for every subscriber: a relay sends each tick to hundreds of subscribers, and doing
    that work per subscriber was half of its time.
    """
    if len(packed_ticks) > MAX_TICKS:
        raise LocalProtocolError(f"a price frame holds at most {MAX_TICKS} ticks")
    code = PriceSnapshot._CODE if snapshot else PriceBatch._CODE
    return b"\x92" + bytes((code,)) + _array_header(len(packed_ticks)) + b"".join(packed_ticks)


def _no_ext(code: int, data: bytes) -> object:
    """Called by msgpack at the first ext type, which ends the unpacking there: built into
    objects instead, the empty ones a 4 MiB message can hold took seconds."""
    raise ValueError(f"msgpack ext type {code}: frames use none")


def decode_frame(data: bytes, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> Frame:
    """The frame in one WebSocket binary message.

    Raises :class:`RemoteProtocolError` (code ``too_large`` or ``bad_frame``) for anything that is
    not exactly one valid frame. The size is checked before unpacking, and every length the
    unpacker may allocate is bounded by the size of the message, so a hostile message cannot make
    us hold much more than itself.
    """
    size = len(data)
    if size > max_frame_size:
        raise RemoteProtocolError(
            f"a message of {size} bytes exceeds the limit of {max_frame_size}",
            code=ErrorCode.TOO_LARGE,
        )
    try:
        items = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=False,  # tuples, as frames hold them: no recursive walk over nesting
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=0,
            max_ext_len=0,  # lets an empty ext through: 3 bytes each, refused by _no_ext
            ext_hook=_no_ext,
        )
    # msgpack documents ValueError and its subclasses, "and other exceptions" (UnicodeDecodeError,
    # TypeError...): at this boundary every one of them means the peer sent garbage.
    except Exception as exc:
        raise RemoteProtocolError(
            f"not a msgpack message: {type(exc).__name__}: {exc}", code=ErrorCode.BAD_FRAME
        ) from exc
    if not isinstance(items, tuple) or not items:
        raise RemoteProtocolError("a frame is a non-empty msgpack array", code=ErrorCode.BAD_FRAME)
    type_code = items[0]
    if not isinstance(type_code, int) or isinstance(type_code, bool):
        raise RemoteProtocolError(
            f"a frame type is an int, not {type(type_code).__name__}", code=ErrorCode.BAD_FRAME
        )
    cls = _BY_CODE.get(type_code)
    if cls is None:
        raise RemoteProtocolError(f"unknown frame type {type_code}", code=ErrorCode.BAD_FRAME)
    fields = items[1:]
    if len(fields) != len(cls._CHECKS):
        raise RemoteProtocolError(
            f"{cls.__name__} has {len(cls._CHECKS)} fields, got {len(fields)}",
            code=ErrorCode.BAD_FRAME,
        )
    try:
        return cls(*fields)  # type: ignore[return-value]
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc), code=ErrorCode.BAD_FRAME) from None
