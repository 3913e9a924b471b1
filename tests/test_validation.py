from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foliosync.sync.errors import InvalidName, InvalidNumber, InvalidSymbol, ValidationError
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.validation import (
    decimal_to_str,
    normalize_name,
    normalize_symbol,
    parse_decimal,
    parse_price,
    parse_quantity,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("AAPL", "AAPL"),
        ("brk.b", "BRK.B"),
        ("RDS-A", "RDS-A"),
        ("7203.T", "7203.T"),
        ("  msft ", "MSFT"),
        ("bf-b", "BF-B"),
    ],
)
def test_valid_symbols_are_upper_cased(raw: str, expected: str) -> None:
    assert normalize_symbol(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "   ", "A B", "TOO-LONG-SYMBOL-X", "$$$", "1234", "AAPL.", ".B", "A..B", "ÄPPL"],
)
def test_invalid_symbols_are_refused(raw: str) -> None:
    with pytest.raises(InvalidSymbol):
        normalize_symbol(raw)


@pytest.mark.parametrize("raw", [123, None, 1.5, b"AAPL", ["AAPL"]])
def test_a_symbol_that_is_not_text_is_refused(raw: object) -> None:
    with pytest.raises(InvalidSymbol):
        normalize_symbol(raw)


def test_validation_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        normalize_symbol("$$$")
    assert issubclass(InvalidNumber, ValidationError)


def test_exact_decimal_sum() -> None:
    total = parse_decimal("0.1") + parse_decimal("0.2")
    assert total == Decimal("0.3")
    assert decimal_to_str(total) == "0.3"


@pytest.mark.parametrize("value", [0.1, 1.0, 0.3, float("nan"), float("inf"), True])
def test_floats_and_bools_are_refused(value: object) -> None:
    with pytest.raises(InvalidNumber):
        parse_decimal(value)


@pytest.mark.parametrize(
    "value",
    [
        "NaN",
        "nan",
        "inf",
        "-Infinity",
        "sNaN",
        "abc",
        "",
        "1,5",
        "1e400",
        "1" + "0" * 19,  # 20 integer digits
        "0.0000000000001",  # 13 fractional digits
        10**19,
        None,
        [1],
    ],
)
def test_non_numbers_and_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(InvalidNumber):
        parse_decimal(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12.50", Decimal("12.50")),
        (" 3 ", Decimal(3)),
        ("1_000", Decimal(1000)),
        (7, Decimal(7)),
        (Decimal("0.000000000001"), Decimal("0.000000000001")),
        ("999999999999999999", Decimal("999999999999999999")),
        ("-4", Decimal(-4)),
    ],
)
def test_accepted_numbers(value: object, expected: Decimal) -> None:
    assert parse_decimal(value) == expected


def test_quantity_and_price_rules() -> None:
    with pytest.raises(InvalidNumber):
        parse_quantity("0")
    assert parse_quantity("-4") == Decimal(-4)
    assert parse_price("0") == Decimal(0)
    with pytest.raises(InvalidNumber):
        parse_price("-1")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("1E+2"), "100"),
        (Decimal("1.2300"), "1.23"),
        (Decimal("-0"), "0"),
        (Decimal("0.000"), "0"),
        (Decimal("-0.50"), "-0.5"),
        (Decimal("105"), "105"),
    ],
)
def test_decimal_to_str_is_canonical(value: Decimal, text: str) -> None:
    assert decimal_to_str(value) == text


@given(
    st.decimals(
        min_value=Decimal("-999999999999"),
        max_value=Decimal("999999999999"),
        places=6,
        allow_nan=False,
        allow_infinity=False,
    )
)
def test_decimal_text_round_trips_exactly(value: Decimal) -> None:
    assert parse_decimal(decimal_to_str(value)) == value


def test_names_collapse_white_space() -> None:
    assert normalize_name("  My   Tech\tStocks ") == "My Tech Stocks"
    for bad in ["", "   ", "x" * 101, 5]:
        with pytest.raises(InvalidName):
            normalize_name(bad)


def test_document_ids_ignore_case_and_spacing() -> None:
    wl = document_id(DocumentKind.WATCHLIST, "Tech")
    assert document_id(DocumentKind.WATCHLIST, " tech ") == wl
    assert document_id(DocumentKind.WATCHLIST, "TECH") == wl
    assert document_id(DocumentKind.WATCHLIST, "Tech  Two") == document_id(
        DocumentKind.WATCHLIST, "tech two"
    )
    assert document_id(DocumentKind.WATCHLIST, "Tech 2") != wl
    # a portfolio of the same name is another document
    assert document_id(DocumentKind.PORTFOLIO, "Tech") != wl
    assert document_id(DocumentKind.INDEX, "whatever") == "index"
