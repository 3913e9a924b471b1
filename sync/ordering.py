"""Fractional order keys: reorder items without renumbering the others.

A watchlist's order is one key per symbol, sorted as plain strings. Moving a symbol rewrites its
key only, so a move on one device and additions on another never touch the same data and merge
without loss. Keys follow the well-known fractional-indexing scheme: an integer part whose first
character encodes its length (so appending grows keys logarithmically, not linearly) and an
optional base-62 fraction that never ends in "0" (so there is always room between two keys).
Equal keys (two devices inserting at the same place) are broken by the caller with the symbol.
"""

from __future__ import annotations

__all__ = ["is_valid_key", "key_between"]

DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE = len(DIGITS)
_INDEX = {c: i for i, c in enumerate(DIGITS)}
_SMALLEST_INT = "A" + "0" * 26


def _int_length(head: str) -> int:
    if "a" <= head <= "z":
        return ord(head) - ord("a") + 2
    if "A" <= head <= "Z":
        return ord("Z") - ord(head) + 2
    raise ValueError(f"invalid order key head {head!r}")


def _split(key: str) -> tuple[str, str]:
    if not key:
        raise ValueError("empty order key")
    n = _int_length(key[0])
    if len(key) < n:
        raise ValueError(f"order key {key!r} is too short")
    integer, fraction = key[:n], key[n:]
    if fraction.endswith("0") or any(c not in _INDEX for c in key[1:]):
        raise ValueError(f"invalid order key {key!r}")
    return integer, fraction


def is_valid_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    try:
        integer, _ = _split(key)
    except ValueError:
        return False
    return integer != _SMALLEST_INT or len(key) > len(integer)


def _increment(integer: str) -> str | None:
    head, digits = integer[0], list(integer[1:])
    for i in reversed(range(len(digits))):
        d = _INDEX[digits[i]] + 1
        if d < _BASE:
            digits[i] = DIGITS[d]
            return head + "".join(digits)
        digits[i] = "0"
    if head == "Z":
        return "a0"
    if head == "z":
        return None
    new_head = chr(ord(head) + 1)
    if new_head > "a":
        digits.append("0")
    else:
        digits.pop()
    return new_head + "".join(digits)


def _decrement(integer: str) -> str | None:
    head, digits = integer[0], list(integer[1:])
    for i in reversed(range(len(digits))):
        d = _INDEX[digits[i]] - 1
        if d >= 0:
            digits[i] = DIGITS[d]
            return head + "".join(digits)
        digits[i] = DIGITS[-1]
    if head == "a":
        return "Z" + DIGITS[-1]
    if head == "A":
        return None
    new_head = chr(ord(head) - 1)
    if new_head < "Z":
        digits.append(DIGITS[-1])
    else:
        digits.pop()
    return new_head + "".join(digits)


def _midpoint(a: str, b: str | None) -> str:
    """A fraction strictly between a and b (b None: the end)."""
    if b is not None:
        n = 0
        while (a[n] if n < len(a) else "0") == b[n]:
            n += 1
        if n > 0:
            return b[:n] + _midpoint(a[n:], b[n:])
    low = _INDEX[a[0]] if a else 0
    high = _INDEX[b[0]] if b is not None else _BASE
    if high - low > 1:
        return DIGITS[(low + high + 1) // 2]
    if b is not None and len(b) > 1:
        return b[0]
    return DIGITS[low] + _midpoint(a[1:], None)


def key_between(a: str | None, b: str | None) -> str:
    """A key that sorts strictly after ``a`` and before ``b`` (None: open end).

    Raises ValueError if a >= b or either is not a valid key.
    """
    if a is not None and b is not None and a >= b:
        raise ValueError(f"order keys out of order: {a!r} >= {b!r}")
    if a is None and b is None:
        return "a0"
    if a is None:
        assert b is not None
        integer, fraction = _split(b)
        if integer == _SMALLEST_INT:
            return integer + _midpoint("", fraction)
        if fraction:
            return integer
        lower = _decrement(integer)
        if lower is None:  # pragma: no cover - needs 62**26 keys
            raise ValueError("order key space exhausted")
        return lower
    int_a, frac_a = _split(a)
    if b is None:
        higher = _increment(int_a)
        return int_a + _midpoint(frac_a, None) if higher is None else higher
    int_b, frac_b = _split(b)
    if int_a == int_b:
        return int_a + _midpoint(frac_a, frac_b)
    higher = _increment(int_a)
    if higher is not None and higher < b:
        return higher
    return int_a + _midpoint(frac_a, None)
