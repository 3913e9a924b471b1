from __future__ import annotations

from collections.abc import Callable

import pytest
from pycrdt import Doc

from foliosync.sync.clock import HybridClock
from foliosync.sync.errors import DocumentNotFound, InvalidSymbol, ValidationError
from foliosync.sync.model import DocumentKind, EditContext, UserIndex, Watchlist, document_id


class Wall:
    """A settable wall clock in milliseconds."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def device(client_id: int, name: str, wall: Callable[[], int] | None = None) -> Watchlist:
    clock = HybridClock(wall) if wall is not None else HybridClock()
    return Watchlist(Doc(client_id=client_id), EditContext(name, clock))


def sync(*models: Watchlist | UserIndex) -> None:
    """Bring every document up to date with every other one."""
    for source in models:
        for target in models:
            if source is not target:
                target.doc.apply_update(source.doc.get_update(target.doc.get_state()))


def notes(wl: Watchlist) -> dict[str, str | None]:
    return {e.symbol: e.note for e in wl.entries()}


def test_add_keeps_insertion_order_and_normalizes() -> None:
    wl = device(1, "a")
    wl.initialize("Tech")
    assert wl.add(["aapl", "MSFT", " goog "]) == ["AAPL", "MSFT", "GOOG"]
    assert wl.add(["msft", "TSLA", "TSLA"]) == ["TSLA"]
    assert wl.symbols == ["AAPL", "MSFT", "GOOG", "TSLA"]
    assert "aapl" in wl
    assert "IBM" not in wl
    assert len(wl) == 4
    assert wl.name == "Tech"


def test_an_invalid_symbol_in_a_batch_changes_nothing() -> None:
    wl = device(1, "a")
    wl.add(["AAPL"])
    before = wl.doc.get_update()
    updates: list[bytes] = []
    wl.doc.observe(lambda event: updates.append(event.update))
    for batch in (["MSFT", "A B"], ["GOOG", ""], ["TSLA", "$$$"], ["IBM", 123]):
        with pytest.raises(InvalidSymbol):
            wl.add(batch)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        wl.add([])
    assert updates == []
    assert wl.doc.get_update() == before
    assert wl.symbols == ["AAPL"]


def test_the_same_symbol_added_on_two_devices_appears_once() -> None:
    a, b = device(1, "a"), device(2, "b")
    a.add(["AAPL", "MSFT"])
    b.add(["AAPL", "GOOG"])
    sync(a, b)
    assert a.symbols == b.symbols
    assert sorted(a.symbols) == ["AAPL", "GOOG", "MSFT"]
    assert a.symbols.count("AAPL") == 1


def test_remove_without_concurrent_change_is_removed_everywhere() -> None:
    a, b = device(1, "a"), device(2, "b")
    a.add(["AAPL", "MSFT", "GOOG"])
    sync(a, b)
    assert b.remove(["msft", "IBM"]) == ["MSFT"]
    sync(a, b)
    assert a.symbols == b.symbols == ["AAPL", "GOOG"]
    # and it stays removed after a further round trip in either direction
    sync(b, a)
    assert "MSFT" not in a and "MSFT" not in b


@pytest.mark.parametrize(("adder", "remover"), [(1, 2), (2, 1)])
def test_an_add_after_a_removal_elsewhere_survives(adder: int, remover: int) -> None:
    # One device adds and removes a symbol offline; the other adds it afterwards without having
    # seen either. The later add was never removed by anyone, so it must survive the merge,
    # whichever device has the higher client id.
    r, s = device(adder, "r"), device(remover, "s")
    s.add(["AAPL", "MSFT"])
    s.remove(["AAPL"])
    r.add(["AAPL"])
    sync(r, s)
    assert "AAPL" in r and "AAPL" in s
    assert r.symbols == s.symbols


@pytest.mark.parametrize(("first", "second"), [(1, 2), (2, 1)])
def test_a_concurrent_add_wins_over_a_removal(first: int, second: int) -> None:
    a, b = device(first, "a"), device(second, "b")
    a.add(["AAPL", "MSFT"])
    sync(a, b)
    a.remove(["AAPL"])
    b.remove(["AAPL"])
    b.add(["AAPL"])  # re-added on b while a's removal is in flight
    sync(a, b)
    assert a.symbols == b.symbols
    assert "AAPL" in a


def test_move_on_one_device_and_adds_on_another_both_survive() -> None:
    a, b = device(1, "a"), device(2, "b")
    a.add(["AAPL", "MSFT", "GOOG", "TSLA"])
    sync(a, b)
    a.move("TSLA", 0)
    assert a.symbols == ["TSLA", "AAPL", "MSFT", "GOOG"]
    b.add(["IBM", "ORCL"])
    b.move("AAPL", -1)
    sync(a, b)
    assert a.symbols == b.symbols
    merged = a.symbols
    assert sorted(merged) == ["AAPL", "GOOG", "IBM", "MSFT", "ORCL", "TSLA"]
    assert merged[0] == "TSLA"  # a's move kept
    assert merged.index("MSFT") < merged.index("GOOG")
    assert merged.index("IBM") < merged.index("ORCL")  # b's additions kept in their order
    assert merged.index("GOOG") < merged.index("AAPL")  # b's move to the end kept


def test_move_indexes() -> None:
    wl = device(1, "a")
    wl.add(["A", "B", "C", "D"])
    wl.move("A", 2)
    assert wl.symbols == ["B", "C", "A", "D"]
    wl.move("d", 0)
    assert wl.symbols == ["D", "B", "C", "A"]
    wl.move("B", -1)
    assert wl.symbols == ["D", "C", "A", "B"]
    wl.move("C", 3)
    assert wl.symbols == ["D", "A", "B", "C"]
    with pytest.raises(ValidationError):
        wl.move("A", 4)
    with pytest.raises(DocumentNotFound):
        wl.move("ZZZ", 0)
    # order survives a reload from the bytes
    copy = device(9, "c")
    copy.doc.apply_update(wl.doc.get_update())
    assert copy.symbols == ["D", "A", "B", "C"]


@pytest.mark.parametrize(("early_id", "late_id"), [(1, 2), (2, 1)])
def test_concurrent_notes_the_later_edit_wins_whatever_the_client_ids(
    early_id: int, late_id: int
) -> None:
    wall_early, wall_late = Wall(1_700_000_000_000), Wall(1_700_000_000_000)
    early = device(early_id, "early", wall_early)
    late = device(late_id, "late", wall_late)
    early.add(["AAPL"])
    sync(early, late)
    wall_early.ms += 1_000
    wall_late.ms += 5_000
    late.set_note("AAPL", "later")
    early.set_note("AAPL", "earlier")  # made after in real order, but stamped before
    sync(early, late)
    assert notes(early) == notes(late) == {"AAPL": "later"}


@pytest.mark.parametrize(("fast_id", "slow_id"), [(1, 2), (2, 1)])
def test_a_note_written_after_seeing_another_wins_even_with_a_slow_clock(
    fast_id: int, slow_id: int
) -> None:
    fast = device(fast_id, "fast", Wall(1_700_000_100_000))
    slow = device(slow_id, "slow", Wall(1_700_000_000_000))
    fast.add(["AAPL", "MSFT"])
    fast.set_note("AAPL", "first")
    sync(fast, slow)
    assert notes(slow)["AAPL"] == "first"
    slow.set_note("AAPL", "second")  # an edit of what it has seen
    slow.move("MSFT", 0)
    assert notes(slow)["AAPL"] == "second"
    assert slow.symbols == ["MSFT", "AAPL"]
    sync(fast, slow)
    assert notes(fast) == notes(slow) == {"AAPL": "second", "MSFT": None}
    assert fast.symbols == slow.symbols == ["MSFT", "AAPL"]
    # what the editing device shows is what a fresh reader of its document sees
    fresh = device(7, "fresh")
    fresh.doc.apply_update(slow.doc.get_update())
    assert notes(fresh) == notes(slow)
    assert fresh.symbols == slow.symbols


def test_notes_set_clear_and_add_with_note() -> None:
    wl = device(1, "a")
    wl.add(["AAPL", "MSFT"], note="watch earnings")
    assert notes(wl) == {"AAPL": "watch earnings", "MSFT": "watch earnings"}
    wl.set_note("msft", "cloud")
    wl.set_note("AAPL", None)
    assert notes(wl) == {"AAPL": None, "MSFT": "cloud"}
    wl.add(["AAPL"], note="again")  # an existing symbol gets the note, not a second entry
    assert notes(wl) == {"AAPL": "again", "MSFT": "cloud"}
    assert wl.symbols == ["AAPL", "MSFT"]
    with pytest.raises(DocumentNotFound):
        wl.set_note("GOOG", "x")


def test_removed_then_re_added_symbol_starts_without_its_old_note() -> None:
    a, b = device(1, "a"), device(2, "b")
    a.add(["AAPL", "MSFT"])
    a.set_note("AAPL", "old thesis")
    sync(a, b)
    b.remove(["AAPL"])
    b.add(["AAPL"])
    assert notes(b)["AAPL"] is None
    sync(a, b)
    assert notes(a)["AAPL"] is None
    assert notes(b)["AAPL"] is None
    assert a.symbols == b.symbols == ["MSFT", "AAPL"]  # re-added at the end


def test_note_written_concurrently_with_a_removal_does_not_come_back() -> None:
    wall_a, wall_b = Wall(1_700_000_000_000), Wall(1_700_000_000_000)
    a, b = device(1, "a", wall_a), device(2, "b", wall_b)
    a.add(["AAPL"])
    sync(a, b)
    wall_b.ms += 10_000  # b's clock runs ahead
    b.set_note("AAPL", "stale")
    b.move("AAPL", 0)
    wall_a.ms += 1_000
    a.remove(["AAPL"])
    sync(a, b)
    assert "AAPL" not in a and "AAPL" not in b
    a.add(["AAPL"])  # a has seen b's leftovers: the new entry must not inherit them
    sync(a, b)
    assert notes(a) == notes(b) == {"AAPL": None}


def test_same_name_on_two_devices_is_one_document() -> None:
    tech = document_id(DocumentKind.WATCHLIST, "Tech")
    assert document_id(DocumentKind.WATCHLIST, " tech ") == tech
    a, b = device(1, "a"), device(2, "b")
    a.initialize("Tech")
    a.add(["AAPL"])
    b.initialize("Tech")
    b.add(["MSFT"])
    sync(a, b)
    assert a.name == b.name == "Tech"
    assert sorted(a.symbols) == sorted(b.symbols) == ["AAPL", "MSFT"]


def test_user_index_lists_documents() -> None:
    a = UserIndex(Doc(client_id=1), EditContext("a"))
    b = UserIndex(Doc(client_id=2), EditContext("b"))
    tech = document_id(DocumentKind.WATCHLIST, "Tech")
    main = document_id(DocumentKind.PORTFOLIO, "Main")
    a.register(tech, DocumentKind.WATCHLIST, "Tech")
    b.register(document_id(DocumentKind.WATCHLIST, " tech "), DocumentKind.WATCHLIST, "Tech")
    b.register(main, DocumentKind.PORTFOLIO, "Main")
    sync(a, b)
    for index in (a, b):
        listed = [(e.id, e.kind, e.name) for e in index.entries()]
        assert sorted(listed) == sorted(
            [(tech, DocumentKind.WATCHLIST, "Tech"), (main, DocumentKind.PORTFOLIO, "Main")]
        )
        assert index.get(main) is not None
    a.unregister(main)
    sync(a, b)
    assert [e.id for e in b.entries()] == [tech]
    assert b.get(main) is None


def test_the_order_after_many_edits_is_the_order_a_fresh_read_gives() -> None:
    """Edits patch the cached order instead of re-sorting; it must match a read from scratch."""
    import random

    from pycrdt import Doc

    from foliosync.sync.model import EditContext, Watchlist

    watchlist = Watchlist(Doc(client_id=1), EditContext("device"))
    watchlist.initialize("Moves")
    watchlist.add([f"S{i:03d}X" for i in range(120)])
    rng = random.Random(11)
    for step in range(600):
        roll = rng.random()
        if roll < 0.6 and watchlist.symbols:
            watchlist.move(rng.choice(watchlist.symbols), rng.randint(0, len(watchlist) - 1))
        elif roll < 0.75:
            watchlist.add([f"N{step:03d}X", rng.choice(watchlist.symbols or ["AAPL"])])
        elif roll < 0.9 and watchlist.symbols:
            watchlist.remove([rng.choice(watchlist.symbols)])
        elif watchlist.symbols:
            watchlist.set_note(rng.choice(watchlist.symbols), f"note {step}")
        if step % 25 == 0:
            fresh = Watchlist(Doc(client_id=2), EditContext("reader"))
            fresh.doc.apply_update(watchlist.doc.get_update())
            assert watchlist.symbols == fresh.symbols
            assert [e.note for e in watchlist.entries()] == [e.note for e in fresh.entries()]
