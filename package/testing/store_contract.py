"""The relay store contract (:class:`~foliosync.server.storage.RelayStore`) as a suite of checks.

Every store foliosync ships runs it (memory, SQLite, PostgreSQL); a store written for an app runs
it too, and one that passes can stand behind a relay. A check takes ``open_store``, an async
factory: every call opens a store on the *same* data (for a durable store, a reopen after a
close; for a shared one, a second store beside the first), and the check closes every store it
opened. Checks pick their own users, so they may share data with one another::

    import pytest
    from foliosync.testing.store_contract import store_checks

    @pytest.mark.parametrize("check", store_checks(durable=True, shared=False), ids=str)
    async def test_my_store(check, tmp_path):
        await check.run(lambda: MyStore.open(tmp_path / "relay.db"))

:func:`check_store` runs them all in one go. ``durable`` adds the checks that need the data to
outlive a close; ``shared`` those that open two stores at once on one database (what several
relays do). A failed check raises AssertionError with what the store did wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from foliosync.server.storage import RelayStore, StoredDocument, Watermark
from foliosync.sync.errors import RelayStoreError

__all__ = ["STORE_CHECKS", "OpenStore", "StoreCheck", "check_store", "store_checks"]

OpenStore = Callable[[], Awaitable[RelayStore]]
"""Opens one more store on the data under test (see the module's documentation)."""

_SETTLE_TIMEOUT = 30.0  # longest any one operation may take before the check calls it a hang


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """One rule of the contract; ``run(open_store)`` raises AssertionError if the store breaks
    it."""

    name: str
    run: Callable[[OpenStore], Awaitable[None]]
    durable: bool = False
    """Needs the data to outlive a close (a store reopened on it holds everything)."""
    shared: bool = False
    """Needs two stores open at once on the same data."""

    def __str__(self) -> str:
        return self.name


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _user() -> str:
    return f"user-{secrets.token_hex(4)}"


def _doc(kind: str = "wl") -> str:
    return f"{kind}-{secrets.token_hex(12)}"


@contextlib.asynccontextmanager
async def _opened(open_store: OpenStore) -> AsyncIterator[RelayStore]:
    store = await asyncio.wait_for(open_store(), _SETTLE_TIMEOUT)
    try:
        yield store
    finally:
        with contextlib.suppress(RelayStoreError):
            await asyncio.wait_for(store.close(), _SETTLE_TIMEOUT)


async def _load(store: RelayStore, user: str, doc: str) -> StoredDocument:
    loaded = await store.load(user, doc)
    _expect(loaded is not None, f"load({user!r}, {doc!r}) is None after appends to it")
    assert loaded is not None  # for the type checker
    return loaded


async def _raises_store_error(what: str, operation: Awaitable[object]) -> None:
    try:
        await asyncio.wait_for(operation, _SETTLE_TIMEOUT)
    except RelayStoreError:
        return
    except TimeoutError:
        raise AssertionError(f"{what} on a closed store hung instead of raising") from None
    except Exception as exc:
        raise AssertionError(
            f"{what} on a closed store raised {type(exc).__name__}, not RelayStoreError: {exc}"
        ) from exc
    raise AssertionError(f"{what} on a closed store did not raise RelayStoreError")


# -- the checks ----------------------------------------------------------------------------------


async def check_round_trip(open_store: OpenStore) -> None:
    """What is appended loads back: an empty snapshot, the updates in order, byte for byte."""
    async with _opened(open_store) as store:
        user, doc, other = _user(), _doc(), _doc("pf")
        _expect(
            await store.load(user, doc) is None, "load() of a document never stored is not None"
        )
        updates = [b"u0", bytes(range(256)), b"\x00" * 17, b"u3"]
        seqs = [await store.append(user, doc, u, 1000 + i, "d1") for i, u in enumerate(updates)]
        await store.append(user, other, b"another document", 5000, "d2")
        loaded = await _load(store, user, doc)
        _expect(
            loaded.snapshot == b"", f"a never compacted document has snapshot {loaded.snapshot!r}"
        )
        _expect(loaded.updates == updates, f"updates load back as {loaded.updates!r}")
        _expect(loaded.last_seq == seqs[-1], f"last_seq {loaded.last_seq} is not {seqs[-1]}")


async def check_seqs_increase(open_store: OpenStore) -> None:
    """Each append returns a positive int, above every earlier one of its document."""
    async with _opened(open_store) as store:
        user, doc, other = _user(), _doc(), _doc()
        mine = []
        for i in range(20):
            mine.append(await store.append(user, doc, f"u{i}".encode(), i, "d1"))
            await store.append(user, other, f"v{i}".encode(), i, "d1")
        _expect(
            all(isinstance(s, int) and s > 0 for s in mine), f"seqs are not positive ints: {mine}"
        )
        _expect(
            all(a < b for a, b in itertools.pairwise(mine)),
            f"one document's seqs do not increase: {mine}",
        )


async def check_watermark(open_store: OpenStore) -> None:
    """The watermark is the last append's time and device, and a compaction keeps it."""
    async with _opened(open_store) as store:
        user, doc = _user(), _doc()
        await store.append(user, doc, b"u1", 1_764_547_200_000, "phone")
        await store.append(user, doc, b"u2", 1_764_547_200_250, "laptop")
        loaded = await _load(store, user, doc)
        expected = Watermark(1_764_547_200_250, "laptop")
        _expect(loaded.watermark == expected, f"watermark {loaded.watermark}, not {expected}")
        await store.compact(user, doc, b"SNAPSHOT", loaded.last_seq)
        compacted = await _load(store, user, doc)
        _expect(
            compacted.watermark == expected,
            f"after compaction the watermark is {compacted.watermark}, not {expected}",
        )


async def check_compaction_keeps_later_rows(open_store: OpenStore) -> None:
    """compact(up_to_seq) replaces exactly the updates up to it by the snapshot, leaves the
    later ones and the other documents alone, and seqs go on rising after it."""
    async with _opened(open_store) as store:
        user, doc, other = _user(), _doc(), _doc()
        seqs = [await store.append(user, doc, f"u{i}".encode(), 1000 + i, "d1") for i in range(4)]
        other_seq = await store.append(user, other, b"untouched", 2000, "d2")
        snapshot = b"SNAPSHOT(u0..u2)" + bytes(range(256))
        await store.compact(user, doc, snapshot, seqs[2])
        later = await store.append(user, doc, b"u4", 3000, "d3")

        loaded = await _load(store, user, doc)
        _expect(loaded.snapshot == snapshot, f"the snapshot loads back as {loaded.snapshot!r}")
        _expect(
            loaded.updates == [b"u3", b"u4"],
            f"after compacting up to the third update the log is {loaded.updates!r}",
        )
        _expect(loaded.last_seq == later, f"last_seq {loaded.last_seq}, not {later}")
        untouched = await _load(store, user, other)
        _expect(
            (untouched.snapshot, untouched.updates, untouched.last_seq)
            == (b"", [b"untouched"], other_seq),
            "compacting one document changed another",
        )

        await store.compact(user, doc, b"SNAPSHOT(all)", later)
        loaded = await _load(store, user, doc)
        _expect(
            (loaded.snapshot, loaded.updates) == (b"SNAPSHOT(all)", []),
            f"compacting everything left {loaded.snapshot!r} and {loaded.updates!r}",
        )
        after = await store.append(user, doc, b"u5", 4000, "d1")
        _expect(after > later, f"the seq after a compaction ({after}) is not above {later}")
        # compacting a document never stored creates nothing
        ghost = _doc()
        await store.compact(user, ghost, b"S", 10)
        _expect(await store.load(user, ghost) is None, "compact() created a document")


async def check_compaction_racing_appends(open_store: OpenStore) -> None:
    """Appends that commit while a compaction runs are all kept."""
    async with _opened(open_store) as store:
        user, doc, other = _user(), _doc(), _doc()
        seqs = [await store.append(user, doc, f"u{i}".encode(), i, "d1") for i in range(5)]
        results = await asyncio.gather(
            store.compact(user, doc, b"SNAPSHOT", seqs[-1]),
            *(store.append(user, other, f"v{i}".encode(), i, "d2") for i in range(50)),
            *(store.append(user, doc, f"late{i}".encode(), 100 + i, "d3") for i in range(5)),
        )
        _expect(all(isinstance(r, int) for r in results[1:]), "an append returned no seq")
        compacted = await _load(store, user, doc)
        _expect(compacted.snapshot == b"SNAPSHOT", "the compaction's snapshot was lost")
        _expect(
            compacted.updates == [f"late{i}".encode() for i in range(5)],
            f"appends racing a compaction: the log is {compacted.updates!r}",
        )
        untouched = await _load(store, user, other)
        _expect(
            untouched.updates == [f"v{i}".encode() for i in range(50)],
            "appends to another document racing a compaction were lost or reordered",
        )


async def check_appends_keep_their_order(open_store: OpenStore) -> None:
    """Appends of one document handed in one after another, without waiting (a device's backlog,
    which the relay acknowledges in order), are stored in that order, each under its own seq."""
    async with _opened(open_store) as store:
        user, doc = _user(), _doc()
        updates = [f"in-order-{i:03d}".encode() for i in range(300)]
        seqs = await asyncio.gather(
            *(store.append(user, doc, u, i, "d1") for i, u in enumerate(updates))
        )
        _expect(
            all(a < b for a, b in itertools.pairwise(seqs)),
            f"seqs do not rise in the order of the appends: {seqs[:10]}...",
        )
        loaded = await _load(store, user, doc)
        _expect(loaded.updates == updates, "the log does not hold the updates in append order")
        _expect(loaded.last_seq == seqs[-1], f"last_seq {loaded.last_seq}, not {seqs[-1]}")


async def check_concurrent_appends(open_store: OpenStore) -> None:
    """Appends handed in at once are all stored, with distinct seqs, each visible as soon as
    its append returns."""
    async with _opened(open_store) as store:
        user, doc = _user(), _doc()

        async def append_then_read(i: int) -> int:
            update = f"update-{i}".encode()
            seq = await store.append(user, doc, update, 1000 + i, f"d{i % 3}")
            loaded = await _load(store, user, doc)
            _expect(update in loaded.updates, f"update {i} is not visible once its append returned")
            _expect(loaded.last_seq >= seq, f"last_seq {loaded.last_seq} is below a returned {seq}")
            return seq

        seqs = await asyncio.gather(*(append_then_read(i) for i in range(200)))
        _expect(len(set(seqs)) == 200, "two concurrent appends got the same seq")
        loaded = await _load(store, user, doc)
        _expect(
            sorted(loaded.updates) == sorted(f"update-{i}".encode() for i in range(200)),
            f"{len(loaded.updates)} of 200 concurrent updates stored (or some twice)",
        )
        _expect(loaded.last_seq == max(seqs), f"last_seq {loaded.last_seq}, not {max(seqs)}")


async def check_documents_per_user(open_store: OpenStore) -> None:
    """documents(user) lists that user's documents, sorted; one id under two users names two
    documents."""
    async with _opened(open_store) as store:
        alice, bob, carol = _user(), _user(), _user()
        wl, pf, wl2 = _doc("wl"), _doc("pf"), _doc("wl")
        await store.append(alice, wl, b"a1", 1, "d1")
        await store.append(alice, pf, b"a2", 2, "d1")
        await store.append(bob, wl2, b"b1", 3, "d2")
        await store.append(bob, wl, b"bob's own", 4, "d2")
        listed = await store.documents(alice)
        _expect(listed == sorted([wl, pf]), f"documents(alice) is {listed}")
        listed = await store.documents(bob)
        _expect(listed == sorted([wl, wl2]), f"documents(bob) is {listed}")
        listed = await store.documents(carol)
        _expect(listed == [], f"a user with no documents has {listed}")
        alice_wl, bob_wl = await _load(store, alice, wl), await _load(store, bob, wl)
        _expect(
            (alice_wl.updates, bob_wl.updates) == ([b"a1"], [b"bob's own"]),
            "two users' documents of the same id are mixed",
        )
        _expect(await store.load(bob, pf) is None, "bob can load alice's document")


async def check_many_documents(open_store: OpenStore) -> None:
    """Updates of many documents handed in at once each land in their own document."""
    async with _opened(open_store) as store:
        user = _user()
        docs = sorted(_doc() for _ in range(300))
        await asyncio.gather(
            *(store.append(user, d, f"{d}/{n}".encode(), n, "d1") for n in range(3) for d in docs)
        )
        listed = await store.documents(user)
        _expect(listed == docs, f"{len(listed)} of 300 documents listed")
        for d in docs:
            loaded = await _load(store, user, d)
            _expect(
                sorted(loaded.updates) == [f"{d}/{n}".encode() for n in range(3)],
                f"{d} holds {loaded.updates!r}",
            )


async def check_large_updates(open_store: OpenStore) -> None:
    """Big updates and snapshots come back byte for byte (8 MiB, and a burst of 64 KiB ones)."""
    async with _opened(open_store) as store:
        user, doc = _user(), _doc()
        big = secrets.token_bytes(8 << 20)
        burst = [secrets.token_bytes(64 << 10) for _ in range(32)]
        seq = await store.append(user, doc, big, 1, "d1")
        await asyncio.gather(*(store.append(user, doc, b, 2, "d1") for b in burst))
        loaded = await _load(store, user, doc)
        _expect(loaded.updates[0] == big, "an 8 MiB update did not load back as it was")
        _expect(sorted(loaded.updates[1:]) == sorted(burst), "a burst of 64 KiB updates was lost")
        await store.compact(user, doc, big + b"!", seq)
        loaded = await _load(store, user, doc)
        _expect(loaded.snapshot == big + b"!", "an 8 MiB snapshot did not load back as it was")


async def check_ping(open_store: OpenStore) -> None:
    """ping() answers while the store is open, and raises RelayStoreError once it is closed."""
    store = await open_store()
    try:
        await asyncio.wait_for(store.ping(), _SETTLE_TIMEOUT)
        await store.append(_user(), _doc(), b"u1", 1000, "d1")
        await asyncio.wait_for(store.ping(), _SETTLE_TIMEOUT)
    finally:
        await store.close()
    await _raises_store_error("ping()", store.ping())


async def check_closed_store_refuses_appends(open_store: OpenStore) -> None:
    """An append after close raises RelayStoreError; one racing close settles either way."""
    user, doc = _user(), _doc()
    store = await open_store()
    await store.append(user, doc, b"u", 1, "d1")
    outcome = await asyncio.wait_for(
        asyncio.gather(
            store.close(), store.append(user, doc, b"v", 2, "d1"), return_exceptions=True
        ),
        _SETTLE_TIMEOUT,
    )
    _expect(outcome[0] is None, f"close() racing an append raised {outcome[0]!r}")
    _expect(
        isinstance(outcome[1], int | RelayStoreError),
        f"an append racing close() ended with {outcome[1]!r}",
    )
    await _raises_store_error("append()", store.append(user, doc, b"too late", 3, "d1"))


async def check_closed_store_refuses_everything(open_store: OpenStore) -> None:
    """After close, load, documents and compact raise RelayStoreError too, rather than answer
    from what is left in memory or fail with a foreign error."""
    user, doc = _user(), _doc()
    store = await open_store()
    seq = await store.append(user, doc, b"u", 1, "d1")
    await store.close()
    await _raises_store_error("load()", store.load(user, doc))
    await _raises_store_error("documents()", store.documents(user))
    await _raises_store_error("compact()", store.compact(user, doc, b"S", seq))


async def check_reopened_store_holds_everything(open_store: OpenStore) -> None:
    """A store reopened on the same data holds every update, snapshot and watermark, and its
    seqs go on above the old ones."""
    alice, bob, doc, pf = _user(), _user(), _doc(), _doc("pf")
    async with _opened(open_store) as store:
        seqs = [await store.append(alice, doc, f"u{i}".encode(), 1000 + i, "d1") for i in range(3)]
        await store.compact(alice, doc, b"SNAPSHOT", seqs[0])
        await store.append(bob, pf, b"bob", 2000, "d9")
    async with _opened(open_store) as store:
        loaded = await _load(store, alice, doc)
        _expect(
            (loaded.snapshot, loaded.updates) == (b"SNAPSHOT", [b"u1", b"u2"]),
            f"reopened: {loaded.snapshot!r} and {loaded.updates!r}",
        )
        _expect(loaded.last_seq == seqs[2], f"reopened: last_seq {loaded.last_seq}, not {seqs[2]}")
        _expect(loaded.watermark == Watermark(1002, "d1"), f"reopened: {loaded.watermark}")
        _expect(await store.documents(alice) == [doc], "reopened: alice's documents differ")
        _expect(await store.documents(bob) == [pf], "reopened: bob's documents differ")
        after = await store.append(alice, doc, b"u3", 3000, "d2")
        _expect(after > seqs[2], f"reopened: the next seq {after} is not above {seqs[2]}")


async def check_shared_stores_append_at_once(open_store: OpenStore) -> None:
    """Two stores on one database appending to the same documents at once: every update is
    stored once, each document's seqs are distinct, and each store reads what the other wrote."""
    user, doc, other = _user(), _doc(), _doc()
    async with _opened(open_store) as first, _opened(open_store) as second:

        async def burst(store: RelayStore, name: str) -> list[int]:
            return list(
                await asyncio.gather(
                    *(
                        store.append(user, d, f"{name}-{d}-{i}".encode(), i, name)
                        for i in range(100)
                        for d in (doc, other)
                    )
                )
            )

        seqs_first, seqs_second = await asyncio.gather(burst(first, "a"), burst(second, "b"))
        for d, offset in ((doc, 0), (other, 1)):
            mine = seqs_first[offset::2] + seqs_second[offset::2]
            _expect(len(set(mine)) == 200, f"two stores gave {200 - len(set(mine))} seqs twice")
            for store in (first, second):
                loaded = await _load(store, user, d)
                expected = sorted(f"{n}-{d}-{i}".encode() for n in "ab" for i in range(100))
                _expect(
                    sorted(loaded.updates) == expected,
                    f"{len(loaded.updates)} of 200 updates appended by two stores at once",
                )
                _expect(loaded.last_seq == max(mine), "last_seq is not the highest seq returned")
        _expect(
            await first.documents(user) == await second.documents(user) == sorted([doc, other]),
            "two stores on one database list different documents",
        )


async def check_shared_compaction_keeps_the_other_stores_rows(open_store: OpenStore) -> None:
    """A compaction covers what its store loaded and appended: an update another store appended
    meanwhile, even with a lower seq, survives it, and so does the other store's snapshot."""
    user, doc = _user(), _doc()
    async with _opened(open_store) as first, _opened(open_store) as second:
        await first.load(user, doc)
        await second.load(user, doc)
        a1 = await first.append(user, doc, b"a1", 1, "a")
        await second.append(user, doc, b"b1", 2, "b")
        a2 = await first.append(user, doc, b"a2", 3, "a")
        await first.compact(user, doc, b"SNAPSHOT(a1,a2)", max(a1, a2))
        loaded = await _load(second, user, doc)
        _expect(
            b"b1" in loaded.updates,
            "a compaction dropped an update another store appended meanwhile",
        )
        _expect(
            b"SNAPSHOT(a1,a2)" in (loaded.snapshot, *loaded.updates),
            "the compaction's snapshot is not stored",
        )
        # second compacts what it loaded; then first, which never loaded second's snapshot,
        # compacts again: second's snapshot must survive first's
        await second.compact(user, doc, b"SNAPSHOT(b)", loaded.last_seq)
        a3 = await first.append(user, doc, b"a3", 4, "a")
        await first.compact(user, doc, b"SNAPSHOT(a)", a3)
        loaded = await _load(first, user, doc)
        parts = (loaded.snapshot, *loaded.updates)
        for part in (b"SNAPSHOT(b)", b"SNAPSHOT(a)"):
            _expect(part in parts, f"{part!r} was lost by two stores compacting one document")


STORE_CHECKS: tuple[StoreCheck, ...] = (
    StoreCheck("round_trip", check_round_trip),
    StoreCheck("seqs_increase", check_seqs_increase),
    StoreCheck("watermark", check_watermark),
    StoreCheck("compaction_keeps_later_rows", check_compaction_keeps_later_rows),
    StoreCheck("compaction_racing_appends", check_compaction_racing_appends),
    StoreCheck("concurrent_appends", check_concurrent_appends),
    StoreCheck("appends_keep_their_order", check_appends_keep_their_order),
    StoreCheck("documents_per_user", check_documents_per_user),
    StoreCheck("many_documents", check_many_documents),
    StoreCheck("large_updates", check_large_updates),
    StoreCheck("ping", check_ping),
    StoreCheck("closed_store_refuses_appends", check_closed_store_refuses_appends),
    StoreCheck("closed_store_refuses_everything", check_closed_store_refuses_everything),
    StoreCheck(
        "reopened_store_holds_everything", check_reopened_store_holds_everything, durable=True
    ),
    StoreCheck("shared_stores_append_at_once", check_shared_stores_append_at_once, shared=True),
    StoreCheck(
        "shared_compaction_keeps_the_other_stores_rows",
        check_shared_compaction_keeps_the_other_stores_rows,
        shared=True,
    ),
)
"""Every check; :func:`store_checks` picks those a store can run."""


def store_checks(*, durable: bool, shared: bool) -> list[StoreCheck]:
    """The checks for a store that is (or is not) ``durable`` and ``shared``."""
    return [c for c in STORE_CHECKS if (durable or not c.durable) and (shared or not c.shared)]


async def check_store(open_store: OpenStore, *, durable: bool, shared: bool) -> None:
    """Run every check that applies, one after the other; the first failure raises."""
    for check in store_checks(durable=durable, shared=shared):
        try:
            await check.run(open_store)
        except AssertionError as exc:
            raise AssertionError(f"store contract {check.name}: {exc}") from exc
