"""The price feed contract (:class:`~foliosync.server.feeds.Feed`) as a suite of checks.

A feed is small: started against a :class:`~foliosync.server.prices.PriceHub`, it publishes
ticks into it on its own, and :meth:`~foliosync.server.feeds.Feed.close` stops it. What the relay
relies on, and what these checks hold a feed to: the ticks it publishes are valid ones (each
would pass :func:`~foliosync.sync.prices.check_tick`), it publishes nothing once closed, closing
is quick and idempotent (also before the first tick), and a source with bad records among good
ones goes on with the good ones instead of ending::

    import pytest
    from foliosync.testing.feed_contract import FEED_CHECKS

    @pytest.mark.parametrize("check", FEED_CHECKS, ids=str)
    async def test_my_feed(check):
        await check.run(lambda hub: MyFeed.start(hub, "wss://quotes.example"))

``start`` may be called several times by one check: each call starts a new feed on the hub
given. :func:`check_feed_skips_bad_input` needs a factory of its own, one whose source mixes bad
records with good ones, so it is not in :data:`FEED_CHECKS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from foliosync.server.feeds import Feed
from foliosync.server.prices import PriceHub
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import ValidationError
from foliosync.sync.prices import PricePoint, Tick, check_tick

__all__ = [
    "FEED_CHECKS",
    "FeedCheck",
    "RecordingHub",
    "StartFeed",
    "check_feed",
    "check_feed_skips_bad_input",
]

StartFeed = Callable[[PriceHub], Awaitable[Feed]]
"""Builds a feed publishing into the hub given, and starts it."""

FIRST_TICK_TIMEOUT = 10.0
"""How long a started feed may take to publish its first tick."""
CLOSE_TIMEOUT = 5.0
"""How long :meth:`Feed.close` may take."""
QUIET_AFTER_CLOSE = 0.5
"""How long the checks watch for a tick published after close."""


class RecordingHub(PriceHub):
    """A PriceHub that keeps every tick it is handed (the checks read what a feed published)."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Tick] = []

    def publish(self, ticks: Iterable[Tick]) -> list[PricePoint]:
        batch = list(ticks)
        self.received.extend(batch)
        return super().publish(batch)


@dataclass(frozen=True, slots=True)
class FeedCheck:
    """One rule of the contract; ``run(start)`` raises AssertionError if the feed breaks it."""

    name: str
    run: Callable[[StartFeed], Awaitable[None]]

    def __str__(self) -> str:
        return self.name


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


async def _until_ticks(hub: RecordingHub, count: int = 1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FIRST_TICK_TIMEOUT
    while len(hub.received) < count:
        _expect(
            loop.time() < deadline,
            f"the feed published {len(hub.received)} ticks in {FIRST_TICK_TIMEOUT} s",
        )
        await asyncio.sleep(0.01)


async def _close(feed: Feed) -> None:
    try:
        await asyncio.wait_for(feed.close(), CLOSE_TIMEOUT)
    except TimeoutError:
        raise AssertionError(f"close() did not return within {CLOSE_TIMEOUT} s") from None


def _invalid(ticks: Iterable[Tick]) -> list[str]:
    now = wall_ms()
    bad = []
    for tick in ticks:
        raw: list[object] = [tick.symbol, str(tick.price), tick.time_ms]
        if tick.size is not None:
            raw.append(str(tick.size))
        try:
            check_tick(raw, now)
        except ValidationError as exc:
            bad.append(f"{tick}: {exc}")
    return bad


async def check_feed_publishes_valid_ticks(start: StartFeed) -> None:
    """A started feed publishes into its hub by itself, and only ticks that pass check_tick."""
    hub = RecordingHub()
    feed = await start(hub)
    try:
        await _until_ticks(hub, 5)
    finally:
        await _close(feed)
    bad = _invalid(hub.received)
    _expect(not bad, f"{len(bad)} published ticks are not valid, e.g. {bad[:3]}")


async def check_feed_stops_on_close(start: StartFeed) -> None:
    """Once close() returns, nothing more is published; a second close() is harmless."""
    hub = RecordingHub()
    feed = await start(hub)
    try:
        await _until_ticks(hub)
    finally:
        await _close(feed)
    published = len(hub.received)
    await asyncio.sleep(QUIET_AFTER_CLOSE)
    _expect(
        len(hub.received) == published,
        f"{len(hub.received) - published} ticks were published after close()",
    )
    await _close(feed)


async def check_feed_closes_before_its_first_tick(start: StartFeed) -> None:
    """A feed closed at once (the relay stopping as it starts) stops, and publishes nothing
    afterwards."""
    hub = RecordingHub()
    feed = await start(hub)
    await _close(feed)
    published = len(hub.received)
    await asyncio.sleep(QUIET_AFTER_CLOSE)
    _expect(len(hub.received) == published, "a feed closed at once went on publishing")


async def check_feed_skips_bad_input(start_with_bad_input: StartFeed) -> None:
    """For a factory whose feed reads bad records among good ones: the good ones are still
    published (the feed goes on past the bad ones), and nothing invalid reaches the hub."""
    hub = RecordingHub()
    feed = await start_with_bad_input(hub)
    try:
        await _until_ticks(hub, 2)
    finally:
        await _close(feed)
    bad = _invalid(hub.received)
    _expect(not bad, f"bad input reached the hub: {bad[:3]}")


FEED_CHECKS: tuple[FeedCheck, ...] = (
    FeedCheck("publishes_valid_ticks", check_feed_publishes_valid_ticks),
    FeedCheck("stops_on_close", check_feed_stops_on_close),
    FeedCheck("closes_before_its_first_tick", check_feed_closes_before_its_first_tick),
)
"""Every check that needs only a factory of the feed."""


async def check_feed(start: StartFeed) -> None:
    """Run every check of :data:`FEED_CHECKS`, one after the other; the first failure raises."""
    for check in FEED_CHECKS:
        try:
            await check.run(start)
        except AssertionError as exc:
            raise AssertionError(f"feed contract {check.name}: {exc}") from exc
