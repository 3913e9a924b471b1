"""The two session state machines, the in-memory pair, and the outbound queue."""

from __future__ import annotations

import pytest
from pycrdt import Array, Doc, Map

from foliosync.sync.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from foliosync.sync.protocol import (
    Ack,
    Acked,
    ClientSession,
    ClientState,
    Error,
    ErrorCode,
    ErrorReceived,
    Hello,
    HelloReceived,
    MemoryConnection,
    OutboundQueue,
    Ping,
    PingReceived,
    PongReceived,
    ServerSession,
    ServerState,
    SyncReplied,
    SyncReply,
    SyncRequest,
    SyncRequested,
    Update,
    UpdateReceived,
    Welcome,
    Welcomed,
    connected_pair,
    decode_frame,
    encode_frame,
)

# --- Helpers ----------------------------------------------------------------------------------


def ready_pair(**kwargs: object) -> MemoryConnection:
    conn = connected_pair(**kwargs)  # type: ignore[arg-type]
    conn.handshake(user="u1", device="d1", documents=["wl:main"], server_time_ms=1_000)
    return conn


def synced_pair(*docs: str) -> MemoryConnection:
    """A ready pair whose client sent (and the relay received) a SyncRequest of each doc."""
    conn = ready_pair()
    for doc in docs:
        conn.client_sends(conn.client.sync_request(doc, b"\x00"))
    conn.deliver_to_server()
    return conn


def server_refuses(server: ServerSession, frame: object, code: str) -> Error:
    """Feed ``frame`` (a frame or raw bytes); check the refusal and return the reply frame."""
    data = frame if isinstance(frame, bytes) else encode_frame(frame)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError) as caught:
        server.receive_data(data)
    assert caught.value.code == code
    assert server.state is ServerState.CLOSED
    assert server.error_reply is not None
    reply = decode_frame(server.error_reply)
    assert isinstance(reply, Error)
    assert reply.code == code
    assert reply.fatal
    return reply


def client_refuses(client: ClientSession, frame: object, code: str) -> Error:
    data = frame if isinstance(frame, bytes) else encode_frame(frame)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError) as caught:
        client.receive_data(data)
    assert caught.value.code == code
    assert client.state is ClientState.CLOSED
    assert client.error_reply is not None
    reply = decode_frame(client.error_reply)
    assert isinstance(reply, Error)
    assert reply.code == code
    return reply


# --- Handshake --------------------------------------------------------------------------------


def test_handshake_moves_both_sides_to_ready() -> None:
    conn = connected_pair()
    assert conn.client.state is ClientState.IDLE
    assert conn.server.state is ServerState.AWAITING_HELLO

    conn.client_sends(conn.client.hello("tok-1", client_name="laptop"))
    assert conn.client.state is ClientState.AWAITING_WELCOME
    assert conn.deliver_to_server() == [HelloReceived(1, "tok-1", "laptop")]
    assert conn.server.state is ServerState.AUTHENTICATING

    conn.server_sends(conn.server.accept("u1", "d1", ["wl:main", "pf:main"], 1_700_000_000_000))
    assert conn.server.state is ServerState.READY
    assert conn.deliver_to_client() == [
        Welcomed(1, "u1", "d1", 1_700_000_000_000, ("wl:main", "pf:main"))
    ]
    assert conn.client.state is ClientState.READY
    assert (conn.client.user, conn.client.device) == ("u1", "d1")


def test_unsupported_version_yields_the_error_reply_and_closes() -> None:
    server = ServerSession()
    reply = server_refuses(server, Hello(7, "tok"), "unsupported_version")
    assert reply.message == "relay speaks protocol 1, client sent 7"
    with pytest.raises(LocalProtocolError):
        server.accept("u", "d", [], 0)


def test_a_relay_speaking_several_versions_welcomes_in_the_clients_version() -> None:
    server = ServerSession(supported_protocols=frozenset({1, 2}))
    assert server.receive_data(encode_frame(Hello(2, "t"))) == [HelloReceived(2, "t", "")]
    welcome = decode_frame(server.accept("u", "d", [], 0))
    assert isinstance(welcome, Welcome)
    assert welcome.protocol == 2
    reply = server_refuses(
        ServerSession(supported_protocols=frozenset({1, 2})), Hello(3, ""), "unsupported_version"
    )
    assert reply.message == "relay speaks protocol 1, 2, client sent 3"


def test_client_refuses_a_welcome_of_another_version() -> None:
    client = ClientSession()
    client.hello("t")
    client_refuses(client, Welcome(2, "u", "d", 0, ()), "unsupported_version")


@pytest.mark.parametrize(
    "frame",
    [
        SyncRequest("wl:main", b"\x00"),
        Update("wl:main", 1, b"\x00"),
        Ping(1),
        Error("bad_update", "x", doc="wl:main"),
    ],
    ids=lambda f: type(f).__name__,
)
@pytest.mark.parametrize("hello_first", [False, True], ids=["before-hello", "while-authenticating"])
def test_document_frames_before_welcome_are_not_authenticated(
    frame: object, hello_first: bool
) -> None:
    server = ServerSession()
    if hello_first:
        server.receive_data(encode_frame(Hello(1, "t")))
    server_refuses(server, frame, "not_authenticated")


def test_reject_sends_auth_failed_and_closes_both_sides() -> None:
    conn = connected_pair()
    conn.client_sends(conn.client.hello("forged"))
    conn.deliver_to_server()
    conn.server_sends(conn.server.reject("auth_failed", "token expired"))
    assert conn.server.state is ServerState.CLOSED
    assert conn.deliver_to_client() == [
        ErrorReceived("auth_failed", "token expired", None, None, fatal=True)
    ]
    assert conn.client.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.client.sync_request("wl:main", b"\x00")


def test_reject_is_only_for_the_handshake() -> None:
    conn = ready_pair()
    with pytest.raises(LocalProtocolError):
        conn.server.reject("auth_failed", "late")
    assert conn.server.state is ServerState.READY


@pytest.mark.parametrize("accepted", [False, True], ids=["while-authenticating", "when-ready"])
def test_a_second_hello_is_unexpected(accepted: bool) -> None:
    conn = connected_pair()
    conn.client_sends(conn.client.hello("t"))
    conn.deliver_to_server()
    if accepted:
        conn.server.accept("u", "d", [], 0)
    server_refuses(conn.server, Hello(1, "t"), "unexpected_frame")


def test_client_cannot_send_document_frames_before_welcome() -> None:
    client = ClientSession()
    for send in (
        lambda: client.sync_request("wl:main", b"\x00"),
        lambda: client.update("wl:main", 1, b"\x00"),
        lambda: client.ping(1),
    ):
        with pytest.raises(LocalProtocolError):
            send()
    client.hello("t")
    with pytest.raises(LocalProtocolError):
        client.sync_request("wl:main", b"\x00")
    with pytest.raises(LocalProtocolError):
        client.hello("t")  # once only
    assert client.state is ClientState.AWAITING_WELCOME


def test_relay_cannot_send_before_the_handshake() -> None:
    server = ServerSession()
    with pytest.raises(LocalProtocolError):
        server.accept("u", "d", [], 0)
    with pytest.raises(LocalProtocolError):
        server.sync_reply("wl:main", b"", b"\x00")
    server.receive_data(encode_frame(Hello(1, "t")))
    with pytest.raises(LocalProtocolError):
        server.ack("wl:main", 1)
    with pytest.raises(LocalProtocolError):
        server.send(Welcome(2, "u", "d", 0, ()))  # not the version the client asked for
    assert server.state is ServerState.AUTHENTICATING


def test_relay_frames_before_welcome_are_unexpected_for_the_client() -> None:
    client = ClientSession()
    client.hello("t")
    client_refuses(client, SyncReply("wl:main", b"", b"\x00", None, None), "unexpected_frame")


def test_a_fatal_error_is_accepted_in_any_state() -> None:
    client = ClientSession()  # even before the Hello: the relay may refuse at once
    events = client.receive_data(encode_frame(Error("internal", "shutting down")))
    assert events == [ErrorReceived("internal", "shutting down", None, None, fatal=True)]
    assert client.state is ClientState.CLOSED


# --- Direction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [Welcome(1, "u", "d", 0, ()), SyncReply("wl:main", b"", b"\x00", None, None), Ack("d", 1)],
    ids=lambda f: type(f).__name__,
)
def test_relay_frames_from_a_client_are_unexpected(frame: object) -> None:
    conn = ready_pair()
    server_refuses(conn.server, frame, "unexpected_frame")
    with pytest.raises(LocalProtocolError):
        conn.client.send(frame)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "frame", [Hello(1, "t"), SyncRequest("wl:main", b"\x00")], ids=lambda f: type(f).__name__
)
def test_client_frames_from_the_relay_are_unexpected(frame: object) -> None:
    conn = ready_pair()
    client_refuses(conn.client, frame, "unexpected_frame")
    with pytest.raises(LocalProtocolError):
        conn.server.send(frame)  # type: ignore[arg-type]


# --- Updates and acks -------------------------------------------------------------------------


def test_client_update_needs_a_positive_seq_and_no_watermark() -> None:
    conn = synced_pair("wl:main")
    with pytest.raises(LocalProtocolError):
        conn.client.update("wl:main", 0, b"\x00")
    with pytest.raises(LocalProtocolError):
        conn.client.send(Update("wl:main", 1, b"\x00", 5, "d1"))
    assert conn.client.state is ClientState.READY
    server_refuses(conn.server, Update("wl:main", 0, b"\x00"), "bad_frame")
    conn = synced_pair("wl:main")
    server_refuses(conn.server, Update("wl:main", 1, b"\x00", 5, "d1"), "bad_frame")


# --- Sequence rules: SyncRequest first, then strictly increasing seqs per document -----------


def test_an_update_before_its_documents_sync_request_is_fatal() -> None:
    conn = ready_pair()
    reply = server_refuses(conn.server, Update("wl:main", 1, b"\x00"), "not_synced")
    assert reply.message == "Update of 'wl:main' before its SyncRequest on this connection"


def test_a_sync_request_of_another_document_does_not_count() -> None:
    conn = synced_pair("pf:main")
    server_refuses(conn.server, Update("wl:main", 1, b"\x00"), "not_synced")


def test_updates_may_follow_the_sync_request_before_its_reply() -> None:
    conn = synced_pair("wl:main")  # no SyncReply sent yet
    conn.client_sends(conn.client.update("wl:main", 1, b"\x00"))
    assert conn.deliver_to_server() == [UpdateReceived("wl:main", 1, b"\x00", None, None)]
    assert conn.server.state is ServerState.READY


def test_client_cannot_send_an_update_before_its_sync_request() -> None:
    conn = ready_pair()
    with pytest.raises(LocalProtocolError) as caught:
        conn.client.update("wl:main", 1, b"\x00")
    assert caught.value.code == "not_synced"
    assert conn.client.state is ClientState.READY
    conn.client.sync_request("wl:main", b"\x00")
    conn.client.update("wl:main", 1, b"\x00")


def test_increasing_seqs_with_gaps_are_accepted_and_acked() -> None:
    conn = synced_pair("wl:main", "pf:main")
    for doc, seq in (("wl:main", 5), ("pf:main", 2), ("wl:main", 9), ("pf:main", 3)):
        conn.client_sends(conn.client.update(doc, seq, b"\x00"))
    events = conn.deliver_to_server()
    assert [(e.doc, e.seq) for e in events] == [  # type: ignore[union-attr]
        ("wl:main", 5),
        ("pf:main", 2),
        ("wl:main", 9),
        ("pf:main", 3),
    ]
    conn.server_sends(conn.server.ack("wl:main", 9))
    conn.server_sends(conn.server.ack("pf:main", 3))
    assert conn.deliver_to_client() == [Acked("wl:main", 9), Acked("pf:main", 3)]


@pytest.mark.parametrize("seqs", [(5, 5), (5, 3), (2, 7, 7), (9, 1)], ids=str)
def test_a_repeated_or_lower_seq_is_fatal(seqs: tuple[int, ...]) -> None:
    conn = synced_pair("wl:main")
    for seq in seqs[:-1]:
        conn.server.receive_data(encode_frame(Update("wl:main", seq, b"\x00")))
    reply = server_refuses(conn.server, Update("wl:main", seqs[-1], b"\x00"), "bad_seq")
    assert reply.message == (
        f"Update seq {seqs[-1]} of 'wl:main' after seq {max(seqs[:-1])}: seqs must increase"
    )


def test_client_cannot_send_a_seq_that_does_not_increase() -> None:
    conn = synced_pair("wl:main")
    conn.client.update("wl:main", 5, b"\x00")
    for seq in (5, 3):
        with pytest.raises(LocalProtocolError) as caught:
            conn.client.update("wl:main", seq, b"\x00")
        assert caught.value.code == "bad_seq"
    assert conn.client.state is ClientState.READY
    conn.client.update("wl:main", 6, b"\x00")


def test_seqs_start_afresh_on_a_new_connection() -> None:
    """The Python client's seqs come from its replica and grow across connections, but another
    client may restart at 1: a new connection knows no earlier seq."""
    first = synced_pair("wl:main")
    first.client_sends(first.client.update("wl:main", 7, b"\x00"))
    first.deliver_to_server()
    second = synced_pair("wl:main")
    second.client_sends(second.client.update("wl:main", 1, b"\x00"))
    assert [e.seq for e in second.deliver_to_server()] == [1]  # type: ignore[union-attr]


def test_relay_cannot_ack_an_update_it_never_received() -> None:
    conn = synced_pair("wl:main")
    with pytest.raises(LocalProtocolError):
        conn.server.ack("wl:main", 1)
    conn.client_sends(conn.client.update("wl:main", 3, b"\x00"))
    conn.deliver_to_server()
    with pytest.raises(LocalProtocolError):
        conn.server.ack("wl:main", 4)
    with pytest.raises(LocalProtocolError):
        conn.server.ack("pf:main", 3)  # another document
    conn.server.ack("wl:main", 3)


def test_client_refuses_an_ack_of_an_update_it_never_sent() -> None:
    conn = synced_pair("wl:main")
    conn.client.update("wl:main", 2, b"\x00")
    client_refuses(conn.client, Ack("wl:main", 3), "unexpected_frame")


def test_relay_update_is_a_fan_out_with_a_watermark() -> None:
    conn = ready_pair()
    conn.server_sends(conn.server.update("wl:main", b"\x01", 1_700_000_000_123, "d2"))
    assert conn.deliver_to_client() == [
        UpdateReceived("wl:main", 0, b"\x01", 1_700_000_000_123, "d2")
    ]
    with pytest.raises(LocalProtocolError):
        conn.server.send(Update("wl:main", 1, b"\x01", 5, "d2"))
    with pytest.raises(LocalProtocolError):
        conn.server.send(Update("wl:main", 0, b"\x01"))
    client_refuses(conn.client, Update("wl:main", 0, b"\x01"), "bad_frame")


def test_per_document_errors_keep_the_connection() -> None:
    conn = synced_pair("pf:other")
    conn.client_sends(conn.client.update("pf:other", 1, b"\x00"))
    conn.deliver_to_server()
    conn.server_sends(conn.server.error("forbidden", "not yours", doc="pf:other", seq=1))
    assert conn.deliver_to_client() == [
        ErrorReceived("forbidden", "not yours", "pf:other", 1, fatal=False)
    ]
    assert conn.client.state is ClientState.READY
    assert conn.server.state is ServerState.READY
    conn.client_sends(conn.client.error("bad_update", "cannot apply", doc="wl:main"))
    assert conn.deliver_to_server() == [
        ErrorReceived("bad_update", "cannot apply", "wl:main", None, fatal=False)
    ]
    assert conn.server.state is ServerState.READY


def test_a_fatal_error_sent_closes_the_sender() -> None:
    conn = ready_pair()
    conn.server_sends(conn.server.error("internal", "disk failed"))
    assert conn.server.state is ServerState.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.server.ping(1)
    assert conn.deliver_to_client()[0] == ErrorReceived(
        "internal", "disk failed", None, None, fatal=True
    )
    assert conn.client.state is ClientState.CLOSED


def test_ping_pong_both_ways() -> None:
    conn = ready_pair()
    conn.client_sends(conn.client.ping(42))
    assert conn.deliver_to_server() == [PingReceived(42)]
    conn.server_sends(conn.server.pong(42))
    assert conn.deliver_to_client() == [PongReceived(42)]
    conn.server_sends(conn.server.ping(43))
    assert conn.deliver_to_client() == [PingReceived(43)]
    conn.client_sends(conn.client.pong(43))
    assert conn.deliver_to_server() == [PongReceived(43)]


# --- Limits and misuse ------------------------------------------------------------------------


def test_oversized_message_is_too_large() -> None:
    server = ServerSession(max_frame_size=1 << 20)
    server_refuses(server, b"\x00" * (2 << 20), "too_large")


def test_a_connection_names_at_most_max_documents_distinct_documents() -> None:
    """Each document named is remembered for the connection's life: past the limit, a fatal
    too_many_documents; naming one already named again is no new document."""
    server = ServerSession(max_documents=3)
    server.receive_data(encode_frame(Hello(1, "token")))
    server.accept("u1", "d1", [], 1_000)
    for doc in ("wl:a", "wl:b", "wl:c", "wl:a"):
        assert server.receive_data(encode_frame(SyncRequest(doc, b"\x00"))) == [
            SyncRequested(doc, b"\x00")
        ]
    reply = server_refuses(server, SyncRequest("wl:d", b"\x00"), "too_many_documents")
    assert "limit of 3 documents" in reply.message
    assert ErrorCode.TOO_MANY_DOCUMENTS == "too_many_documents"


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_a_document_limit_must_be_a_positive_int(limit: object) -> None:
    with pytest.raises(ConfigError):
        ServerSession(max_documents=limit)  # type: ignore[arg-type]


def test_a_session_does_not_send_what_a_peer_with_its_limit_would_refuse() -> None:
    conn = ready_pair(max_frame_size=1024)
    conn.client_sends(conn.client.sync_request("wl:main", b"\x00"))
    conn.deliver_to_server()
    with pytest.raises(LocalProtocolError) as caught:
        conn.server.sync_reply("wl:main", b"x" * 2000, b"\x00")
    assert caught.value.code == "too_large"
    assert conn.server.state is ServerState.READY


def test_the_error_reply_stays_small_whatever_the_peer_sent() -> None:
    conn = ready_pair()
    long_doc = "d" * 256  # the longest id, quoted in the complaint
    reply = client_refuses(conn.client, Ack(long_doc, 5), "unexpected_frame")
    assert reply.message.startswith("Ack of seq 5 of 'ddd")
    assert len(reply.message) == 200


def test_receiving_after_close_is_a_local_error() -> None:
    conn = ready_pair()
    conn.server.close()
    assert conn.server.closed
    with pytest.raises(LocalProtocolError):
        conn.server.receive_data(encode_frame(Ping(1)))
    server = ServerSession()
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"\xc1")
    with pytest.raises(LocalProtocolError):
        server.receive_data(encode_frame(Hello(1, "t")))


def test_receive_data_takes_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        ServerSession().receive_data("text message")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_a_frame_limit_must_be_positive(size: object) -> None:
    with pytest.raises(ConfigError):
        ServerSession(max_frame_size=size)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ClientSession(max_frame_size=size)  # type: ignore[arg-type]


def test_a_relay_must_speak_some_version() -> None:
    with pytest.raises(ConfigError):
        ServerSession(supported_protocols=frozenset())


# --- A whole exchange with real CRDT documents ------------------------------------------------


def test_full_exchange_converges_real_documents() -> None:
    relay_doc = Doc()
    relay_doc.get("symbols", type=Array).extend(["AAPL", "MSFT"])
    device_doc = Doc()
    device_doc.get("meta", type=Map)["name"] = "Tech"

    conn = connected_pair()
    conn.client_sends(conn.client.hello("tok", client_name="phone"))
    (hello,) = conn.deliver_to_server()
    assert hello == HelloReceived(1, "tok", "phone")
    conn.server_sends(conn.server.accept("u1", "d1", ["wl:tech"], 1_700_000_000_000))
    (welcomed,) = conn.deliver_to_client()
    assert isinstance(welcomed, Welcomed)
    assert welcomed.documents == ("wl:tech",)

    # The device asks for what it lacks.
    conn.client_sends(conn.client.sync_request("wl:tech", device_doc.get_state()))
    (requested,) = conn.deliver_to_server()
    assert isinstance(requested, SyncRequested)
    conn.server_sends(
        conn.server.sync_reply(
            requested.doc,
            relay_doc.get_update(requested.state_vector),
            relay_doc.get_state(),
            1_699_999_999_000,
            "d0",
        )
    )
    (replied,) = conn.deliver_to_client()
    assert isinstance(replied, SyncReplied)
    assert (replied.changed_at_ms, replied.changed_by) == (1_699_999_999_000, "d0")
    device_doc.apply_update(replied.update)

    # It sends what the relay lacks, computed from the relay's state vector.
    conn.client_sends(conn.client.update("wl:tech", 1, device_doc.get_update(replied.state_vector)))
    (received,) = conn.deliver_to_server()
    assert isinstance(received, UpdateReceived)
    assert received.seq == 1
    relay_doc.apply_update(received.update)
    conn.server_sends(conn.server.ack(received.doc, received.seq))
    assert conn.deliver_to_client() == [Acked("wl:tech", 1)]

    for doc in (relay_doc, device_doc):
        assert doc.get("symbols", type=Array).to_py() == ["AAPL", "MSFT"]
        assert doc.get("meta", type=Map).to_py() == {"name": "Tech"}
    # Neither lacks anything of the other (state vector bytes are not canonical: compare diffs).
    empty_update = b"\x00\x00"
    assert relay_doc.get_update(device_doc.get_state()) == empty_update
    assert device_doc.get_update(relay_doc.get_state()) == empty_update


def test_messages_stay_in_flight_until_delivered() -> None:
    conn = ready_pair()
    conn.client_sends(conn.client.ping(1))
    conn.client_sends(conn.client.ping(2))
    assert conn.in_flight_to_server == 2
    assert conn.deliver_to_server() == [PingReceived(1), PingReceived(2)]
    assert conn.in_flight_to_server == 0
    assert conn.deliver_to_server() == []


# --- Outbound queue ---------------------------------------------------------------------------


def test_control_is_drained_before_bulk_whatever_the_push_order() -> None:
    queue = OutboundQueue()
    queue.push_bulk("AAPL", b"tick-aapl")
    queue.push_control(b"ack-1")
    queue.push_bulk("MSFT", b"tick-msft")
    queue.push_control(b"ack-2")
    assert len(queue) == 4
    assert queue.control_bytes == 10
    assert [queue.pop() for _ in range(2)] == [b"ack-1", b"ack-2"]
    assert queue.control_bytes == 0
    queue.push_control(b"reply")  # arrives while ticks wait: still first
    assert [queue.pop() for _ in range(4)] == [b"reply", b"tick-aapl", b"tick-msft", None]
    assert not queue


def test_bulk_conflates_per_key_and_keeps_the_slot_in_place() -> None:
    queue = OutboundQueue()
    queue.push_bulk("AAPL", b"a1")
    queue.push_bulk("MSFT", b"m1")
    queue.push_bulk("AAPL", b"a2")
    assert queue.bulk_items == 2
    assert queue.bulk_replaced == 1
    assert queue.bulk_bytes == 4
    assert [queue.pop(), queue.pop(), queue.pop()] == [b"a2", b"m1", None]


def test_bulk_is_bounded_in_items_evicting_the_oldest() -> None:
    queue = OutboundQueue(max_bulk_items=3)
    for i in range(10):
        assert queue.push_bulk(i, b"%d" % i)
    assert queue.bulk_items == 3
    assert queue.bulk_dropped == 7
    assert [queue.pop() for _ in range(3)] == [b"7", b"8", b"9"]


def test_bulk_is_bounded_in_bytes_and_keeps_the_freshest_item() -> None:
    queue = OutboundQueue(max_bulk_bytes=10)
    queue.push_bulk("A", b"aaaa")
    queue.push_bulk("B", b"bbbb")
    queue.push_bulk("A", b"AAAAAAAA")  # grows the oldest slot: B must go, not the new A
    assert queue.bulk_bytes == 8
    assert [queue.pop(), queue.pop()] == [b"AAAAAAAA", None]
    assert not queue.push_bulk("C", b"c" * 11)  # larger than the whole bound
    assert queue.bulk_bytes == 0
    assert queue.bulk_dropped == 2


def test_control_is_never_dropped() -> None:
    queue = OutboundQueue(max_bulk_items=1, max_bulk_bytes=1)
    for i in range(1000):
        queue.push_control(b"%d" % i)
    assert len(queue) == 1000
    assert [queue.pop() for _ in range(1000)] == [b"%d" % i for i in range(1000)]


@pytest.mark.parametrize("bound", [0, -5, True])
def test_bulk_bounds_must_be_positive(bound: object) -> None:
    with pytest.raises(ConfigError):
        OutboundQueue(max_bulk_items=bound)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        OutboundQueue(max_bulk_bytes=bound)  # type: ignore[arg-type]
