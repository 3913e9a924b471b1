"""The frame codec: the wire layout of each frame, and what the decoder refuses."""

from __future__ import annotations

import msgpack
import pytest

from foliosync.sync.errors import LocalProtocolError, RemoteProtocolError
from foliosync.sync.protocol import frames
from foliosync.sync.protocol.frames import (
    RESERVED_PRICE_CODES,
    Ack,
    Error,
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
)
from foliosync.sync.protocol.limits import MAX_ID_LENGTH, MAX_UINT

MiB = 1 << 20

# The documented table: frame, and its exact wire array.
WIRE_LAYOUT = [
    (Hello(1, "tok", "phone"), [1, 1, "tok", "phone"]),
    (
        Welcome(1, "u1", "d1", 1_700_000_000_000, ("wl:main", "pf:main")),
        [2, 1, "u1", "d1", 1_700_000_000_000, ["wl:main", "pf:main"]],
    ),
    (Error("forbidden", "no", "pf:x", 3), [3, "forbidden", "no", "pf:x", 3]),
    (Error("internal", "oops"), [3, "internal", "oops", None, None]),
    (Ping(7), [4, 7]),
    (Pong(7), [5, 7]),
    (SyncRequest("wl:main", b"\x00"), [10, "wl:main", b"\x00"]),
    (
        SyncReply("wl:main", b"\x01\x02", b"\x03", 1_700_000_000_000, "d2"),
        [11, "wl:main", b"\x01\x02", b"\x03", 1_700_000_000_000, "d2"],
    ),
    (SyncReply("wl:new", b"", b"\x00", None, None), [11, "wl:new", b"", b"\x00", None, None]),
    (Update("wl:main", 5, b"\x09"), [12, "wl:main", 5, b"\x09", None, None]),
    (Update("wl:main", 0, b"\x09", 12, "d2"), [12, "wl:main", 0, b"\x09", 12, "d2"]),
    (Ack("wl:main", 5), [13, "wl:main", 5]),
]


@pytest.mark.parametrize(("frame", "wire"), WIRE_LAYOUT, ids=lambda v: type(v).__name__)
def test_wire_layout_is_the_documented_array(frame: frames.Frame, wire: list[object]) -> None:
    data = encode_frame(frame)
    assert msgpack.unpackb(data, raw=False) == wire
    assert decode_frame(data) == frame


def test_binary_fields_are_msgpack_bin_and_ids_are_str() -> None:
    data = encode_frame(SyncRequest("d", b"sv"))
    # 0x93 array of 3, 0x0a type 10, 0xa1 'd' fixstr, 0xc4 0x02 bin8 of 2 bytes.
    assert data == b"\x93\x0a\xa1d\xc4\x02sv"


def test_document_frames_stay_out_of_the_price_codes() -> None:
    used = {msgpack.unpackb(encode_frame(frame))[0] for frame, _ in WIRE_LAYOUT}
    assert used == {1, 2, 3, 4, 5, 10, 11, 12, 13}
    assert not used & set(RESERVED_PRICE_CODES)
    assert list(RESERVED_PRICE_CODES) == list(range(40, 60))


PRICE_FRAMES = [
    (Subscribe(("AAPL", "MSFT")), [40, ["AAPL", "MSFT"]]),
    (Resync(("AAPL",)), [41, ["AAPL"]]),
    (PriceSnapshot((("AAPL", "187.25", 5, 2, None),)), [42, [["AAPL", "187.25", 5, 2, None]]]),
    (PriceBatch((("BRK.B", "401.5", 6, 9, "100"),)), [43, [["BRK.B", "401.5", 6, 9, "100"]]]),
    (Publish(7, (("AAPL", "1", 5, None), "junk")), [44, 7, [["AAPL", "1", 5, None], "junk"]]),
    (Published(7, 1, ((1, "not a tick"),)), [45, 7, 1, [[1, "not a tick"]]]),
]


@pytest.mark.parametrize(("frame", "wire"), PRICE_FRAMES, ids=lambda v: type(v).__name__)
def test_price_frames_wire_layout_and_round_trip(frame: object, wire: list[object]) -> None:
    data = encode_frame(frame)  # type: ignore[arg-type]
    assert msgpack.unpackb(data) == wire
    assert decode_frame(data) == frame
    assert 40 <= wire[0] < 60  # type: ignore[operator]


@pytest.mark.parametrize(
    "wire",
    [
        [43, [["AAPL", 187.25, 5, 2, None]]],  # price as a float, not decimal text
        [43, [["AAPL", "1", -5, 2, None]]],  # negative time
        [43, [["AAPL", "1", 5, 2]]],  # a field missing
        [40, "AAPL"],  # symbols not a list
        [40, ["A" * 33]],  # symbol too long
        [45, 1, 1, [[1]]],  # rejection without a reason
    ],
)
def test_malformed_price_frames_are_bad_frames(wire: list[object]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_frame(msgpack.packb(wire))
    assert info.value.code == "bad_frame"


def test_welcome_documents_decode_as_a_tuple() -> None:
    frame = decode_frame(msgpack.packb([2, 1, "u", "d", 0, ["a", "b"]]))
    assert isinstance(frame, Welcome)
    assert frame.documents == ("a", "b")


def test_error_without_doc_is_fatal() -> None:
    assert Error("bad_frame", "x").fatal
    assert not Error("forbidden", "x", doc="pf:1").fatal
    assert not Error("bad_update", "x", doc="pf:1", seq=4).fatal


def _bad(wire: object, **packb: bool) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_frame(msgpack.packb(wire, use_bin_type=True, **packb))
    return caught.value


@pytest.mark.parametrize(
    "wire",
    [
        [],  # no type
        {"t": 1},  # a map, not an array
        1,  # not an array at all
        ["1", 1, "t", ""],  # type as str
        [True, 1, "t", ""],  # type as bool
        [99, 1],  # unknown type
        [45, "AAPL"],  # Published with fields missing
        [1, 1, "t"],  # Hello with a field missing
        [1, 1, "t", "", "extra"],  # Hello with a field too many
        [1, True, "t", ""],  # bool is not an int
        [1, 1.0, "t", ""],  # float is not an int
        [1, -1, "t", ""],  # negative version
        [1, 1, b"t", ""],  # bin where str
        [10, "d", "sv"],  # str where bin
        [10, "", b"sv"],  # empty doc id
        [10, "d" * (MAX_ID_LENGTH + 1), b"sv"],  # doc id too long
        [12, "d", -1, b"u", None, None],  # negative seq
        [13, "d", MAX_UINT + 1],  # seq beyond signed 64 bits
        [12, "d", 0, b"u", 5, None],  # half a watermark
        [11, "d", b"u", b"sv", None, "dev"],  # half a watermark
        [3, "", "m", None, None],  # empty error code
        [3, "c", "m", None, 4],  # a seq without a doc
        [2, 1, "u", "d", 0, "a"],  # documents as str
        [2, 1, "u", "d", 0, ["a", 1]],  # a document id as int
        [2, 1, "u", "d", 0, ["a", ["b"]]],  # nested list
        [4, None],  # nonce nil
    ],
)
def test_ill_formed_frames_are_bad_frame(wire: object) -> None:
    assert _bad(wire).code == "bad_frame"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x93\x0a",  # truncated array
        encode_frame(Ping(1)) + b"\x00",  # trailing bytes
        encode_frame(Ping(1)) + encode_frame(Ping(2)),  # two frames in one message
        b"\x92\x0a\xa2\xff\xfe",  # invalid UTF-8 in a str
        msgpack.packb([4, msgpack.ExtType(1, b"x")]),  # ext types are not used
        b"\x91" * 5000 + b"\x04",  # nesting deep enough to overflow the unpacker
        b"\xdd\xff\xff\xff\xff",  # an array that claims 4 billion items
        b"\xc6\x7f\xff\xff\xff",  # a bin that claims 2 GiB
    ],
)
def test_non_frames_are_bad_frame(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        decode_frame(data)
    assert caught.value.code == "bad_frame"


def test_empty_ext_types_are_refused_at_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """``c7 00 0e`` (an ext8 of no data) passes ``max_ext_len=0``; found by the fuzzer in a
    Subscribe. Built into objects, 4 MiB of them held the relay's event loop for two seconds;
    the unpacking now stops at the first (msgpack calls the hook once, then gives up)."""
    calls: list[int] = []
    refuse = frames._no_ext

    def counted(code: int, data: bytes) -> object:
        calls.append(code)
        return refuse(code, data)

    monkeypatch.setattr(frames, "_no_ext", counted)
    count = (4 * MiB) // 3 - 8
    data = b"\x92\x28\xdd" + count.to_bytes(4, "big") + b"\xc7\x00\x0e" * count
    with pytest.raises(RemoteProtocolError, match="ext type 14") as caught:
        decode_frame(data, max_frame_size=4 * MiB)
    assert caught.value.code == "bad_frame" and calls == [14]


def test_oversized_message_is_refused_before_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_unpack(*args: object, **kwargs: object) -> object:
        raise AssertionError("unpacked a message over the limit")

    monkeypatch.setattr(frames.msgpack, "unpackb", must_not_unpack)
    with pytest.raises(RemoteProtocolError) as caught:
        decode_frame(b"\x00" * (2 * MiB), max_frame_size=MiB)
    assert caught.value.code == "too_large"


def test_message_of_exactly_the_limit_is_accepted() -> None:
    # Payloads of 256 B to 64 KiB all have the same (bin16) header, so the overhead is constant.
    overhead = len(encode_frame(Update("d", 1, b"x" * 1000))) - 1000
    frame = Update("d", 1, b"x" * (4096 - overhead))
    data = encode_frame(frame)
    assert len(data) == 4096
    assert decode_frame(data, max_frame_size=4096) == frame
    with pytest.raises(RemoteProtocolError) as caught:
        decode_frame(data, max_frame_size=4095)
    assert caught.value.code == "too_large"


def test_decoding_accepts_bytearray_and_memoryview() -> None:
    data = encode_frame(Ack("d", 2))
    assert decode_frame(bytearray(data)) == Ack("d", 2)
    assert decode_frame(memoryview(data)) == Ack("d", 2)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello("1", "t"),  # type: ignore[arg-type]
        lambda: Update("d", -1, b""),
        lambda: Update("d", 1, "text"),  # type: ignore[arg-type]
        lambda: Update("d", 0, b"", 5, None),
        lambda: Ack("", 1),
        lambda: Error("x", "m", seq=1),
        lambda: Welcome(1, "u", "d", 0, ["a"]),  # type: ignore[arg-type]
        lambda: Ping(MAX_UINT + 1),
    ],
)
def test_invalid_frames_cannot_be_built(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_encoding_a_lone_surrogate_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(Hello(1, "\ud800"))


def test_encoding_something_else_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(("not", "a", "frame"))  # type: ignore[arg-type]


def test_frames_are_immutable() -> None:
    frame = Ack("d", 1)
    with pytest.raises(AttributeError):
        frame.seq = 2  # type: ignore[misc]


@pytest.mark.parametrize("count", [0, 1, 15, 16, 300, 10000])
@pytest.mark.parametrize("snapshot", [False, True])
def test_price_frames_from_packed_ticks_are_the_same_bytes(count: int, snapshot: bool) -> None:
    ticks = tuple(
        (f"S{i % 500}", f"{i}.25", i, i + 1, None if i % 2 else "100") for i in range(count)
    )
    frame = PriceSnapshot(ticks) if snapshot else PriceBatch(ticks)
    packed = [frames.pack_price_tick(t) for t in ticks]
    assert frames.encode_price_frame(snapshot, packed) == encode_frame(frame)
    assert (
        decode_frame(frames.encode_price_frame(snapshot, packed), max_frame_size=1 << 24) == frame
    )


def test_a_bad_tick_cannot_be_packed() -> None:
    with pytest.raises(LocalProtocolError):
        frames.pack_price_tick(("AAPL", 187.25, 1, 1, None))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        frames.encode_price_frame(False, [b"\xc0"] * (frames.MAX_TICKS + 1))


def test_the_frame_table_names_every_frame_once_and_the_metrics_use_it() -> None:
    """One table of type codes and names, exported by the protocol: the relay's frame counters
    label frames with it rather than keeping a copy that a new frame would be missing from."""
    from foliosync.server.metrics import frame_type_name
    from foliosync.sync.protocol import FRAME_CODES, FRAME_NAMES

    assert set(FRAME_NAMES) == {cls._CODE for cls in frames._FRAME_TYPES}
    assert FRAME_NAMES[Update._CODE] == "update"
    assert FRAME_NAMES[SyncRequest._CODE] == "sync_request"
    assert FRAME_NAMES[PriceSnapshot._CODE] == "price_snapshot"
    assert len(set(FRAME_NAMES.values())) == len(FRAME_NAMES)
    assert {FRAME_CODES[name]: name for name in FRAME_CODES} == dict(FRAME_NAMES)
    for code, name in FRAME_NAMES.items():
        assert frame_type_name(code) == name
    assert frame_type_name(0) == "unknown"
    with pytest.raises(TypeError):
        FRAME_NAMES[99] = "mine"  # type: ignore[index]
