"""The relay session's message bucket, driven synchronously: the time is an argument."""

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
from foliosync.sync.protocol.limits import MessageRate, TokenBucket


def ready_pair(rate: MessageRate) -> tuple[ServerSession, ClientSession]:
    server, client = ServerSession(message_rate=rate), ClientSession()
    server.receive_data(client.hello("token"), now=0.0)
    client.receive_data(server.accept("alice", "phone", [], 0))
    return server, client


def test_a_burst_passes_then_the_debt_is_served_for_the_grace_then_it_is_fatal() -> None:
    rate = MessageRate(rate=10, burst=5, grace=2)  # 5 at once, then 20 more of debt
    server, client = ready_pair(rate)
    for nonce in range(1, 25):  # the Hello took one token: 24 more stay within the debt
        server.receive_data(client.ping(nonce), now=0.0)
    assert server.tokens == pytest.approx(-20)
    with pytest.raises(RemoteProtocolError) as caught:
        server.receive_data(client.ping(99), now=0.0)
    assert caught.value.code == ErrorCode.RATE_LIMITED
    assert server.closed and server.error_reply is not None
    (event,) = ClientSession().receive_data(server.error_reply)
    assert isinstance(event, ErrorReceived) and event.fatal and event.code == "rate_limited"


def test_a_client_at_the_rate_is_never_cut_and_a_pause_refills_the_burst() -> None:
    rate = MessageRate(rate=10, burst=5, grace=1)
    server, client = ready_pair(rate)
    for step in range(1, 1001):  # 100 s at exactly the rate
        assert server.receive_data(client.ping(step), now=step / 10) == [PingReceived(step)]
    assert server.tokens is not None and server.tokens >= 3
    for nonce in range(2000, 2015):  # a burst of 15 after the pause: 5 + 10 of debt, allowed
        server.receive_data(client.ping(nonce), now=200.0)
    assert not server.closed


def test_symbols_and_ticks_cost_more_than_a_ping() -> None:
    rate = MessageRate(rate=1, burst=100, grace=1)
    server, client = ready_pair(rate)
    before = server.tokens
    assert before is not None
    server.receive_data(client.subscribe([f"S{i}" for i in range(2000)]), now=0.0)
    assert server.tokens == pytest.approx(before - 21)


def test_an_unmetered_session_needs_no_clock_and_a_metered_one_does() -> None:
    server, client = ServerSession(), ClientSession()
    server.receive_data(client.hello("token"))
    assert server.tokens is None and server.message_rate is None
    metered = ServerSession(message_rate=MessageRate())
    with pytest.raises(LocalProtocolError):
        metered.receive_data(ClientSession().hello("token"))


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 0}, {"rate": float("nan")}, {"burst": 0}, {"burst": 1.5}, {"grace": -1}],
)
def test_a_bad_rate_is_a_config_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        MessageRate(**kwargs)


@given(
    rate=st.floats(1, 1000),
    burst=st.integers(1, 1000),
    grace=st.floats(0.1, 10),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=300),
)
def test_what_passes_never_exceeds_burst_plus_rate_times_time_plus_the_debt(
    rate: float, burst: int, grace: float, gaps: list[float]
) -> None:
    limit = MessageRate(rate=rate, burst=burst, grace=grace)
    bucket = TokenBucket(limit)
    now = 0.0
    for passed, gap in enumerate(gaps, start=1):
        now += gap
        if not bucket.take(1, now):
            break
        assert passed <= burst + rate * now + limit.max_debt + 1e-6
