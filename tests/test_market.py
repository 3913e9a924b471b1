from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import holidays
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from foliosync.sync.errors import ConfigError, ValidationError
from foliosync.sync.market import NYSE, NYSECalendar, Session

NY = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
US = timedelta(microseconds=1)


def ny(year: int, month: int, day: int, hour: int = 0, minute: int = 0, *rest: int) -> datetime:
    return datetime(year, month, day, hour, minute, *rest, tzinfo=NY)


def d(text: str) -> date:
    return date.fromisoformat(text)


# Full-day weekday closures as published by the NYSE (observed days, not the nominal holidays).
PUBLISHED_CLOSURES = {
    2020: "01-01 01-20 02-17 04-10 05-25 07-03 09-07 11-26 12-25",
    2021: "01-01 01-18 02-15 04-02 05-31 07-05 09-06 11-25 12-24",
    2022: "01-17 02-21 04-15 05-30 06-20 07-04 09-05 11-24 12-26",
    2023: "01-02 01-16 02-20 04-07 05-29 06-19 07-04 09-04 11-23 12-25",
    2024: "01-01 01-15 02-19 03-29 05-27 06-19 07-04 09-02 11-28 12-25",
    2025: "01-01 01-09 01-20 02-17 04-18 05-26 06-19 07-04 09-01 11-27 12-25",
    2026: "01-01 01-19 02-16 04-03 05-25 06-19 07-03 09-07 11-26 12-25",
    2027: "01-01 01-18 02-15 03-26 05-31 06-18 07-05 09-06 11-25 12-24",
    2028: "01-17 02-21 04-14 05-29 06-19 07-04 09-04 11-23 12-25",
    2029: "01-01 01-15 02-19 03-30 05-28 06-19 07-04 09-03 11-22 12-25",
    2030: "01-01 01-21 02-18 04-19 05-27 06-19 07-04 09-02 11-28 12-25",
}

# 13:00 closes as published by the NYSE.
PUBLISHED_EARLY_CLOSES = {
    2020: "11-27 12-24",
    2021: "11-26",
    2022: "11-25",
    2023: "07-03 11-24",
    2024: "07-03 11-29 12-24",
    2025: "07-03 11-28 12-24",
    2026: "11-27 12-24",
    2027: "11-26",
    2028: "07-03 11-24",
    2029: "07-03 11-23 12-24",
    2030: "07-03 11-29 12-24",
}


def weekdays(year: int) -> list[date]:
    day, out = date(year, 1, 1), []
    while day.year == year:
        if day.weekday() < 5:
            out.append(day)
        day += timedelta(days=1)
    return out


def dates(year: int, text: str) -> set[date]:
    return {d(f"{year}-{md}") for md in text.split()}


@pytest.mark.parametrize("year", sorted(PUBLISHED_CLOSURES))
def test_weekday_closures_match_the_published_calendar(year: int) -> None:
    closed = {day for day in weekdays(year) if not NYSE.is_trading_day(day)}
    assert closed == dates(year, PUBLISHED_CLOSURES[year])


@pytest.mark.parametrize("year", sorted(PUBLISHED_EARLY_CLOSES))
def test_early_closes_match_the_published_calendar(year: int) -> None:
    early = set()
    for day in weekdays(year):
        s = NYSE.session(day)
        if s is not None and s.close.time() == time(13, 0):
            early.add(day)
    assert early == dates(year, PUBLISHED_EARLY_CLOSES[year])
    assert {day for day in weekdays(year) if NYSE.is_early_close(day)} == early


def test_early_close_rule_agrees_with_the_holidays_package_since_2004() -> None:
    # Two independent derivations of the same published practice.
    years = range(2004, 2031)
    package = set(holidays.financial_holidays("NYSE", years=years, categories=("half_day",)))
    ours = {day for year in years for day in weekdays(year) if NYSE.is_early_close(day)}
    assert ours == package


@pytest.mark.parametrize(
    "closed",
    ["2004-06-11", "2007-01-02", "2012-10-29", "2012-10-30", "2018-12-05", "2025-01-09"],
)
def test_one_off_closures(closed: str) -> None:
    day = d(closed)
    assert NYSE.session(day) is None
    assert not NYSE.is_open(datetime.combine(day, time(12), tzinfo=NY))
    assert NYSE.is_trading_day(day - timedelta(days=7))  # the same weekday is normally open


def test_extra_closures_close_a_day_without_touching_the_shared_calendar() -> None:
    announced = NYSECalendar(extra_closures=[d("2029-06-12")])
    assert announced.session(d("2029-06-12")) is None
    assert announced.next_open(ny(2029, 6, 11, 17)) == ny(2029, 6, 13, 9, 30)
    assert NYSE.session(d("2029-06-12")) == Session(ny(2029, 6, 12, 9, 30), ny(2029, 6, 12, 16))


def test_extra_closures_must_be_dates() -> None:
    with pytest.raises(ConfigError):
        NYSECalendar(extra_closures=[ny(2029, 6, 12)])


@pytest.mark.parametrize("year", [2015, 2020, 2026])
def test_no_early_close_on_july_2_when_july_3_is_the_observed_holiday(year: int) -> None:
    assert NYSE.session(date(year, 7, 3)) is None
    assert NYSE.session(date(year, 7, 2)) == Session(ny(year, 7, 2, 9, 30), ny(year, 7, 2, 16))


@pytest.mark.parametrize(
    ("day", "close"),
    [("2024-11-29", 13), ("2024-12-24", 13), ("2025-07-03", 13), ("2024-11-27", 16)],
)
def test_session_hours(day: str, close: int) -> None:
    x = d(day)
    s = NYSE.session(x)
    assert s == Session(
        datetime.combine(x, time(9, 30), tzinfo=NY), datetime.combine(x, time(close), tzinfo=NY)
    )


def test_weekends_are_closed() -> None:
    assert NYSE.session(d("2024-03-09")) is None
    assert NYSE.session(d("2024-03-10")) is None
    assert not NYSE.is_open(ny(2024, 3, 9, 12))


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (ny(2024, 3, 12, 9, 29, 59), False),
        (ny(2024, 3, 12, 9, 29, 59, 999999), False),
        (ny(2024, 3, 12, 9, 30), True),
        (ny(2024, 3, 12, 15, 59, 59), True),
        (ny(2024, 3, 12, 15, 59, 59, 999999), True),
        (ny(2024, 3, 12, 16), False),
        (ny(2024, 11, 29, 12, 59, 59), True),
        (ny(2024, 11, 29, 13), False),
        (ny(2024, 11, 29, 15), False),
    ],
)
def test_boundary_seconds(t: datetime, expected: bool) -> None:
    assert NYSE.is_open(t) is expected


@pytest.mark.parametrize(
    ("day", "open_utc", "close_utc"),
    [
        ("2024-03-08", "14:30", "21:00"),  # last Friday of standard time
        ("2024-03-11", "13:30", "20:00"),  # first Monday of daylight time
        ("2024-11-01", "13:30", "20:00"),
        ("2024-11-04", "14:30", "21:00"),
    ],
)
def test_sessions_follow_both_dst_switches(day: str, open_utc: str, close_utc: str) -> None:
    s = NYSE.session(d(day))
    assert s is not None
    assert s.open.astimezone(UTC) == datetime.fromisoformat(f"{day}T{open_utc}+00:00")
    assert s.close.astimezone(UTC) == datetime.fromisoformat(f"{day}T{close_utc}+00:00")
    utc_open = s.open.astimezone(UTC)
    assert not NYSE.is_open(utc_open - timedelta(seconds=1))
    assert NYSE.is_open(utc_open)


def test_other_time_zones_are_converted() -> None:
    # 2024-03-12 23:30 in Tokyo is 10:30 in New York the same day.
    assert NYSE.is_open(datetime(2024, 3, 12, 23, 30, tzinfo=TOKYO))
    # 2024-03-12 10:00 in Tokyo is 21:00 on the 11th in New York.
    assert not NYSE.is_open(datetime(2024, 3, 12, 10, tzinfo=TOKYO))
    assert NYSE.local_date(datetime(2024, 3, 12, 10, tzinfo=TOKYO)) == d("2024-03-11")
    assert NYSE.is_open(datetime(2024, 3, 12, 17, 0, tzinfo=timezone(timedelta(hours=3))))
    assert NYSE.next_open(datetime(2024, 3, 12, 10, tzinfo=TOKYO)) == ny(2024, 3, 12, 9, 30)


@pytest.mark.parametrize(
    ("t", "next_open", "next_close"),
    [
        # Friday evening -> Monday.
        (ny(2024, 3, 8, 17), ny(2024, 3, 11, 9, 30), ny(2024, 3, 11, 16)),
        # Saturday -> Monday.
        (ny(2024, 3, 9, 12), ny(2024, 3, 11, 9, 30), ny(2024, 3, 11, 16)),
        # In session: the next open is tomorrow's, the next close today's.
        (ny(2024, 3, 12, 10), ny(2024, 3, 13, 9, 30), ny(2024, 3, 12, 16)),
        (ny(2024, 3, 12, 9, 30), ny(2024, 3, 13, 9, 30), ny(2024, 3, 12, 16)),
        # Exactly at the close: closed, so both are the next session's.
        (ny(2024, 3, 12, 16), ny(2024, 3, 13, 9, 30), ny(2024, 3, 13, 16)),
        # Before the open.
        (ny(2024, 3, 12, 9, 29, 59), ny(2024, 3, 12, 9, 30), ny(2024, 3, 12, 16)),
        # Thursday before Good Friday -> Monday.
        (ny(2024, 3, 28, 16), ny(2024, 4, 1, 9, 30), ny(2024, 4, 1, 16)),
        # Around the Carter day of mourning.
        (ny(2025, 1, 8, 17), ny(2025, 1, 10, 9, 30), ny(2025, 1, 10, 16)),
        # Early close on Christmas Eve, then Christmas and a weekend.
        (ny(2026, 12, 24, 12), ny(2026, 12, 28, 9, 30), ny(2026, 12, 24, 13)),
        (ny(2026, 12, 24, 13), ny(2026, 12, 28, 9, 30), ny(2026, 12, 28, 16)),
        # New Year's Day 2022 fell on a Saturday: Friday Dec 31 trades.
        (ny(2021, 12, 30, 17), ny(2021, 12, 31, 9, 30), ny(2021, 12, 31, 16)),
    ],
)
def test_next_open_and_next_close(t: datetime, next_open: datetime, next_close: datetime) -> None:
    assert NYSE.next_open(t) == next_open
    assert NYSE.next_close(t) == next_close


@pytest.mark.parametrize(
    ("t", "last_close"),
    [
        (ny(2024, 3, 11, 9), ny(2024, 3, 8, 16)),
        (ny(2024, 3, 11, 10), ny(2024, 3, 8, 16)),
        (ny(2024, 3, 12, 16), ny(2024, 3, 12, 16)),
        (ny(2024, 3, 12, 15, 59, 59), ny(2024, 3, 11, 16)),
        (ny(2024, 12, 2, 9), ny(2024, 11, 29, 13)),
        (ny(2025, 1, 10, 9), ny(2025, 1, 8, 16)),
    ],
)
def test_last_close(t: datetime, last_close: datetime) -> None:
    assert NYSE.last_close(t) == last_close


def test_open_time_between_counts_only_sessions() -> None:
    # Thursday 15:00 to Saturday: one hour on Thursday and all of Friday.
    assert NYSE.open_time_between(ny(2024, 3, 7, 15), ny(2024, 3, 9, 12)) == timedelta(hours=7.5)
    # Across an early close and a holiday: Wed 15:00 -> Mon 10:00 after Thanksgiving 2024.
    assert NYSE.open_time_between(ny(2024, 11, 27, 15), ny(2024, 12, 2, 10)) == timedelta(
        hours=1 + 3.5, minutes=30
    )
    assert NYSE.open_time_between(ny(2024, 3, 12, 12), ny(2024, 3, 12, 11)) == timedelta()


def test_results_are_in_new_york_time() -> None:
    t = datetime(2024, 3, 8, 22, tzinfo=UTC)
    assert NYSE.next_open(t).tzinfo is NY
    assert NYSE.next_close(t).tzinfo is NY
    assert NYSE.last_close(t).tzinfo is NY


NAIVE = datetime(2024, 3, 12, 10)


@pytest.mark.parametrize(
    "call",
    [
        NYSE.is_open,
        NYSE.next_open,
        NYSE.next_close,
        NYSE.last_close,
        NYSE.session_at,
        NYSE.local_date,
        lambda t: NYSE.open_time_between(t, ny(2024, 3, 13)),
        lambda t: Session(t, t + timedelta(hours=1)),
    ],
)
def test_naive_datetimes_are_refused(call: Callable[[datetime], object]) -> None:
    with pytest.raises(ValidationError, match="no time zone"):
        call(NAIVE)


def test_session_wants_a_date_in_the_modelled_span() -> None:
    with pytest.raises(ValidationError, match="expected a date"):
        NYSE.session(ny(2024, 3, 12, 10))  # a datetime is a date subclass; refused all the same
    with pytest.raises(ValidationError, match="2004"):
        NYSE.session(d("2003-12-26"))
    with pytest.raises(ValidationError):
        NYSE.is_open(datetime(2100, 1, 4, 12, tzinfo=UTC))


def test_session_must_open_before_it_closes() -> None:
    with pytest.raises(ValidationError):
        Session(ny(2024, 3, 12, 16), ny(2024, 3, 12, 9, 30))


ZONES = st.sampled_from([UTC, NY, TOKYO, timezone(timedelta(hours=-3, minutes=-30))])
INSTANTS = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=ZONES
)


@settings(max_examples=150, deadline=None)
@given(INSTANTS)
def test_law_next_open_is_later_and_open(t: datetime) -> None:
    opening = NYSE.next_open(t)
    assert opening > t
    assert NYSE.is_open(opening)
    assert not NYSE.is_open(opening - US)


@settings(max_examples=150, deadline=None)
@given(INSTANTS)
def test_law_next_close_is_later_and_ends_a_session(t: datetime) -> None:
    closing = NYSE.next_close(t)
    assert closing > t
    assert not NYSE.is_open(closing)
    assert NYSE.is_open(closing - US)


@settings(max_examples=150, deadline=None)
@given(INSTANTS)
def test_law_open_means_inside_that_days_session(t: datetime) -> None:
    s = NYSE.session(NYSE.local_date(t))
    assert NYSE.is_open(t) == (s is not None and s.contains(t))
    assert (NYSE.session_at(t) is not None) == NYSE.is_open(t)


@settings(max_examples=150, deadline=None)
@given(INSTANTS)
def test_law_last_close_is_the_latest_close(t: datetime) -> None:
    closing = NYSE.last_close(t)
    assert closing <= t
    assert NYSE.is_open(closing - US)
    if not NYSE.is_open(t):
        # Closed since then: no session opened in between.
        assert NYSE.next_open(closing) > t
        assert NYSE.open_time_between(closing, t) == timedelta()


@settings(max_examples=100, deadline=None)
@given(INSTANTS, st.timedeltas(min_value=timedelta(), max_value=timedelta(days=10)), st.data())
def test_law_open_time_is_additive(t: datetime, span: timedelta, data: st.DataObject) -> None:
    end = t + span
    middle = t + data.draw(st.timedeltas(min_value=timedelta(), max_value=span))
    total = NYSE.open_time_between(t, end)
    assert total == NYSE.open_time_between(t, middle) + NYSE.open_time_between(middle, end)
    assert timedelta() <= total <= span
