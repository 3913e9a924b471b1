from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pycrdt import Doc

from foliosync.sync.clock import HybridClock
from foliosync.sync.errors import (
    DocumentNotFound,
    InvalidNumber,
    InvalidSymbol,
    ValidationError,
)
from foliosync.sync.model import DocumentKind, EditContext, Portfolio, Trade, document_id

T0 = datetime(2025, 3, 3, 15, 0, tzinfo=UTC)


class Wall:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def device(client_id: int, name: str, wall: Wall | None = None) -> Portfolio:
    clock = HybridClock(wall) if wall is not None else HybridClock()
    return Portfolio(Doc(client_id=client_id), EditContext(name, clock))


def sync(*models: Portfolio) -> None:
    for source in models:
        for target in models:
            if source is not target:
                target.doc.apply_update(source.doc.get_update(target.doc.get_state()))


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def reread(pf: Portfolio) -> Portfolio:
    """A fresh reader of the same document bytes (no cache shared with ``pf``)."""
    copy = device(99, "reader")
    copy.doc.apply_update(pf.doc.get_update())
    return copy


def snapshot(pf: Portfolio) -> tuple[list[dict[str, object]], dict[str, dict[str, str]]]:
    return (
        [t.to_json() for t in pf.trades()],
        {s: p.to_json() for s, p in pf.positions().items()},
    )


def test_average_cost_worked_example() -> None:
    pf = device(1, "a")
    pf.initialize("Main")
    pf.add_trade("AAPL", "10", "100", time=at(0))
    pf.add_trade("aapl", "10", "110", time=at(1))
    pos = pf.positions()["AAPL"]
    # (10*100 + 10*110) / 20 = 2100 / 20 = 105
    assert (pos.quantity, pos.average_cost, pos.realized) == (Decimal(20), Decimal(105), 0)
    pf.add_trade("AAPL", "-5", "120", time=at(2))
    pos = pf.positions()["AAPL"]
    # a sale leaves the average cost; realized (120 - 105) * 5 = 75
    assert (pos.quantity, pos.average_cost, pos.realized) == (Decimal(15), Decimal(105), 75)
    assert pos.cost_basis == Decimal(1575)
    pf.add_trade("AAPL", "-15", "100", time=at(3))
    pos = pf.positions()["AAPL"]
    # closed: realized 75 + (100 - 105) * 15 = 75 - 75 = 0
    assert (pos.quantity, pos.average_cost, pos.realized) == (0, 0, 0)
    pf.add_trade("AAPL", "2", "50", time=at(4))  # starts afresh
    pos = pf.positions()["AAPL"]
    assert (pos.quantity, pos.average_cost) == (Decimal(2), Decimal(50))
    assert pos.to_json() == {"qty": "2", "avg_cost": "50", "realized": "0"}


def test_positions_are_folded_in_trade_time_order_not_entry_order() -> None:
    pf = device(1, "a")
    pf.add_trade("MSFT", "-4", "130", time=at(10))  # entered first, happened last
    pf.add_trade("MSFT", "3", "100", time=at(0))
    pf.add_trade("MSFT", "1", "120", time=at(5))
    pos = pf.positions()["MSFT"]
    # buys: (3*100 + 1*120) / 4 = 105; the sale of 4 at 130 realizes 4 * 25 = 100
    assert (pos.quantity, pos.average_cost, pos.realized) == (0, 0, Decimal(100))
    assert [t.time for t in pf.trades()] == [at(0), at(5), at(10)]


def test_a_sale_beyond_the_holding_opens_a_short_at_the_sale_price() -> None:
    pf = device(1, "a")
    pf.add_trade("TSLA", "2", "200", time=at(0))
    pf.add_trade("TSLA", "-5", "210", time=at(1))
    pos = pf.positions()["TSLA"]
    # 2 closed at +10 each, 3 short at 210
    assert (pos.quantity, pos.average_cost, pos.realized) == (Decimal(-3), Decimal(210), 20)


def test_fractional_quantities_are_exact() -> None:
    pf = device(1, "a")
    pf.add_trade("BTC-USD", "0.1", "30000.5", time=at(0))
    pf.add_trade("BTC-USD", "0.2", "30000.5", time=at(1))
    pos = pf.positions()["BTC-USD"]
    assert pos.quantity == Decimal("0.3")
    assert pos.to_json()["qty"] == "0.3"
    assert pos.average_cost == Decimal("30000.5")
    copy = reread(pf)
    assert copy.positions()["BTC-USD"].quantity == Decimal("0.3")
    assert [t.to_json()["price"] for t in copy.trades()] == ["30000.5", "30000.5"]


def test_prices_and_quantities_round_trip_exactly_through_the_document() -> None:
    pf = device(1, "a")
    values = [
        ("123456789012345678", "0.000000000001"),
        ("0.000000000001", "999999999999999999.999999999999"),
        ("1.10", "33.3330"),
    ]
    for qty, price in values:
        pf.add_trade("IBM", qty, price, time=at(0))
    copy = reread(pf)
    got = {(t.quantity, t.price) for t in copy.trades()}
    assert got == {(Decimal(q), Decimal(p)) for q, p in values}
    for trade in copy.trades():
        assert isinstance(trade.quantity, Decimal)
        assert isinstance(trade.price, Decimal)


@pytest.mark.parametrize(
    ("qty", "price"),
    [(0.1, "10"), ("1", 10.5), ("nan", "1"), ("1", "inf"), ("abc", "1"), ("1", "1e30"), ("0", "1")],
)
def test_bad_numbers_are_refused_and_nothing_is_written(qty: object, price: object) -> None:
    pf = device(1, "a")
    pf.add_trade("AAPL", "1", "1")
    before = pf.doc.get_update()
    with pytest.raises(InvalidNumber):
        pf.add_trade("AAPL", qty, price)
    assert pf.doc.get_update() == before
    assert len(pf) == 1


def test_bad_symbol_time_and_note_are_refused() -> None:
    pf = device(1, "a")
    with pytest.raises(InvalidSymbol):
        pf.add_trade("A B", "1", "1")
    with pytest.raises(ValidationError):
        pf.add_trade("AAPL", "1", "1", time=datetime(2025, 1, 1))  # naive
    with pytest.raises(ValidationError):
        pf.add_trade("AAPL", "1", "1", note="x" * 5000)
    assert pf.trades() == []


def test_trades_recorded_concurrently_on_two_devices_all_count() -> None:
    a, b = device(1, "a"), device(2, "b")
    a.add_trade("AAPL", "10", "100", time=at(0))
    sync(a, b)
    a.add_trade("AAPL", "5", "106", time=at(1))
    b.add_trade("AAPL", "5", "106", time=at(1))
    b.add_trade("MSFT", "1", "400", time=at(2))
    sync(a, b)
    assert snapshot(a) == snapshot(b)
    assert len(a) == 4
    pos = a.positions()["AAPL"]
    # (10*100 + 10*106) / 20 = 103
    assert (pos.quantity, pos.average_cost) == (Decimal(20), Decimal(103))


def test_correct_a_trade_field_by_field() -> None:
    pf = device(1, "a")
    trade = pf.add_trade("AAPL", "10", "100", time=at(0), note="first")
    pf.correct_trade(trade.id, price="101.5")
    pf.correct_trade(trade.id, quantity="-3", note=None)
    pf.correct_trade(trade.id, symbol="msft", time=at(30))
    fixed = pf.trade(trade.id)
    assert (fixed.symbol, fixed.quantity, fixed.price, fixed.time, fixed.note) == (
        "MSFT",
        Decimal(-3),
        Decimal("101.5"),
        at(30),
        None,
    )
    assert snapshot(reread(pf)) == snapshot(pf)
    assert set(pf.positions()) == {"MSFT"}
    with pytest.raises(ValidationError):
        pf.correct_trade(trade.id, side="buy")
    with pytest.raises(ValidationError):
        pf.correct_trade(trade.id)
    with pytest.raises(InvalidNumber):
        pf.correct_trade(trade.id, price=1.5)
    with pytest.raises(DocumentNotFound):
        pf.correct_trade("nope", price="1")
    assert pf.trade(trade.id) == fixed


@pytest.mark.parametrize(("early_id", "late_id"), [(1, 2), (2, 1)])
def test_concurrent_corrections_of_one_field_the_later_wins(early_id: int, late_id: int) -> None:
    wall_early, wall_late = Wall(1_700_000_000_000), Wall(1_700_000_000_000)
    early = device(early_id, "early", wall_early)
    late = device(late_id, "late", wall_late)
    trade = early.add_trade("AAPL", "10", "100", time=at(0))
    sync(early, late)
    wall_early.ms += 1_000
    wall_late.ms += 2_000
    late.correct_trade(trade.id, price="102")
    early.correct_trade(trade.id, price="101", note="early note")  # stamped earlier
    sync(early, late)
    for pf in (early, late, reread(early)):
        fixed = pf.trade(trade.id)
        assert fixed.price == Decimal(102)
        assert fixed.note == "early note"  # a different field: not in conflict


@pytest.mark.parametrize(("fast_id", "slow_id"), [(1, 2), (2, 1)])
def test_a_correction_after_seeing_another_wins_even_with_a_slow_clock(
    fast_id: int, slow_id: int
) -> None:
    fast = device(fast_id, "fast", Wall(1_700_000_060_000))
    slow = device(slow_id, "slow", Wall(1_700_000_000_000))
    trade = fast.add_trade("AAPL", "10", "100", time=at(0))
    fast.correct_trade(trade.id, price="101")
    sync(fast, slow)
    assert slow.trade(trade.id).price == Decimal(101)
    slow.correct_trade(trade.id, price="102")
    assert slow.trade(trade.id).price == Decimal(102)
    sync(fast, slow)
    for pf in (fast, slow, reread(slow)):
        assert pf.trade(trade.id).price == Decimal(102)


def test_delete_a_trade_everywhere() -> None:
    a, b = device(1, "a"), device(2, "b")
    keep = a.add_trade("AAPL", "1", "10", time=at(0))
    gone = a.add_trade("AAPL", "1", "20", time=at(1))
    sync(a, b)
    b.delete_trade(gone.id)
    with pytest.raises(DocumentNotFound):
        b.delete_trade(gone.id)
    sync(a, b)
    for pf in (a, b):
        assert [t.id for t in pf.trades()] == [keep.id]
        assert pf.positions()["AAPL"].average_cost == Decimal(10)


@pytest.mark.parametrize(("deleter", "corrector"), [(1, 2), (2, 1)])
def test_a_concurrent_correction_does_not_resurrect_a_deleted_trade(
    deleter: int, corrector: int
) -> None:
    d, c = device(deleter, "d"), device(corrector, "c")
    trade = d.add_trade("AAPL", "1", "10", time=at(0))
    other = d.add_trade("MSFT", "2", "20", time=at(1))
    sync(d, c)
    d.delete_trade(trade.id)
    c.correct_trade(trade.id, price="11", note="fixed")
    sync(d, c)
    for pf in (d, c, reread(c)):
        assert [t.id for t in pf.trades()] == [other.id]
        assert set(pf.positions()) == {"MSFT"}
        with pytest.raises(DocumentNotFound):
            pf.trade(trade.id)


def test_same_name_on_two_devices_is_one_portfolio() -> None:
    assert document_id(DocumentKind.PORTFOLIO, "Main") == document_id(
        DocumentKind.PORTFOLIO, "  main "
    )
    a, b = device(1, "a"), device(2, "b")
    a.initialize("Main")
    b.initialize("Main")
    a.add_trade("AAPL", "1", "10", time=at(0))
    b.add_trade("MSFT", "1", "20", time=at(0))
    sync(a, b)
    assert a.name == b.name == "Main"
    assert snapshot(a) == snapshot(b)
    assert set(a.positions()) == {"AAPL", "MSFT"}


def test_trade_json_shape() -> None:
    pf = device(1, "a")
    trade = pf.add_trade("brk.b", "-4", "170.50", time=at(0), note="trim")
    assert isinstance(trade, Trade)
    assert trade.to_json() == {
        "id": trade.id,
        "symbol": "BRK.B",
        "qty": "-4",
        "price": "170.5",
        "time": "2025-03-03T15:00:00.000Z",
        "note": "trim",
    }
