"""The relay session's count of its own refusals, driven synchronously: the time is an argument."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foliosync.sync.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from foliosync.sync.protocol import (
    ClientSession,
    ErrorCode,
    ErrorReceived,
    PingReceived,
    ServerSession,
)
from foliosync.sync.protocol.limits import RefusalLimit, RefusalWindow
from foliosync.sync.protocol.session import refusal_weight

WL = "wl-52864113d0bf7ec5b0a294a5"


def ready_pair(limit: RefusalLimit) -> tuple[ServerSession, ClientSession]:
    server, client = ServerSession(refusal_limit=limit), ClientSession()
    server.receive_data(client.hello("token"), now=0.0)
    client.receive_data(server.accept("alice", "phone", [], 0))
    server.receive_data(client.sync_request(WL, b"\x00"), now=0.0)
    client.receive_data(server.sync_reply(WL, b"\x00\x00", b"\x00"))
    return server, client


def refuse_updates(
    server: ServerSession, client: ClientSession, code: str, count: int, now: float
) -> None:
    """``count`` Updates of the watchlist at ``now``, each answered by ``code``."""
    for _ in range(count):
        seq = client.documents[WL].sent_upto + 1
        server.receive_data(client.update(WL, seq, b"\x00\x00"), now=now)
        client.receive_data(server.error(code, "no", doc=WL, seq=seq))


def test_past_the_count_the_next_frame_gets_a_fatal_too_many_refusals() -> None:
    server, client = ready_pair(RefusalLimit(count=5, window=10))
    refuse_updates(server, client, ErrorCode.INVALID_DOCUMENT, 5, now=1.0)
    assert server.refusals(1.0) == 5
    assert server.receive_data(client.ping(1), now=1.0) == [PingReceived(1)]  # 5 is allowed
    refuse_updates(server, client, ErrorCode.INVALID_DOCUMENT, 1, now=1.0)
    with pytest.raises(RemoteProtocolError) as caught:
        server.receive_data(client.ping(2), now=1.0)
    assert caught.value.code == ErrorCode.TOO_MANY_REFUSALS
    assert "more than 5" in str(caught.value)
    assert server.closed and server.error_reply is not None
    (event,) = ClientSession().receive_data(server.error_reply)
    assert isinstance(event, ErrorReceived) and event.fatal
    assert event.code == ErrorCode.TOO_MANY_REFUSALS


def test_refusals_leave_the_count_once_their_window_is_over() -> None:
    server, client = ready_pair(RefusalLimit(count=5, window=10))
    refuse_updates(server, client, ErrorCode.REFUSED, 5, now=0.5)
    assert server.refusals(9.9) == 5  # still within the window
    assert server.refusals(10.0) == 0  # its slot [0, 1) is a whole window old
    refuse_updates(server, client, ErrorCode.REFUSED, 5, now=10.0)
    assert server.receive_data(client.ping(1), now=10.5) == [PingReceived(1)]
    # a steady refusal every 2.5 s never reaches 5 in 10 s: never cut
    for step in range(40):
        refuse_updates(server, client, ErrorCode.REFUSED, 1, now=21.0 + 2.5 * step)
        server.receive_data(client.ping(step + 2), now=21.0 + 2.5 * step)
    assert not server.closed


def test_what_the_device_cannot_help_weighs_little_or_nothing() -> None:
    server, client = ready_pair(RefusalLimit(count=5, window=10))
    # one per change in flight of a document past the user's limit: 500 weigh 5
    refuse_updates(server, client, ErrorCode.TOO_MANY_DOCUMENTS, 500, now=1.0)
    assert server.refusals(1.0) == pytest.approx(5)
    # the relay's own failures and its notices weigh nothing
    refuse_updates(server, client, ErrorCode.EXTENSION_FAILED, 50, now=1.0)
    for _ in range(50):
        client.receive_data(server.error("shared", "alice shared it", doc="alice/" + WL))
        client.receive_data(server.error("revoked", "the owner revoked it", doc="alice/" + WL))
    assert server.refusals(1.0) == pytest.approx(5)
    server.receive_data(client.ping(1), now=1.0)  # still served
    assert not server.closed


@pytest.mark.parametrize(
    ("code", "seq", "weight"),
    [
        (ErrorCode.BAD_UPDATE, 3, 1.0),
        (ErrorCode.UPDATE_V2, 3, 1.0),
        (ErrorCode.INVALID_DOCUMENT, 3, 1.0),
        (ErrorCode.REFUSED, 3, 1.0),
        ("no_weekend_trades", 3, 1.0),  # an extension's own code: a change at fault
        (ErrorCode.INVALID_SYMBOL, None, 1.0),
        (ErrorCode.TOO_MANY_DOCUMENTS, 3, 0.01),
        (ErrorCode.FORBIDDEN, None, 0.01),
        (ErrorCode.NOT_FOUND, 3, 0.01),
        (ErrorCode.MISSING_DEPENDENCIES, 3, 0.01),
        ("read_only", 3, 0.01),
        ("revoked", 3, 0.01),
        ("revoked", None, 0.0),
        ("shared", None, 0.0),
        (ErrorCode.EXTENSION_FAILED, 3, 0.0),
    ],
)
def test_the_weight_of_each_refusal(code: str, seq: int | None, weight: float) -> None:
    assert refusal_weight(code, seq) == weight


def test_acks_and_fatal_errors_are_not_refusals() -> None:
    server, client = ready_pair(RefusalLimit(count=1, window=10))
    for seq in range(1, 20):
        server.receive_data(client.update(WL, seq, b"\x00\x00"), now=1.0)
        client.receive_data(server.ack(WL, seq))
    assert server.refusals(1.0) == 0
    server.error(ErrorCode.INTERNAL, "the store is down")  # fatal: ends the session anyway
    assert server.closed


def test_a_counting_session_needs_the_clock_and_an_uncounted_one_does_not() -> None:
    counted = ServerSession(refusal_limit=RefusalLimit())
    with pytest.raises(LocalProtocolError):
        counted.receive_data(ClientSession().hello("token"))
    uncounted = ServerSession()
    uncounted.receive_data(ClientSession().hello("token"))
    assert uncounted.refusal_limit is None and uncounted.refusals(0.0) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"count": 0}, {"count": 1.5}, {"count": True}, {"window": 0}, {"window": float("inf")}],
)
def test_a_bad_refusal_limit_is_a_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RefusalLimit(**kwargs)  # type: ignore[arg-type]


def test_a_session_takes_only_a_refusal_limit() -> None:
    with pytest.raises(ConfigError):
        ServerSession(refusal_limit=100)  # type: ignore[arg-type]


@given(
    window=st.floats(0.5, 60),
    times=st.lists(st.floats(0, 1000), min_size=1, max_size=200),
)
def test_the_count_is_what_was_added_within_the_window_give_or_take_a_slot(
    window: float, times: list[float]
) -> None:
    counter = RefusalWindow(RefusalLimit(count=1000, window=window))
    times.sort()
    for at in times:
        counter.add(1.0, at)
    now = times[-1]
    counted = counter.weight(now)
    assert sum(1 for at in times if at > now - window * 0.9) <= counted
    assert counted <= sum(1 for at in times if at > now - window - 1e-6)
