"""Validation of what users type: symbols, names, quantities and prices.

Everything is checked here, before pycrdt sees a value: pycrdt keeps every number as a float64 and
panics on some integers, so money and quantities enter the documents only as canonical decimal
strings produced by :func:`parse_decimal`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from foliosync.sync.errors import InvalidName, InvalidNumber, InvalidSymbol

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_NOTE_LENGTH",
    "decimal_to_str",
    "is_symbol",
    "normalize_name",
    "normalize_note",
    "normalize_symbol",
    "parse_decimal",
    "parse_price",
    "parse_quantity",
]

MAX_NAME_LENGTH = 100
MAX_NOTE_LENGTH = 1000
# Root ticker, then an optional class or exchange suffix: AAPL, BRK.B, RDS-A, 7203.T, BF-B.
_SYMBOL = re.compile(r"^[A-Z0-9]{1,10}(?:[.\-][A-Z0-9]{1,6})?$")
_LETTER = re.compile(r"[A-Z]")
# Exact decimals only, at most 18 integer and 12 fractional digits: room for any real quantity
# or price, and small enough that no arithmetic on them can overflow Decimal's precision.
_MAX_INT_DIGITS = 18
_MAX_FRAC_DIGITS = 12


def is_symbol(text: str) -> bool:
    """Whether ``text`` is already a canonical symbol (the cheap check for stored values)."""
    return _SYMBOL.match(text) is not None and _LETTER.search(text) is not None


def normalize_symbol(symbol: object) -> str:
    """Return the canonical (upper-case) form of a ticker symbol, or raise InvalidSymbol."""
    if not isinstance(symbol, str):
        raise InvalidSymbol(f"a symbol must be text, not {type(symbol).__name__}")
    candidate = symbol.strip().upper()
    if not _SYMBOL.match(candidate) or not _LETTER.search(candidate):
        shown = symbol if len(symbol) <= 40 else symbol[:40] + "…"
        raise InvalidSymbol(
            f"invalid symbol {shown!r}: expected letters and digits with an optional "
            "class or exchange suffix, such as AAPL, BRK.B or RDS-A"
        )
    return candidate


def normalize_name(name: object) -> str:
    """Collapse white space in a document name and check its length."""
    if not isinstance(name, str):
        raise InvalidName(f"a name must be text, not {type(name).__name__}")
    cleaned = " ".join(name.split())
    if not cleaned:
        raise InvalidName("a name cannot be empty")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise InvalidName(f"a name has at most {MAX_NAME_LENGTH} characters")
    if any(ord(c) < 32 for c in cleaned):
        raise InvalidName("a name cannot contain control characters")
    return cleaned


def normalize_note(note: object) -> str | None:
    """A note is free text up to MAX_NOTE_LENGTH characters; empty means no note."""
    if note is None:
        return None
    if not isinstance(note, str):
        raise InvalidName(f"a note must be text, not {type(note).__name__}")
    if len(note) > MAX_NOTE_LENGTH:
        raise InvalidName(f"a note has at most {MAX_NOTE_LENGTH} characters")
    return note or None


def parse_decimal(value: object, what: str = "number") -> Decimal:
    """Parse an exact decimal from text, an int or a Decimal.

    Floats are refused: a binary float such as 0.1 is not the number the user typed, and
    accepting it would bring exactly the rounding errors this module exists to keep out.
    """
    if isinstance(value, (bool, float)):
        raise InvalidNumber(f"{what} must be given as text or an integer, not a binary float")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, Decimal):
        number = value
    elif isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            number = Decimal(text)
        except InvalidOperation:
            raise InvalidNumber(f"{what} {value!r} is not a number") from None
    else:
        raise InvalidNumber(f"{what} must be a number, not {type(value).__name__}")
    if not number.is_finite():
        raise InvalidNumber(f"{what} must be finite, not {value!r}")
    _sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    frac_digits = max(0, -exponent)
    int_digits = max(0, len(digits) + exponent)
    if frac_digits > _MAX_FRAC_DIGITS:
        raise InvalidNumber(f"{what} {value!r} has more than {_MAX_FRAC_DIGITS} decimal places")
    if int_digits > _MAX_INT_DIGITS:
        raise InvalidNumber(f"{what} {value!r} is too large")
    return number


def parse_quantity(value: object) -> Decimal:
    """A trade quantity: non-zero; negative sells."""
    quantity = parse_decimal(value, "quantity")
    if quantity == 0:
        raise InvalidNumber("quantity cannot be zero (negative quantities sell)")
    return quantity


def parse_price(value: object) -> Decimal:
    """A trade price: zero or positive (zero records a gift or a spin-off)."""
    price = parse_decimal(value, "price")
    if price < 0:
        raise InvalidNumber(f"price cannot be negative, got {value!r}")
    return price


def decimal_to_str(value: Decimal) -> str:
    """Canonical text of a decimal without exponent notation: '1E+2' becomes '100'."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
