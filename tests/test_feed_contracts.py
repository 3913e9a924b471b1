"""foliosync.testing's feed contract, run against the feeds foliosync ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from foliosync.server.feeds import CsvReplayFeed, Feed, SimulatorFeed, start_feed
from foliosync.server.prices import PriceHub
from foliosync.testing.feed_contract import (
    FEED_CHECKS,
    FeedCheck,
    check_feed,
    check_feed_skips_bad_input,
)


def _recording(rows: int, start_ms: int = 1_764_547_200_000) -> str:
    lines = ["timestamp,symbol,price,size"]
    lines += [f"{start_ms + 5 * i},AAPL,{230 + (i % 50) / 100:.2f},10" for i in range(rows)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("check", FEED_CHECKS, ids=str)
async def test_simulator_feed(check: FeedCheck) -> None:
    async def start(hub: PriceHub) -> Feed:
        feed = SimulatorFeed(hub, always=True, ticks_per_second=500, interval=0.01)
        feed.start()
        return feed

    await check.run(start)


@pytest.mark.parametrize("check", FEED_CHECKS, ids=str)
async def test_csv_replay_feed(check: FeedCheck, tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(_recording(2000))  # 10 s of recording at 4x: still running when closed

    async def start(hub: PriceHub) -> Feed:
        feed = CsvReplayFeed(hub, path, speed=4, batch=10)
        feed.start()
        return feed

    await check.run(start)


async def test_csv_replay_feed_skips_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    good = _recording(400).splitlines()
    garbage = ["not,a,row", "1764547200000,AAPL,-3", "yesterday,MSFT,420", "\x00\xff,,", "1,2"]
    path.write_text("\n".join([good[0], *garbage, *good[1:3], *garbage, *good[3:]]) + "\n")

    async def start(hub: PriceHub) -> Feed:
        feed = start_feed(f"csv:{path}@4", hub)
        assert feed is not None
        return feed

    await check_feed_skips_bad_input(start)


async def test_a_feed_that_publishes_after_close_fails_the_contract() -> None:
    """The suite can fail: a feed whose close() leaves its task running is caught."""

    class LeakyFeed(SimulatorFeed):
        async def close(self) -> None:
            pass  # never stops

    started: list[LeakyFeed] = []

    async def start(hub: PriceHub) -> Feed:
        feed = LeakyFeed(hub, always=True, ticks_per_second=500, interval=0.01)
        feed.start()
        started.append(feed)
        return feed

    try:
        with pytest.raises(AssertionError, match=r"feed contract stops_on_close: \d+ ticks"):
            await check_feed(start)
    finally:
        for feed in started:
            await SimulatorFeed.close(feed)
