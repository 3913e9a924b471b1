from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foliosync.sync.errors import ConfigError, ValidationError
from foliosync.sync.freshness import (
    DEFAULT_THRESHOLDS,
    Freshness,
    FreshnessLevel,
    FreshnessThresholds,
    document_freshness,
    format_duration,
    price_freshness,
)
from foliosync.sync.market import NYSECalendar

NY = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
US = timedelta(microseconds=1)

# Tuesday 2024-03-12, mid-session: the injected "now" for in-session cases.
NOW = datetime(2024, 3, 12, 12, 0, tzinfo=NY)
SATURDAY_NOON = datetime(2024, 3, 9, 12, 0, tzinfo=NY)


def ny(year: int, month: int, day: int, hour: int = 0, minute: int = 0, *rest: int) -> datetime:
    return datetime(year, month, day, hour, minute, *rest, tzinfo=NY)


def test_level_values() -> None:
    assert [level.value for level in FreshnessLevel] == ["live", "fresh", "stale", "outdated"]


def test_friday_closing_price_seen_on_saturday_is_current() -> None:
    result = price_freshness(ny(2024, 3, 8, 15, 59, 30), SATURDAY_NOON)
    assert result.level is FreshnessLevel.LIVE
    assert result.age == timedelta(seconds=30)
    assert "market closed until Mon 2024-03-11 09:30 EDT" in result.reason


@pytest.mark.parametrize("price_time", [ny(2024, 3, 8, 16), ny(2024, 3, 8, 17, 30)])
def test_a_price_at_or_after_the_close_is_the_closing_price(price_time: datetime) -> None:
    result = price_freshness(price_time, SATURDAY_NOON)
    assert result == Freshness(
        FreshnessLevel.LIVE,
        timedelta(),
        "closing price, market closed until Mon 2024-03-11 09:30 EDT",
    )


def test_thursday_price_seen_on_saturday_is_outdated() -> None:
    result = price_freshness(ny(2024, 3, 7, 15), SATURDAY_NOON)
    assert result.level is FreshnessLevel.OUTDATED
    assert result.age == timedelta(hours=7.5)  # an hour on Thursday and all of Friday
    assert result.reason.startswith("7 h 30 min of trading since this price")


def test_late_friday_price_is_stale_over_the_weekend() -> None:
    result = price_freshness(ny(2024, 3, 8, 15, 50), SATURDAY_NOON)
    assert result.level is FreshnessLevel.STALE
    assert result.reason.startswith("last price 10 min before the close")


def test_closing_price_after_the_open_counts_trading_time_only() -> None:
    result = price_freshness(ny(2024, 3, 8, 16), ny(2024, 3, 11, 9, 32))
    assert result.level is FreshnessLevel.FRESH
    assert result.age == timedelta(minutes=2)
    assert result.reason == "price from before today's open, 2 min of trading since"


def test_a_closed_day_does_not_age_a_price() -> None:
    # Wednesday close -> Friday open, across the 2025-01-09 day of mourning.
    result = price_freshness(ny(2025, 1, 8, 15, 59), ny(2025, 1, 10, 9, 30, 30))
    assert result.age == timedelta(seconds=90)
    assert result.level is FreshnessLevel.FRESH


def test_the_calendar_is_injectable() -> None:
    price, seen = ny(2029, 6, 11, 15, 59), ny(2029, 6, 13, 9, 30, 30)
    assert price_freshness(price, seen).level is FreshnessLevel.OUTDATED
    closed_tuesday = NYSECalendar(extra_closures=[date(2029, 6, 12)])
    assert price_freshness(price, seen, calendar=closed_tuesday).level is FreshnessLevel.FRESH


@pytest.mark.parametrize(
    ("age", "level"),
    [
        (timedelta(), FreshnessLevel.LIVE),
        (timedelta(minutes=1), FreshnessLevel.LIVE),
        (timedelta(minutes=1) + US, FreshnessLevel.FRESH),
        (timedelta(minutes=5), FreshnessLevel.FRESH),
        (timedelta(minutes=5) + US, FreshnessLevel.STALE),
        (timedelta(minutes=15), FreshnessLevel.STALE),
        (timedelta(minutes=15) + US, FreshnessLevel.OUTDATED),
        (timedelta(hours=2), FreshnessLevel.OUTDATED),
    ],
)
def test_threshold_boundaries_in_session(age: timedelta, level: FreshnessLevel) -> None:
    result = price_freshness(NOW - age, NOW)
    assert result.level is level
    assert result.age == age
    assert DEFAULT_THRESHOLDS.level_for(age) is level


def test_in_session_reason() -> None:
    assert price_freshness(NOW - timedelta(minutes=3, seconds=20), NOW).reason == (
        "updated 3 min ago"
    )
    assert price_freshness(NOW, NOW).reason == "updated just now"


def test_custom_thresholds() -> None:
    tight = FreshnessThresholds(
        live=timedelta(seconds=5), fresh=timedelta(seconds=30), stale=timedelta(minutes=1)
    )
    age = timedelta(seconds=45)
    assert price_freshness(NOW - age, NOW, thresholds=tight).level is FreshnessLevel.STALE
    assert price_freshness(NOW - age, NOW).level is FreshnessLevel.LIVE


def test_other_time_zones() -> None:
    price = datetime(2024, 3, 12, 15, 58, tzinfo=UTC)  # 11:58 in New York
    seen = datetime(2024, 3, 13, 1, 0, tzinfo=TOKYO)  # 12:00 in New York
    assert price_freshness(price, seen).age == timedelta(minutes=2)


def test_a_price_from_the_future_counts_as_new() -> None:
    result = price_freshness(NOW + timedelta(seconds=3), NOW)
    assert result.level is FreshnessLevel.LIVE
    assert result.age == timedelta()


def test_a_very_old_price_is_outdated_with_its_wall_age() -> None:
    price = NOW - timedelta(days=40)
    result = price_freshness(price, NOW)
    assert result.level is FreshnessLevel.OUTDATED
    assert result.age == timedelta(days=40)
    assert result.reason == "price from 2024-02-01"


@pytest.mark.parametrize(
    ("price_time", "now"),
    [(datetime(2024, 3, 12, 11), NOW), (NOW, datetime(2024, 3, 12, 12))],
)
def test_price_freshness_refuses_naive_datetimes(price_time: datetime, now: datetime) -> None:
    with pytest.raises(ValidationError, match="no time zone"):
        price_freshness(price_time, now)


def test_document_never_synced() -> None:
    result = document_freshness(None, NOW, pending=2)
    assert result == Freshness(FreshnessLevel.OUTDATED, None, "never synced", 2)
    assert result.describe() == "outdated — never synced, 2 changes not yet synced"


@pytest.mark.parametrize(
    ("age", "pending", "text"),
    [
        (timedelta(minutes=2), 3, "fresh — synced 2 min ago, 3 changes not yet synced"),
        (timedelta(minutes=2), 1, "fresh — synced 2 min ago, 1 change not yet synced"),
        (timedelta(seconds=20), 0, "live — synced 20 s ago"),
        (timedelta(minutes=10), 0, "stale — synced 10 min ago"),
        (timedelta(hours=3, minutes=5), 0, "outdated — synced 3 h 5 min ago"),
    ],
)
def test_document_freshness_describe(age: timedelta, pending: int, text: str) -> None:
    result = document_freshness(NOW - age, NOW, pending)
    assert result.age == age
    assert result.pending == pending
    assert result.describe() == text


def test_document_age_is_wall_time_even_with_the_market_closed() -> None:
    result = document_freshness(SATURDAY_NOON - timedelta(minutes=20), SATURDAY_NOON, 0)
    assert result.level is FreshnessLevel.OUTDATED


def test_document_synced_in_the_future_counts_as_just_synced() -> None:
    result = document_freshness(NOW + timedelta(seconds=2), NOW, 0)
    assert (result.level, result.age, result.reason) == (
        FreshnessLevel.LIVE,
        timedelta(),
        "synced just now",
    )


@pytest.mark.parametrize("pending", [-1, True, 1.0, "3"])
def test_document_pending_must_be_a_count(pending: object) -> None:
    with pytest.raises(ValidationError, match="pending"):
        document_freshness(NOW, NOW, pending)  # type: ignore[arg-type]


def test_document_freshness_refuses_naive_datetimes() -> None:
    with pytest.raises(ValidationError):
        document_freshness(datetime(2024, 3, 12, 11), NOW, 0)
    with pytest.raises(ValidationError):
        document_freshness(None, datetime(2024, 3, 12, 11), 0)


def test_threshold_defaults() -> None:
    defaults = FreshnessThresholds()
    assert (defaults.live, defaults.fresh, defaults.stale) == (
        timedelta(minutes=1),
        timedelta(minutes=5),
        timedelta(minutes=15),
    )
    assert defaults == DEFAULT_THRESHOLDS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"live": timedelta()},
        {"live": timedelta(seconds=-1)},
        {"live": timedelta(minutes=5)},  # equal to fresh
        {"fresh": timedelta(minutes=20)},  # above stale
        {"stale": timedelta(minutes=4)},
        {"fresh": 300},
    ],
)
def test_threshold_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        FreshnessThresholds(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("span", "text"),
    [
        (timedelta(seconds=59.9), "59 s"),
        (timedelta(minutes=1), "1 min"),
        (timedelta(minutes=59, seconds=59), "59 min"),
        (timedelta(hours=2), "2 h"),
        (timedelta(hours=2, minutes=5), "2 h 5 min"),
        (timedelta(days=3), "3 d"),
        (timedelta(days=3, hours=4, minutes=1), "3 d 4 h"),
        (timedelta(seconds=-5), "0 s"),
    ],
)
def test_format_duration(span: timedelta, text: str) -> None:
    assert format_duration(span) == text


INSTANTS = st.datetimes(
    min_value=datetime(2020, 1, 1),
    max_value=datetime(2030, 12, 31),
    timezones=st.sampled_from([UTC, NY, TOKYO]),
)


@settings(max_examples=100, deadline=None)
@given(INSTANTS, st.timedeltas(min_value=timedelta(), max_value=timedelta(days=40)))
def test_law_market_age_never_exceeds_wall_age(now: datetime, wall: timedelta) -> None:
    result = price_freshness(now - wall, now)
    assert result.age is not None
    assert timedelta() <= result.age <= wall
    assert result.level is DEFAULT_THRESHOLDS.level_for(result.age)


AGES = st.timedeltas(min_value=timedelta(), max_value=timedelta(days=2))


@given(AGES, AGES)
def test_law_levels_never_improve_with_age(a: timedelta, extra: timedelta) -> None:
    order = list(FreshnessLevel)
    older = a + extra
    assert order.index(DEFAULT_THRESHOLDS.level_for(a)) <= order.index(
        DEFAULT_THRESHOLDS.level_for(older)
    )
