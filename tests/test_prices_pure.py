"""Prices without I/O: checking ticks, the price book, conflation and sequence tracking."""

from __future__ import annotations

import tracemalloc
from decimal import Decimal

import pytest

from foliosync.sync.errors import ValidationError
from foliosync.sync.prices import (
    MAX_FUTURE_MS,
    LatestPrices,
    PriceBook,
    PricePoint,
    SequenceTracker,
    Tick,
    TickConflator,
    TickRejected,
    check_tick,
    check_ticks,
)
from foliosync.sync.protocol import PriceBatch, decode_frame, encode_frame

NOW = 1_718_026_200_000  # 2024-06-10 13:30 UTC


# -- check_tick ----------------------------------------------------------------------------------


def test_a_tick_as_an_object() -> None:
    tick = check_tick({"symbol": " aapl ", "price": "187.25", "timestamp": NOW, "size": 100}, NOW)
    assert tick == Tick("AAPL", Decimal("187.25"), NOW, Decimal(100))


def test_a_tick_as_an_object_with_time_ms_and_no_size() -> None:
    tick = check_tick({"symbol": "BRK.B", "price": 412.5, "time_ms": NOW - 5}, NOW)
    assert tick == Tick("BRK.B", Decimal("412.5"), NOW - 5, None)


@pytest.mark.parametrize(
    "raw",
    [["MSFT", "421.9", NOW], ("MSFT", "421.9", NOW), ["MSFT", 421.9, NOW, None]],
    ids=["list", "tuple", "list-with-nil-size"],
)
def test_a_tick_as_an_array(raw: object) -> None:
    assert check_tick(raw, NOW) == Tick("MSFT", Decimal("421.9"), NOW)


def test_a_float_price_is_read_as_its_shortest_text() -> None:
    assert check_tick(["X", 0.1, NOW], NOW).price == Decimal("0.1")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"symbol": "AAPL", "prcie": "1", "timestamp": NOW}, "unknown field"),
        ({"symbol": "AAPL", "price": "1", "timestamp": NOW, "time_ms": NOW}, "not both"),
        ({"symbol": "AAPL", "timestamp": NOW}, "needs symbol, price and timestamp"),
        (["AAPL", "1"], "a tick is"),
        (["AAPL", "1", NOW, 1, 2], "a tick is"),
        ("AAPL 1", "a tick is"),
        (["AAPL", "0", NOW], "must be positive"),
        (["AAPL", "-3.5", NOW], "must be positive"),
        (["AAPL", "1", NOW, "-1"], "cannot be negative"),
        (["AAPL", "abc", NOW], "not a number"),
        (["AAPL", "NaN", NOW], "finite"),
        (["AAPL", float("nan"), NOW], "finite"),
        (["AAPL", "Infinity", NOW], "finite"),
        (["AAPL", float("inf"), NOW], "finite"),
        (["AAPL", True, NOW], "not a number"),
        (["AAPL", "1e12", NOW], "implausibly large"),
        (["AAPL", "1" * 41, NOW], "not a number"),
        (["AAPL", "1e-999999", NOW], "too many digits"),
        (["AAPL", "1", NOW, "1e-999999"], "too many digits"),
        (["AAPL", [1], NOW], "not a number"),
        (["bad symbol!", "1", NOW], "invalid symbol"),
        (["", "1", NOW], "invalid symbol"),
        ([42, "1", NOW], "symbol must be text"),
        (["AAPL", "1", NOW + MAX_FUTURE_MS + 1000], "in the future"),
        (["AAPL", "1", "2024-06-10"], "epoch milliseconds or an ISO 8601"),
        (["AAPL", "1", "soon"], "epoch milliseconds or an ISO 8601"),
        (["AAPL", "1", "2024-06-10T13:30:00"], "no time zone: add Z"),
        (["AAPL", "1", "2024-06-10 13:30"], "no time zone"),
        (["AAPL", "1", "2024-13-10T13:30:00Z"], "not a valid ISO 8601"),
        (["AAPL", "1", "2024-06-10T23:59:60Z"], "not a valid ISO 8601"),
        (["AAPL", "1", "2024-06-10T13:30:00Z" + " " * 10_000 + "x"], "not epoch milliseconds"),
        (["AAPL", "1", "1969-12-31T23:59:59Z"], "out of range"),
        ({"symbol": "AAPL", "price": "1", "time_ms": "2024-06-10T13:30:00Z"}, "milliseconds, got"),
        (["AAPL", "1", True], "epoch milliseconds"),
        (["AAPL", "1", -1], "out of range"),
        (["AAPL", "1", float("nan")], "out of range"),
        (["AAPL", "1", 10**20], "out of range"),
    ],
)
def test_bad_ticks_are_refused_with_a_reason(raw: object, reason: str) -> None:
    with pytest.raises(TickRejected, match=reason):
        check_tick(raw, NOW)


@pytest.mark.parametrize(
    "text",
    [
        "2024-06-10T13:30:00Z",
        "2024-06-10T13:30:00.000Z",
        "2024-06-10T13:30:00+00:00",
        "2024-06-10T09:30:00-04:00",
        "2024-06-10T15:30:00+02:00",
        "2024-06-10 13:30:00Z",
        " 2024-06-10T13:30:00Z ",
    ],
)
def test_an_iso_8601_timestamp_with_its_zone_is_taken(text: str) -> None:
    assert check_tick({"symbol": "AAPL", "price": "1", "timestamp": text}, NOW).time_ms == NOW
    assert check_tick(["AAPL", "1", text], NOW).time_ms == NOW


def test_an_iso_timestamp_keeps_its_milliseconds_and_drops_finer_digits() -> None:
    assert check_tick(["AAPL", "1", "2024-06-10T13:30:00.123456Z"], NOW + 200).time_ms == NOW + 123


def test_an_iso_timestamp_far_in_the_past_is_taken_and_one_in_the_future_refused() -> None:
    # Only the future is bounded (a clock that is off); an old price is still a price.
    assert check_tick(["AAPL", "1", "1999-01-04T14:30:00Z"], NOW).time_ms == 915460200000
    with pytest.raises(TickRejected, match="in the future"):
        check_tick(["AAPL", "1", "2024-06-10T13:32:00Z"], NOW)


def test_a_slightly_future_tick_is_taken() -> None:
    assert check_tick(["AAPL", "1", NOW + MAX_FUTURE_MS], NOW).time_ms == NOW + MAX_FUTURE_MS


def test_a_rejection_is_a_validation_error() -> None:
    assert issubclass(TickRejected, ValidationError)


def test_check_ticks_keeps_the_good_and_names_the_bad_by_index() -> None:
    good, bad = check_ticks(
        [["AAPL", "1", NOW], ["AAPL", "-1", NOW], {"symbol": "MSFT", "price": "2", "time_ms": NOW}],
        NOW,
    )
    assert [t.symbol for t in good] == ["AAPL", "MSFT"]
    assert len(bad) == 1 and bad[0][0] == 1 and "positive" in bad[0][1]


def test_check_ticks_of_nothing() -> None:
    assert check_ticks([], NOW) == ([], [])


# -- PriceBook -----------------------------------------------------------------------------------


def tick(symbol: str, price: str, time_ms: int = NOW) -> Tick:
    return Tick(symbol, Decimal(price), time_ms)


def test_sequence_numbers_count_per_symbol() -> None:
    book = PriceBook()
    assert book.apply(tick("AAPL", "1")).seq == 1  # type: ignore[union-attr]
    assert book.apply(tick("MSFT", "2")).seq == 1  # type: ignore[union-attr]
    assert book.apply(tick("AAPL", "3", NOW + 1)).seq == 2  # type: ignore[union-attr]
    assert book.cursor == 3 and len(book) == 2 and "AAPL" in book
    assert book.latest("AAPL") == PricePoint("AAPL", Decimal(3), NOW + 1, 2)
    assert book.latest("NOPE") is None


def test_an_out_of_order_tick_is_ignored() -> None:
    book = PriceBook()
    book.apply(tick("AAPL", "2", NOW))
    assert book.apply(tick("AAPL", "1", NOW - 1)) is None
    assert book.latest("AAPL").price == Decimal(2)  # type: ignore[union-attr]
    assert book.cursor == 1
    # the same instant is not out of order: the later report wins
    assert book.apply(tick("AAPL", "3", NOW)) is not None


def test_changed_since_answers_relative_to_a_cursor() -> None:
    book = PriceBook()
    book.apply(tick("AAPL", "1"))
    book.apply(tick("MSFT", "1"))
    everything, cursor = book.changed_since(0)
    assert [p.symbol for p in everything] == ["AAPL", "MSFT"] and cursor == 2
    assert book.changed_since(cursor) == ([], 2)
    book.apply(tick("MSFT", "2", NOW + 1))
    book.apply(tick("MSFT", "3", NOW + 2))
    changed, cursor = book.changed_since(2)
    assert [(p.symbol, p.price, p.seq) for p in changed] == [("MSFT", Decimal(3), 3)]
    assert cursor == 4
    assert book.changed_since(2, ["AAPL"]) == ([], 4)
    assert book.changed_since(0, ["AAPL", "NOPE"])[0][0].symbol == "AAPL"


def test_a_resume_cursor_brings_back_exactly_what_a_conflated_follower_lacks() -> None:
    book = PriceBook()
    book.apply(tick("AAPL", "1"))  # cursor 1
    book.apply(tick("MSFT", "1"))  # 2
    book.apply(tick("TSLA", "1"))  # 3: nobody follows it
    followed = ["AAPL", "MSFT", "NVDA"]
    got = {"AAPL": 1, "MSFT": 1}  # a snapshot of what there was
    assert book.resume_cursor(got, followed) == 3
    book.apply(tick("AAPL", "2", NOW + 1))  # 4: handed over at once
    book.apply(tick("MSFT", "2", NOW + 1))  # 5: held back in its push window
    book.apply(tick("AAPL", "3", NOW + 2))  # 6: handed over at once
    got["AAPL"] = 3
    cursor = book.resume_cursor(got, followed)
    assert cursor == 4
    # MSFT's held-back price comes back; AAPL's newest too, a harmless repeat
    changed = book.changed_since(cursor, followed)[0]
    assert [(p.symbol, p.seq) for p in changed] == [("AAPL", 3), ("MSFT", 2)]
    book.apply(tick("NVDA", "9", NOW + 3))  # 7: a first price of a followed symbol
    assert book.resume_cursor({**got, "MSFT": 2}, followed) == 6
    assert book.resume_cursor({**got, "MSFT": 2, "NVDA": 1}, followed) == 7


def test_snapshot_has_the_latest_of_the_symbols_that_have_one() -> None:
    book = PriceBook()
    book.apply(tick("AAPL", "1"))
    book.apply(tick("AAPL", "2", NOW + 1))
    book.apply(tick("MSFT", "5"))
    assert [(p.symbol, p.price) for p in book.snapshot(["MSFT", "NOPE", "AAPL"])] == [
        ("MSFT", Decimal(5)),
        ("AAPL", Decimal(2)),
    ]
    assert book.symbols() == ["AAPL", "MSFT"]
    assert book.recent_prices("AAPL") == [Decimal(1), Decimal(2)]


def test_a_price_point_round_trips_through_the_wire_and_json() -> None:
    point = PricePoint("AAPL", Decimal("187.250"), NOW, 7, Decimal("1E+2"))
    wire = point.to_wire()
    assert wire == ("AAPL", "187.25", NOW, 7, "100")
    assert PricePoint.from_wire(wire) == point
    assert point.to_json() == {
        "symbol": "AAPL",
        "price": "187.25",
        "time_ms": NOW,
        "seq": 7,
        "size": "100",
    }
    frame = PriceBatch((wire,))
    assert decode_frame(encode_frame(frame)) == frame
    with pytest.raises(ValidationError):
        PricePoint.from_wire(("AAPL", "-1", NOW, 1, None))


def test_every_accepted_price_fits_in_a_price_frame() -> None:
    """Whatever check_tick lets through, the relay can send (it once took 1e-999999)."""
    for text in ("0.30000000000000004", "999999999999.99", "0.0000000001", "1E+11", "12.5000"):
        point = PriceBook().apply(check_tick(["X", text, NOW, text], NOW))
        assert point is not None
        encode_frame(PriceBatch((point.to_wire(),)))


# -- TickConflator -------------------------------------------------------------------------------


def point(symbol: str, price: int, seq: int) -> PricePoint:
    return PricePoint(symbol, Decimal(price), NOW + seq, seq)


def test_a_newer_price_replaces_an_unsent_older_one() -> None:
    conflator = TickConflator(lambda _symbol: 1000)
    for seq in range(1, 6):
        conflator.offer(point("AAPL", 100 + seq, seq))
    assert len(conflator) == 1
    assert conflator.due(0) == [point("AAPL", 105, 5)]
    assert len(conflator) == 0 and conflator.due(1) == []


def test_due_respects_each_symbols_window() -> None:
    windows = {"FAST": 100, "SLOW": 1000}
    conflator = TickConflator(windows.__getitem__)
    conflator.offer(point("FAST", 1, 1))
    conflator.offer(point("SLOW", 1, 1))
    assert {p.symbol for p in conflator.due(0)} == {"FAST", "SLOW"}  # first sends go at once
    conflator.offer(point("FAST", 2, 2))
    conflator.offer(point("SLOW", 2, 2))
    assert conflator.due(99) == []
    assert conflator.due(100) == [point("FAST", 2, 2)]
    conflator.offer(point("FAST", 3, 3))
    assert conflator.due(150) == []
    conflator.offer(point("FAST", 4, 4))  # replaces 3: still one FAST pending
    assert conflator.due(200) == [point("FAST", 4, 4)]
    assert conflator.due(999) == []  # SLOW was sent at 0: due again at 1000
    assert conflator.due(1000) == [point("SLOW", 2, 2)]
    assert len(conflator) == 0


def test_forget_drops_pending_and_the_window() -> None:
    conflator = TickConflator(lambda _symbol: 10_000)
    conflator.offer(point("AAPL", 1, 1))
    conflator.due(0)
    conflator.offer(point("AAPL", 2, 2))
    assert conflator.due(1) == []
    conflator.forget(["AAPL"])
    assert len(conflator) == 0
    conflator.offer(point("AAPL", 3, 3))
    assert conflator.due(2) == [point("AAPL", 3, 3)]  # a fresh start: no window to wait out


def test_memory_is_bounded_by_the_symbols_not_the_ticks() -> None:
    symbols = [f"S{i}" for i in range(50)]
    conflator = TickConflator(lambda _symbol: 10**9)
    for s in symbols:
        conflator.offer(point(s, 1, 1))
    conflator.due(0)  # every symbol sent once: from now on all wait for their window
    tracemalloc.start()
    try:
        for seq in range(2, 2_002):
            for s in symbols:  # 100,000 offers, none of which may go yet
                conflator.offer(PricePoint(s, Decimal(seq), NOW + seq, seq))
            if seq == 2:
                baseline, _ = tracemalloc.get_traced_memory()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(conflator) == len(symbols)
    assert current - baseline < 64 * 1024, "the conflator grew with the number of ticks"
    assert {p.seq for p in conflator.due(10**9)} == {2_001}


# -- LatestPrices ------------------------------------------------------------------------------


def test_latest_prices_keep_the_newest_per_symbol_and_hand_them_out_once() -> None:
    waiting = LatestPrices()
    waiting.add([point("AAPL", 1, 1), point("MSFT", 1, 1)])
    waiting.add([point("AAPL", 3, 3)])
    waiting.add([point("AAPL", 2, 2)])  # older than what waits: it does not replace it
    assert len(waiting) == 2
    taken = sorted(waiting.take(), key=lambda p: p.symbol)
    assert taken == [point("AAPL", 3, 3), point("MSFT", 1, 1)]
    assert len(waiting) == 0 and waiting.take() == []


def test_latest_prices_forget_symbols_and_stay_bounded_by_them() -> None:
    waiting = LatestPrices()
    for seq in range(1, 1001):
        waiting.add([point(f"S{i}", seq, seq) for i in range(20)])
    assert len(waiting) == 20
    waiting.forget(["S0", "S1", "NOPE"])
    taken = waiting.take()
    assert len(taken) == 18 and {p.seq for p in taken} == {1000}


# -- SequenceTracker -----------------------------------------------------------------------------


def test_sequence_tracker_accepts_newer_and_flags_a_restart() -> None:
    tracker = SequenceTracker()
    assert tracker.accept(point("AAPL", 1, 5))
    assert tracker.accept(point("AAPL", 1, 9))  # conflation skips numbers: not a gap
    assert tracker.accept(point("AAPL", 1, 9))  # the same again (after a snapshot): no gap
    assert not tracker.accept(point("AAPL", 1, 2))  # lower: the relay restarted, resync
    assert tracker.accept(point("AAPL", 1, 2), snapshot=True)  # a snapshot resets the symbol
    assert tracker.accept(point("AAPL", 1, 3))
    tracker.reset(["AAPL"])
    assert tracker.accept(point("AAPL", 1, 1))
    tracker.accept(point("MSFT", 1, 4))
    tracker.reset()
    assert tracker.accept(point("MSFT", 1, 1))
