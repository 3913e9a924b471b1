from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foliosync.sync.errors import ConfigError, InvalidNumber, ValidationError
from foliosync.sync.refresh_policy import (
    DEFAULT_POLICY,
    DEFAULT_POLL_RULES,
    DEFAULT_PUSH_RULES,
    DataKind,
    RefreshContext,
    RefreshPolicy,
    RefreshRule,
    context_for,
    is_volatile,
)

NY = ZoneInfo("America/New_York")
S = timedelta(seconds=1)
MIN = timedelta(minutes=1)
ALL_CONTEXTS = [
    RefreshContext(market_open=o, volatile=v, event_day=e)
    for o, v, e in itertools.product([True, False], repeat=3)
]


def ctx(market_open: bool, volatile: bool = False, event_day: bool = False) -> RefreshContext:
    return RefreshContext(market_open=market_open, volatile=volatile, event_day=event_day)


@pytest.mark.parametrize(
    ("context", "interval"),
    [
        (ctx(True, volatile=True), 30 * S),
        (ctx(True, volatile=True, event_day=True), 30 * S),
        (ctx(True, event_day=True), MIN),
        (ctx(False, event_day=True), MIN),  # earnings land outside the session
        (ctx(False, volatile=True, event_day=True), MIN),
        (ctx(False), 15 * MIN),
        (ctx(False, volatile=True), 15 * MIN),
        (ctx(True), MIN),
    ],
)
def test_poll_interval_for_the_current_price(context: RefreshContext, interval: timedelta) -> None:
    assert DEFAULT_POLICY.poll_interval(DataKind.CURRENT_PRICE, context) == interval


@pytest.mark.parametrize(
    ("kind", "interval"),
    [(DataKind.INTRADAY_BARS, 15 * MIN), (DataKind.NEWS, 5 * MIN), (DataKind.INDICATORS, 60 * MIN)],
)
@pytest.mark.parametrize("context", ALL_CONTEXTS)
def test_poll_interval_for_other_kinds_ignores_the_context(
    kind: DataKind, interval: timedelta, context: RefreshContext
) -> None:
    assert DEFAULT_POLICY.poll_interval(kind, context) == interval


@pytest.mark.parametrize("kind", list(DataKind))
@pytest.mark.parametrize(
    ("context", "window"),
    [
        (ctx(True, volatile=True), timedelta(milliseconds=250)),
        (ctx(True, volatile=True, event_day=True), timedelta(milliseconds=250)),
        (ctx(True), S),
        (ctx(True, event_day=True), S),
        (ctx(False), 5 * S),
        (ctx(False, volatile=True), 5 * S),
        (ctx(False, event_day=True), 5 * S),
    ],
)
def test_push_window(kind: DataKind, context: RefreshContext, window: timedelta) -> None:
    assert DEFAULT_POLICY.push_window(kind, context) == window


def test_default_policy_uses_the_default_tables() -> None:
    assert RefreshPolicy().poll_rules == DEFAULT_POLL_RULES
    assert RefreshPolicy().push_rules == DEFAULT_PUSH_RULES


def test_custom_table_first_match_wins() -> None:
    battery_saver = RefreshPolicy(
        poll_rules=[
            RefreshRule(None, 30 * MIN, market_open=False),
            RefreshRule(DataKind.CURRENT_PRICE, 5 * MIN),
            RefreshRule(None, 60 * MIN),
        ]
    )
    assert battery_saver.poll_interval(DataKind.CURRENT_PRICE, ctx(True, volatile=True)) == 5 * MIN
    assert battery_saver.poll_interval(DataKind.CURRENT_PRICE, ctx(False)) == 30 * MIN
    assert battery_saver.poll_interval(DataKind.NEWS, ctx(True)) == 60 * MIN
    assert battery_saver.poll_interval(DataKind.NEWS, ctx(False)) == 30 * MIN
    # The push table was not replaced.
    assert battery_saver.push_window(DataKind.CURRENT_PRICE, ctx(True)) == S
    assert isinstance(battery_saver.poll_rules, tuple)


def test_a_table_without_a_fallback_for_a_kind_is_refused() -> None:
    rules = [rule for rule in DEFAULT_POLL_RULES if rule.kind is not DataKind.NEWS]
    with pytest.raises(ConfigError, match=r"no fallback rule .* news"):
        RefreshPolicy(poll_rules=rules)
    # A conditional row is not a fallback.
    with pytest.raises(ConfigError, match=r"no fallback rule .* news"):
        RefreshPolicy(poll_rules=[*rules, RefreshRule(DataKind.NEWS, MIN, market_open=True)])
    with pytest.raises(ConfigError, match="push_rules"):
        RefreshPolicy(push_rules=[RefreshRule(None, S, market_open=True)])


def test_a_row_that_can_never_apply_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"push_rules\[1\] can never apply"):
        RefreshPolicy(
            push_rules=[
                RefreshRule(None, S, market_open=True),
                RefreshRule(DataKind.NEWS, 5 * S, market_open=True, volatile=True),
                RefreshRule(None, 5 * S),
            ]
        )
    with pytest.raises(ConfigError, match=r"poll_rules\[1\]"):
        RefreshPolicy(poll_rules=[RefreshRule(None, MIN), RefreshRule(DataKind.NEWS, S)])


@pytest.mark.parametrize(
    "make",
    [
        lambda: RefreshRule(DataKind.NEWS, timedelta()),
        lambda: RefreshRule(DataKind.NEWS, -S),
        lambda: RefreshRule(DataKind.NEWS, 60),
        lambda: RefreshRule("news", MIN),
        lambda: RefreshRule(DataKind.NEWS, MIN, market_open="yes"),
        lambda: RefreshPolicy(poll_rules=[*DEFAULT_POLL_RULES, "not a rule"]),
        lambda: RefreshPolicy(poll_rules="rules"),
    ],
)
def test_invalid_rows_and_tables_are_refused(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]


def test_lookups_refuse_bad_arguments() -> None:
    with pytest.raises(ValidationError):
        DEFAULT_POLICY.poll_interval("current_price", ctx(True))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        DEFAULT_POLICY.push_window(DataKind.NEWS, {"market_open": True})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        ([], False),
        ([Decimal("100")], False),
        ([Decimal("100"), Decimal("100.5"), Decimal("100.2")], False),
        ([Decimal("100"), Decimal("102")], True),  # 2 / 102
        ([Decimal("101"), Decimal("100")], False),  # 1 / 100 is not above 1 %
        ([Decimal("100"), Decimal("101")], False),  # 1 / 101
        ([Decimal("100"), Decimal("101.2")], True),  # 1.2 / 101.2 > 1 %
        ([100.0, 99.0, 98.5], True),  # 1.5 / 98.5
        ([Decimal("50"), 50.25, 50], False),
    ],
)
def test_is_volatile(prices: list[Decimal | float], expected: bool) -> None:
    assert is_volatile(prices) is expected


def test_is_volatile_threshold() -> None:
    prices = [Decimal("100"), Decimal("100.3")]
    assert is_volatile(prices, threshold=Decimal("0.002"))
    assert not is_volatile(prices, threshold=0.005)


@pytest.mark.parametrize(
    "prices",
    [
        [Decimal("0"), Decimal("1")],
        [Decimal("-1"), 2.0],
        [float("nan"), 1.0],
        [1.0, True],
        ["1", 2],
    ],
)
def test_is_volatile_refuses_bad_prices(prices: list[object]) -> None:
    with pytest.raises(InvalidNumber):
        is_volatile(prices)  # type: ignore[arg-type]


@pytest.mark.parametrize("threshold", [0, -0.01, float("inf"), Decimal("NaN"), "0.01"])
def test_is_volatile_refuses_bad_thresholds(threshold: object) -> None:
    with pytest.raises(ConfigError):
        is_volatile([1.0, 2.0], threshold)  # type: ignore[arg-type]


@given(
    st.lists(st.integers(min_value=1, max_value=10**6), min_size=2, max_size=20),
    st.integers(min_value=1, max_value=1000),
)
def test_law_volatility_is_scale_free(prices: list[int], factor: int) -> None:
    as_decimals = [Decimal(p) for p in prices]
    scaled = [Decimal(p * factor) for p in prices]
    assert is_volatile(as_decimals) == is_volatile(scaled)


def test_context_for_in_a_volatile_session_on_an_event_day() -> None:
    t = datetime(2024, 3, 12, 14, 0, tzinfo=UTC)  # 10:00 in New York
    result = context_for([100.0, 103.0], t, event_days={date(2024, 3, 12)})
    assert result == RefreshContext(market_open=True, volatile=True, event_day=True)
    assert DEFAULT_POLICY.poll_interval(DataKind.CURRENT_PRICE, result) == 30 * S


def test_context_for_uses_the_exchange_date() -> None:
    # 02:00 UTC on the 12th is still the evening of the 11th in New York: after the close.
    t = datetime(2024, 3, 12, 2, 0, tzinfo=UTC)
    result = context_for([Decimal("10")], t, event_days={date(2024, 3, 11)})
    assert result == RefreshContext(market_open=False, volatile=False, event_day=True)
    assert not context_for([], t, event_days={date(2024, 3, 12)}).event_day
    assert DEFAULT_POLICY.poll_interval(DataKind.CURRENT_PRICE, result) == MIN


def test_context_for_refuses_a_naive_time() -> None:
    with pytest.raises(ValidationError):
        context_for([], datetime(2024, 3, 12, 10))
