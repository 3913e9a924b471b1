"""Price feeds: the simulator (deterministic, market hours) and the CSV replay, and their specs."""

from __future__ import annotations

import asyncio
import itertools
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from foliosync.server.feeds import (
    DEFAULT_SYMBOLS,
    CsvReplayFeed,
    CsvTickRow,
    SimulatorFeed,
    parse_timestamp,
    read_tick_rows,
    start_feed,
)
from foliosync.server.prices import PriceHub
from foliosync.sync.errors import ConfigError, ValidationError
from foliosync.sync.prices import PricePoint


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


OPEN = ms("2024-06-10T14:00:00+00:00")  # Monday 10:00 in New York: in session
SATURDAY = ms("2024-06-08T15:00:00+00:00")
FRIDAY_CLOSE = ms("2024-06-07T20:00:00+00:00")  # 16:00 in New York


def hub_at(now_ms: int) -> PriceHub:
    return PriceHub(clock_ms=lambda: now_ms)


class Follower:
    def __init__(self, hub: PriceHub) -> None:
        self.hub = hub

    def deliver_prices(self, points: list[PricePoint]) -> None:
        pass


def path_of(feed: SimulatorFeed, symbol: str, now_ms: int, steps: int) -> list[Decimal]:
    prices = []
    for i in range(steps):
        for tick in feed.step(now_ms + i * 100, moves=len(feed.universe())):
            if tick.symbol == symbol:
                prices.append(tick.price)
    return prices


# -- the simulator -------------------------------------------------------------------------------


def test_the_simulator_is_deterministic_for_a_seed() -> None:
    a = path_of(SimulatorFeed(hub_at(OPEN), seed=3), "AAPL", OPEN, 30)
    b = path_of(SimulatorFeed(hub_at(OPEN), seed=3), "AAPL", OPEN, 30)
    c = path_of(SimulatorFeed(hub_at(OPEN), seed=4), "AAPL", OPEN, 30)
    assert len(a) == 31  # the first price, then one move per step
    assert a == b
    assert a != c
    assert len(set(a)) > 5, "the walk should move"


def test_a_symbols_path_does_not_depend_on_the_other_symbols() -> None:
    alone = SimulatorFeed(hub_at(OPEN), seed=3, symbols=["AAPL"])
    crowd_hub = hub_at(OPEN)
    crowd = SimulatorFeed(crowd_hub, seed=3)
    crowd_hub.subscribe(Follower(crowd_hub), ["ZZZZ", "ABCD"])  # followed symbols join too
    assert {"AAPL", "ZZZZ", "ABCD"} <= set(crowd.universe())
    assert path_of(alone, "AAPL", OPEN, 25) == path_of(crowd, "AAPL", OPEN, 25)


def test_prices_are_positive_cents_and_volatility_differs_by_symbol() -> None:
    hub = hub_at(OPEN)
    feed = SimulatorFeed(hub, seed=1)
    moves: dict[str, list[float]] = {}
    for i in range(400):
        for tick in feed.step(OPEN + i, moves=len(DEFAULT_SYMBOLS)):
            assert tick.price > 0
            assert tick.price == tick.price.quantize(Decimal("0.01"))
            moves.setdefault(tick.symbol, []).append(float(tick.price))
    assert set(moves) == set(DEFAULT_SYMBOLS)
    assert len(hub.book) == len(DEFAULT_SYMBOLS)

    def spread(prices: list[float]) -> float:
        changes = [abs(b / a - 1) for a, b in itertools.pairwise(prices)]
        return sum(changes) / len(changes)

    spreads = sorted(spread(p) for p in moves.values())
    assert spreads[-1] > 2 * spreads[0]


def test_the_rate_is_spread_over_time() -> None:
    hub = hub_at(OPEN)
    feed = SimulatorFeed(hub, ticks_per_second=20)
    first = feed.step(OPEN)
    assert len(first) == len(DEFAULT_SYMBOLS)  # the initial prices, no moves yet
    moved = sum(len(feed.step(OPEN + i * 100)) for i in range(1, 11))
    assert moved == 20  # one second at 20 ticks per second
    assert len(feed.step(OPEN + 3_600_000)) <= 20  # a long pause: no burst


def test_a_closed_market_shows_the_last_close_and_does_not_move() -> None:
    hub = hub_at(SATURDAY)
    assert not hub.market_open()
    feed = SimulatorFeed(hub)
    first = feed.step(SATURDAY)
    assert first and {t.time_ms for t in first} == {FRIDAY_CLOSE}
    book_before = {p.symbol: p for p in hub.book.snapshot(hub.book.symbols())}
    for i in range(1, 20):
        assert feed.step(SATURDAY + i * 100, moves=40) == []
    assert {p.symbol: p for p in hub.book.snapshot(hub.book.symbols())} == book_before


def test_sim_always_moves_outside_market_hours() -> None:
    hub = hub_at(SATURDAY)
    feed = SimulatorFeed(hub, always=True)
    first = feed.step(SATURDAY)
    assert {t.time_ms for t in first} == {SATURDAY}
    assert len(feed.step(SATURDAY + 100, moves=7)) == 7


def test_a_newly_followed_symbol_gets_a_price_at_once() -> None:
    hub = hub_at(SATURDAY)
    feed = SimulatorFeed(hub)
    feed.step(SATURDAY)
    assert hub.book.latest("ACME") is None
    hub.subscribe(Follower(hub), ["ACME"])
    ticks = feed.step(SATURDAY + 100)
    assert [t.symbol for t in ticks] == ["ACME"]
    latest = hub.book.latest("ACME")
    assert latest is not None and latest.time_ms == FRIDAY_CLOSE and latest.price > 0


async def test_the_simulator_task_publishes_and_closes() -> None:
    hub = PriceHub()
    feed = start_feed("sim:always", hub)
    assert isinstance(feed, SimulatorFeed)
    try:
        for _ in range(100):
            if hub.ticks_in > len(DEFAULT_SYMBOLS):
                break
            await asyncio.sleep(0.02)
        assert hub.ticks_in > len(DEFAULT_SYMBOLS)  # initial prices, then moves
    finally:
        await feed.close()
    assert not feed.running
    await feed.close()  # twice is fine


# -- CSV -----------------------------------------------------------------------------------------


def test_timestamps_in_epoch_ms_and_iso_8601() -> None:
    assert parse_timestamp("1718026200000") == 1718026200000
    assert parse_timestamp("2024-06-10T13:30:00Z") == 1718026200000
    assert parse_timestamp("2024-06-10T09:30:00.250-04:00") == 1718026200250
    with pytest.raises(ValidationError, match="no UTC offset"):
        parse_timestamp("2024-06-10T09:30:00")
    with pytest.raises(ValidationError, match="neither"):
        parse_timestamp("yesterday")


def test_rows_with_a_header_in_any_order_and_bad_rows_by_line() -> None:
    text = [
        "symbol,price,timestamp\n",
        "AAPL,187.25,1718026200000\n",
        "\n",
        "# a comment\n",
        "MSFT,421.5,not-a-time\n",
        "NVDA,120,2024-06-10T13:30:00Z\n",
        "short\n",
    ]
    rows = list(read_tick_rows(text))
    assert [line for line, _ in rows] == [2, 5, 6, 7]
    assert rows[0][1] == CsvTickRow(2, 1718026200000, "AAPL", "187.25")
    assert isinstance(rows[1][1], str) and "not-a-time" in rows[1][1]
    assert not isinstance(rows[2][1], str) and rows[2][1].symbol == "NVDA"
    assert isinstance(rows[3][1], str)


def write_csv(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "ticks.csv"
    path.write_text("".join(line + "\n" for line in lines))
    return path


async def test_csv_replay_at_max_publishes_good_rows_and_logs_bad_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = 1_718_026_200_000
    lines = ["timestamp,symbol,price,size"]
    lines += [f"{base + i * 1000},AAPL,{100 + i}.50,10" for i in range(600)]
    lines.insert(3, f"{base},AAPL,-5,10")  # line 4: negative price
    lines.insert(6, "garbage")  # line 7: not a row
    lines.insert(9, f"{base},not a symbol,1")  # line 10
    path = write_csv(tmp_path, lines)
    hub = PriceHub()
    caplog.set_level(logging.WARNING, logger="foliosync.feeds")
    feed = start_feed(f"csv:{path}@max", hub)
    assert isinstance(feed, CsvReplayFeed)
    await asyncio.wait_for(feed.wait(), 10)
    assert (feed.published, feed.skipped) == (600, 3)
    assert hub.ticks_in == 600
    latest = hub.book.latest("AAPL")
    assert latest is not None and latest.price == Decimal("699.50") and latest.seq == 600
    assert latest.size == Decimal(10)
    now = hub.book.latest("AAPL").time_ms  # type: ignore[union-attr]
    assert abs(now - datetime.now(UTC).timestamp() * 1000) < 60_000  # re-stamped to now
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert [m.split(" line ")[1].split(":")[0] for m in skipped] == ["4", "7", "10"]
    assert "positive" in skipped[0]


async def test_csv_replay_keeps_the_recorded_pace_divided_by_speed(tmp_path: Path) -> None:
    base = 1_718_026_200_000
    path = write_csv(tmp_path, [f"{base + i * 1000},MSFT,{400 + i}" for i in range(4)])
    hub = PriceHub()
    loop = asyncio.get_running_loop()
    started = loop.time()
    feed = start_feed(f"csv:{path}@10", hub)  # 3 recorded seconds in 0.3 s
    assert feed is not None
    await asyncio.wait_for(feed.wait(), 5)  # type: ignore[attr-defined]
    elapsed = loop.time() - started
    assert 0.25 <= elapsed < 2.0
    assert hub.book.latest("MSFT").price == Decimal(403)  # type: ignore[union-attr]


# -- specs ---------------------------------------------------------------------------------------


async def test_feed_specs(tmp_path: Path) -> None:
    hub = PriceHub()
    assert start_feed("none", hub) is None
    path = write_csv(tmp_path, ["1718026200000,AAPL,1"])
    for spec in ("sim", "sim:always", f"csv:{path}", f"csv:{path}@2.5", f"csv:{path}@MAX"):
        feed = start_feed(spec, hub)
        assert feed is not None, spec
        await feed.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("random", "unknown price feed"),
        ("sim:sometimes", "unknown price feed"),
        ("csv:", "needs a file"),
        ("csv:/no/such/file.csv", "does not exist"),
        ("csv:{path}@fast", "invalid replay speed"),
        ("csv:{path}@0", "positive"),
        ("csv:{path}@-2", "positive"),
    ],
)
async def test_bad_feed_specs_are_config_errors(tmp_path: Path, spec: str, message: str) -> None:
    path = write_csv(tmp_path, ["1718026200000,AAPL,1"])
    with pytest.raises(ConfigError, match=message):
        start_feed(spec.format(path=path), PriceHub())
