"""Laws of the protocol over generated inputs: frames survive the codec, no input makes a session
fail other than with RemoteProtocolError, what one side sends the other accepts, and the outbound
queue keeps control traffic first and bulk traffic bounded."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foliosync.sync.errors import RemoteProtocolError
from foliosync.sync.protocol import (
    Ack,
    ClientSession,
    ClientState,
    Error,
    Frame,
    Hello,
    OutboundQueue,
    Ping,
    Pong,
    ServerSession,
    ServerState,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    connected_pair,
    decode_frame,
    encode_frame,
)
from foliosync.sync.protocol.limits import MAX_CODE_LENGTH, MAX_ID_LENGTH, MAX_UINT

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- Strategies for valid frames --------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=40)
ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_ID_LENGTH)
short_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
uints = st.integers(0, MAX_UINT)
blobs = st.binary(max_size=64)
watermarks = st.one_of(st.just((None, None)), st.tuples(uints, ids))
codes = st.one_of(
    st.sampled_from(["auth_failed", "bad_frame", "forbidden", "not_found", "bad_update"]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=MAX_CODE_LENGTH),
)

FRAME_STRATEGIES: dict[type, st.SearchStrategy[Frame]] = {
    Hello: st.builds(Hello, uints, text, st.text(st.characters(codec="utf-8"), max_size=20)),
    Welcome: st.builds(Welcome, uints, ids, ids, uints, st.lists(ids, max_size=5).map(tuple)),
    Error: st.one_of(
        st.builds(Error, codes, text),
        st.builds(Error, codes, text, ids, st.none() | uints),
    ),
    Ping: st.builds(Ping, uints),
    Pong: st.builds(Pong, uints),
    SyncRequest: st.builds(SyncRequest, ids, blobs),
    SyncReply: st.builds(
        lambda doc, u, sv, wm: SyncReply(doc, u, sv, *wm), ids, blobs, blobs, watermarks
    ),
    Update: st.builds(
        lambda doc, seq, u, wm: Update(doc, seq, u, *wm), ids, uints, blobs, watermarks
    ),
    Ack: st.builds(Ack, ids, uints),
}
frames = st.one_of(*FRAME_STRATEGIES.values())


@pytest.mark.parametrize("kind", list(FRAME_STRATEGIES), ids=lambda k: k.__name__)
def test_every_frame_survives_the_codec(kind: type) -> None:
    @FAST
    @given(FRAME_STRATEGIES[kind])
    def round_trip(frame: Frame) -> None:
        data = encode_frame(frame)
        decoded = decode_frame(data)
        assert decoded == frame
        assert type(decoded) is kind
        assert encode_frame(decoded) == data

    round_trip()


# --- Sessions in every state ------------------------------------------------------------------


def server_in(state: ServerState) -> ServerSession:
    server = ServerSession()
    if state is not ServerState.AWAITING_HELLO:
        server.receive_data(encode_frame(Hello(1, "t")))
    if state is ServerState.READY:
        server.accept("u", "d", [], 0)
        # An update received, so that acks and resends have something to refer to.
        server.receive_data(encode_frame(SyncRequest("d", b"\x00")))
        server.receive_data(encode_frame(Update("d", 1, b"")))
    assert server.state is state
    return server


def client_in(state: ClientState) -> ClientSession:
    client = ClientSession()
    if state is not ClientState.IDLE:
        client.hello("t")
    if state is ClientState.READY:
        client.receive_data(encode_frame(Welcome(1, "u", "d", 0, ())))
        client.sync_request("d", b"\x00")
        client.update("d", 1, b"")
    assert client.state is state
    return client


SESSION_FACTORIES: list[Callable[[], ServerSession | ClientSession]] = [
    *(lambda s=s: server_in(s) for s in ServerState if s is not ServerState.CLOSED),
    *(lambda s=s: client_in(s) for s in ClientState if s is not ClientState.CLOSED),
]
sessions = st.sampled_from(SESSION_FACTORIES).map(lambda make: make())


def feed(session: ServerSession | ClientSession, data: bytes) -> bool:
    """Give ``data`` to ``session``; the only failure allowed is RemoteProtocolError, after which
    the session is closed with a fatal Error to send. True if the session accepted the data."""
    try:
        events = session.receive_data(data)
    except RemoteProtocolError as exc:
        assert session.closed
        assert session.error_reply is not None
        reply = decode_frame(session.error_reply)
        assert isinstance(reply, Error)
        assert reply.fatal
        assert reply.code == exc.code
        return False
    assert len(events) == 1
    return True


@FUZZ
@given(sessions, st.binary(max_size=300))
def test_any_bytes_give_events_or_a_remote_protocol_error(
    session: ServerSession | ClientSession, data: bytes
) -> None:
    feed(session, data)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    text,
    blobs,
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(text, inner, max_size=3),
    max_leaves=20,
)
type_codes = st.one_of(
    st.sampled_from([1, 2, 3, 4, 5, 10, 11, 12, 13, 45]), st.integers(-(2**63), 2**64 - 1)
)
frame_like_arrays = st.builds(
    lambda head, tail: [head, *tail], type_codes, st.lists(msgpack_values, max_size=7)
)


@FUZZ
@given(sessions, st.one_of(frame_like_arrays, msgpack_values))
def test_ill_typed_msgpack_gives_events_or_a_remote_protocol_error(
    session: ServerSession | ClientSession, value: object
) -> None:
    feed(session, msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(sessions, frames, st.data())
def test_mangled_frames_give_events_or_a_remote_protocol_error(
    session: ServerSession | ClientSession, frame: Frame, data: st.DataObject
) -> None:
    raw = bytearray(encode_frame(frame))
    index = data.draw(st.integers(0, len(raw) - 1))
    action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if action == "flip":
        raw[index] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        del raw[index:]
    else:
        raw.insert(index, data.draw(st.integers(0, 255)))
    feed(session, bytes(raw))


@FUZZ
@given(sessions, st.lists(frames, max_size=6))
def test_valid_frames_in_any_order_give_events_or_a_remote_protocol_error(
    session: ServerSession | ClientSession, sequence: list[Frame]
) -> None:
    for frame in sequence:
        # After a fatal Error received the session is closed, and the shell stops reading.
        if not feed(session, encode_frame(frame)) or session.closed:
            break


# --- What one side sends, the other accepts ---------------------------------------------------

client_actions = st.lists(
    st.one_of(
        st.tuples(st.just("sync"), short_ids, blobs),
        st.tuples(st.just("update"), short_ids, st.integers(1, MAX_UINT // 16), blobs),
        st.tuples(st.just("ping"), uints),
        st.tuples(st.just("doc_error"), codes, short_ids),
    ),
    max_size=10,
)


@FAST
@given(client_actions)
def test_the_relay_accepts_whatever_a_ready_client_sends(actions: list[tuple]) -> None:
    conn = connected_pair()
    conn.handshake()
    last_seq: dict[str, int] = {}
    expected = len(actions)
    for action in actions:
        match action:
            case ("sync", doc, sv):
                conn.client_sends(conn.client.sync_request(doc, sv))
                last_seq.setdefault(doc, 0)
            case ("update", doc, step, update):
                # A correct client syncs a document before updating it, and its seqs increase.
                if doc not in last_seq:
                    conn.client_sends(conn.client.sync_request(doc, b"\x00"))
                    expected += 1
                last_seq[doc] = last_seq.get(doc, 0) + step
                conn.client_sends(conn.client.update(doc, last_seq[doc], update))
            case ("ping", nonce):
                conn.client_sends(conn.client.ping(nonce))
            case ("doc_error", code, doc):
                conn.client_sends(conn.client.error(code, "", doc=doc))
    events = conn.deliver_to_server()
    assert len(events) == expected
    assert conn.server.state is ServerState.READY
    # Every update received can be acked, and the client accepts each ack.
    for event in events:
        if type(event).__name__ == "UpdateReceived":
            conn.server_sends(conn.server.ack(event.doc, event.seq))  # type: ignore[union-attr]
        elif type(event).__name__ == "SyncRequested":
            conn.server_sends(conn.server.sync_reply(event.doc, b"", b"\x00"))  # type: ignore[union-attr]
    conn.deliver_to_client()
    assert conn.client.state is ClientState.READY


# --- Outbound queue ---------------------------------------------------------------------------

queue_ops = st.lists(
    st.one_of(
        st.tuples(st.just("control"), st.integers(0, 40)),
        st.tuples(st.just("bulk"), st.integers(0, 9), st.integers(0, 40)),
        st.tuples(st.just("pop")),
    ),
    max_size=80,
)


@FUZZ
@given(queue_ops, st.integers(1, 6), st.integers(30, 200))
def test_outbound_queue_keeps_control_first_and_bulk_fresh_and_bounded(
    ops: list[tuple], max_items: int, max_bytes: int
) -> None:
    queue = OutboundQueue(max_bulk_items=max_items, max_bulk_bytes=max_bytes)
    control: deque[bytes] = deque()
    latest: dict[int, int] = {}  # key -> version of its latest push, while it may still be sent
    version = 0
    for op in ops:
        if op[0] == "control":
            data = b"C%d:" % version + b"." * op[1]
            version += 1
            queue.push_control(data)
            control.append(data)
        elif op[0] == "bulk":
            key, pad = op[1], op[2]
            data = b"B%d:%d:" % (key, version) + b"." * pad
            if queue.push_bulk(key, data):
                latest[key] = version
            else:  # alone over the bound: dropped, and the older item of the key with it
                assert len(data) > max_bytes
                latest.pop(key, None)
            version += 1
        else:
            popped = queue.pop()
            if control:
                assert popped == control.popleft()  # never behind bulk, FIFO
            elif popped is None:
                assert queue.bulk_items == 0
            else:
                assert popped.startswith(b"B")
                key_text, version_text, _ = popped[1:].split(b":", 2)
                # Only the newest item of a key is ever sent, and only once.
                assert latest.pop(int(key_text)) == int(version_text)
        assert queue.bulk_items <= max_items
        assert queue.bulk_bytes <= max_bytes
        assert queue.control_bytes == sum(map(len, control))
        assert len(queue) == len(control) + queue.bulk_items
