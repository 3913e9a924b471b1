"""The relay's price hub: conflated delivery to subscribers and the stalled-feed alert."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from foliosync.server.prices import PriceHub
from foliosync.sync.prices import PricePoint, Tick

# Tuesday 2026-11-24 15:00 New York (20:00 UTC): in session. Saturday 2026-11-28: closed.
IN_SESSION = int(datetime(2026, 11, 24, 20, 0, tzinfo=UTC).timestamp() * 1000)
SATURDAY = int(datetime(2026, 11, 28, 17, 0, tzinfo=UTC).timestamp() * 1000)
MINUTE = 60_000


class Subscriber:
    def __init__(self, hub: PriceHub) -> None:
        self.batches: list[list[PricePoint]] = []

    def deliver_prices(self, points: list[PricePoint]) -> None:
        self.batches.append(points)

    def take(self) -> list[PricePoint]:
        """Everything delivered since the last take, in order."""
        points = [p for batch in self.batches for p in batch]
        self.batches.clear()
        return points


def tick(symbol: str, price: str, at: int) -> Tick:
    return Tick(symbol, Decimal(price), at)


def test_a_followed_symbol_without_a_recent_price_in_session_raises_the_alert() -> None:
    now = [IN_SESSION]
    hub = PriceHub(clock_ms=lambda: now[0], stall_after=timedelta(minutes=5))
    subscriber = Subscriber(hub)
    hub.subscribe(subscriber, ["AAPL", "MSFT"])
    hub.publish([tick("AAPL", "100", IN_SESSION - 10 * MINUTE)])
    hub.publish([tick("MSFT", "300", IN_SESSION - 1 * MINUTE)])

    stalled = {s.symbol: s.age_s for s in hub.stalled()}
    assert stalled == {"AAPL": 600.0}

    hub.publish([tick("AAPL", "101", IN_SESSION)])
    assert hub.stalled() == []


def test_a_followed_symbol_that_never_had_a_price_is_stalled_too() -> None:
    hub = PriceHub(clock_ms=lambda: IN_SESSION)
    hub.subscribe(Subscriber(hub), ["NEWCO"])
    assert [(s.symbol, s.age_s) for s in hub.stalled()] == [("NEWCO", None)]


def test_no_alert_while_the_market_is_closed() -> None:
    hub = PriceHub(clock_ms=lambda: SATURDAY)
    hub.subscribe(Subscriber(hub), ["AAPL"])
    hub.publish([tick("AAPL", "100", SATURDAY - 24 * 60 * MINUTE)])
    assert hub.stalled() == []


def test_symbols_nobody_follows_never_alert() -> None:
    hub = PriceHub(clock_ms=lambda: IN_SESSION)
    hub.publish([tick("AAPL", "100", IN_SESSION - 60 * MINUTE)])
    assert hub.stalled() == []


def test_subscribers_get_only_their_symbols_and_a_snapshot_of_new_ones() -> None:
    hub = PriceHub(clock_ms=lambda: IN_SESSION, window_override_ms=0)
    hub.publish([tick("AAPL", "100", IN_SESSION - 1000)])
    a, b = Subscriber(hub), Subscriber(hub)
    snapshot = hub.subscribe(a, ["AAPL", "MSFT"])
    assert [(p.symbol, p.price) for p in snapshot] == [("AAPL", Decimal("100"))]
    assert hub.subscribe(a, ["AAPL", "MSFT"]) == []  # nothing new: no snapshot again
    hub.subscribe(b, ["MSFT"])

    hub.publish([tick("AAPL", "101", IN_SESSION), tick("MSFT", "300", IN_SESSION)])
    assert a.take() == [] and b.take() == []  # nothing goes before the flush
    hub.flush_once()
    assert len(a.batches) == 1 and len(b.batches) == 1  # one hand-over each, whatever the count
    assert sorted(p.symbol for p in a.take()) == ["AAPL", "MSFT"]
    assert [p.symbol for p in b.take()] == ["MSFT"]

    hub.unsubscribe(a)
    hub.publish([tick("AAPL", "102", IN_SESSION + 1)])
    hub.flush_once()
    assert a.take() == []
    assert hub.subscribed_symbols() == {"MSFT"}


def test_push_windows_follow_the_policy_and_conflate_to_the_newest_price() -> None:
    now = [IN_SESSION]
    hub = PriceHub(clock_ms=lambda: now[0])
    subscriber = Subscriber(hub)
    hub.subscribe(subscriber, ["AAPL"])
    assert hub.window_ms("AAPL") == 1000  # in session, not volatile: the policy's default

    hub.publish([tick("AAPL", "100.00", now[0])])
    hub.flush_once()
    assert [p.price for p in subscriber.take()] == [Decimal("100.00")]
    for cents in range(1, 50):  # 49 ticks inside one window
        hub.publish([tick("AAPL", f"100.{cents:02d}", now[0] + cents)])
    now[0] = IN_SESSION + 500
    hub.flush_once()
    assert subscriber.take() == []  # the window is still open
    now[0] = IN_SESSION + 1000
    hub.flush_once()
    assert [p.price for p in subscriber.take()] == [Decimal("100.49")]  # one price: the newest
    hub.flush_once()
    assert subscriber.take() == []

    now[0] = SATURDAY
    hub._windows.clear()
    assert hub.window_ms("AAPL") == 5000  # market closed


def test_the_hub_knows_when_its_next_release_is_due() -> None:
    now = [IN_SESSION]
    hub = PriceHub(clock_ms=lambda: now[0])  # policy windows: 1 s in session
    hub.subscribe(Subscriber(hub), ["AAPL"])
    hub.publish([tick("AAPL", "1", now[0])])
    assert hub.next_due_ms == 0  # never released: due at once
    hub.flush_once()
    hub.publish([tick("AAPL", "2", now[0] + 10)])
    assert hub.next_due_ms == IN_SESSION + 1000


def test_every_follower_of_a_symbol_gets_the_same_release_and_late_joiners_a_snapshot() -> None:
    now = [IN_SESSION]
    hub = PriceHub(clock_ms=lambda: now[0], window_override_ms=100)
    crowd = [Subscriber(hub) for _ in range(50)]
    for subscriber in crowd:
        hub.subscribe(subscriber, ["AAPL", "MSFT"])
    for step in range(1, 11):  # ten ticks in one window: each follower gets the tenth, once
        hub.publish([tick("AAPL", str(100 + step), now[0] + step)])
    hub.flush_once()
    assert {tuple((p.symbol, p.seq) for p in s.take()) for s in crowd} == {(("AAPL", 10),)}

    hub.publish([tick("AAPL", "200", now[0] + 20)])
    late = Subscriber(hub)
    assert [p.seq for p in hub.subscribe(late, ["AAPL"])] == [11]  # the newest, at once
    now[0] += 100
    hub.flush_once()
    assert [p.seq for p in late.take()] == [11]  # may repeat the snapshot: same number, no gap
    assert all([p.seq for p in s.take()] == [11] for s in crowd)


def test_a_symbol_nobody_follows_any_more_is_not_released() -> None:
    hub = PriceHub(clock_ms=lambda: IN_SESSION, window_override_ms=0)
    subscriber = Subscriber(hub)
    hub.subscribe(subscriber, ["AAPL"])
    hub.publish([tick("AAPL", "1", IN_SESSION)])
    hub.subscribe(subscriber, [])
    hub.flush_once()
    assert subscriber.take() == [] and hub.next_due_ms > IN_SESSION + 10**9


def test_a_fixed_window_shortens_the_flush_interval() -> None:
    assert PriceHub(window_override_ms=10).flush_interval == 0.01
    assert PriceHub(window_override_ms=0).flush_interval == 0.005
    assert PriceHub().flush_interval == 0.05


async def test_a_running_hub_flushes_when_a_price_may_go_and_sleeps_while_idle(
    helpers: Any,
) -> None:
    hub = PriceHub(window_override_ms=0)
    hub.flush_interval = 0.5  # (a fixed window would shorten it)
    hub.start()
    try:
        subscriber = Subscriber(hub)
        hub.subscribe(subscriber, ["AAPL"])
        assert hub._flush_timer is None  # nothing pending: no timer at all
        hub.publish([tick("AAPL", "1", IN_SESSION)])
        await helpers.eventually(lambda: bool(subscriber.batches))  # at once, not after an interval
        assert [p.price for p in subscriber.take()] == [Decimal("1")]
        assert hub._flush_timer is None

        # Within the interval after that flush, publishes gather into one later flush.
        hub.publish([tick("AAPL", "2", IN_SESSION + 1)])
        await asyncio.sleep(0.02)
        hub.publish([tick("AAPL", "3", IN_SESSION + 2)])
        await helpers.eventually(lambda: bool(subscriber.batches), timeout=5)
        assert [[p.price for p in batch] for batch in subscriber.batches] == [[Decimal("3")]]
    finally:
        await hub.close()


async def test_a_price_due_now_is_not_held_behind_one_that_waits_for_its_window(
    helpers: Any,
) -> None:
    hub = PriceHub(flush_interval=0.01, window_override_ms=300)
    hub.start()
    try:
        subscriber = Subscriber(hub)
        hub.subscribe(subscriber, ["AAPL", "MSFT"])
        hub.publish([tick("AAPL", "1", IN_SESSION)])
        await helpers.eventually(lambda: bool(subscriber.batches))
        subscriber.take()
        hub.publish([tick("AAPL", "2", IN_SESSION + 1)])  # waits for AAPL's window
        hub.publish([tick("MSFT", "5", IN_SESSION + 1)])  # never sent: may go at once
        await helpers.eventually(lambda: bool(subscriber.batches))
        assert [(p.symbol, p.price) for p in subscriber.take()] == [("MSFT", Decimal("5"))]
        await helpers.eventually(
            lambda: bool(subscriber.batches)
        )  # AAPL once its window has passed
        assert [(p.symbol, p.price) for p in subscriber.take()] == [("AAPL", Decimal("2"))]
    finally:
        await hub.close()


async def test_price_delivery_times_how_late_each_flush_ran_once_per_flush(helpers: Any) -> None:
    """foliosync_price_delivery_seconds: one observation per timed flush, however many prices it
    releases, measuring how late it ran against its planned time (a blocked event loop)."""
    hub = PriceHub(window_override_ms=0)
    hub.start()
    try:
        subscriber = Subscriber(hub)
        hub.subscribe(subscriber, ["AAPL", "MSFT", "NVDA"])
        hub.publish([tick(s, "1", IN_SESSION) for s in ("AAPL", "MSFT", "NVDA")])
        await helpers.eventually(lambda: bool(subscriber.batches))
        assert len(subscriber.take()) == 3
        assert hub.delivery.count == 1  # one flush, three prices: one observation
        assert hub.delivery.total < 0.2

        hub.publish([tick("AAPL", "2", IN_SESSION + 1)])
        time.sleep(0.3)  # the event loop is blocked past the flush's planned time
        await helpers.eventually(lambda: bool(subscriber.batches))
        assert hub.delivery.count == 2
        assert hub.delivery.total >= 0.25
    finally:
        await hub.close()


async def test_a_flush_runs_in_no_connection_s_log_context(helpers: Any) -> None:
    """The flush timer is armed by whichever publisher came first; what it runs (every
    subscriber's delivery, their log lines) must not carry that publisher's connection."""
    from foliosync.server.logs import bind_log_context, current_log_context

    class Recording(Subscriber):
        def __init__(self, hub: PriceHub) -> None:
            super().__init__(hub)
            self.contexts: list[dict[str, str]] = []

        def deliver_prices(self, points: list[PricePoint]) -> None:
            self.contexts.append(dict(current_log_context()))
            super().deliver_prices(points)

    hub = PriceHub(window_override_ms=0)
    hub.start()
    try:
        subscriber = Recording(hub)
        hub.subscribe(subscriber, ["AAPL"])

        async def publisher() -> None:
            bind_log_context(connection="relay-1:7", user="feeder", device="feed")
            hub.publish([tick("AAPL", "1", IN_SESSION)])

        await asyncio.get_running_loop().create_task(publisher())
        await helpers.eventually(lambda: bool(subscriber.batches))
        assert subscriber.contexts == [{}]
    finally:
        await hub.close()
