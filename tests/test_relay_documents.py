"""The relay's documents: an update is acknowledged only once what it holds is stored."""

from __future__ import annotations

import asyncio

import pytest
from pycrdt import Doc, Map

from foliosync.server.documents import RelayDocuments
from foliosync.server.storage import MemoryRelayStore, RelayStoreError

DOC = "alice/watchlist:tech"


class GatedStore(MemoryRelayStore):
    """The memory store, whose appends wait for a gate and may then fail (a slow, full disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.fail = False

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        await self.gate.wait()
        if self.fail:
            raise RelayStoreError("simulated full disk")
        return await super().append(user, doc_id, update, changed_at, changed_by)


def an_update() -> bytes:
    doc: Doc = Doc()
    doc["m"] = Map()
    doc["m"]["note"] = "hello"
    return doc.get_update()


@pytest.mark.parametrize("fails", [False, True])
async def test_the_same_update_resent_while_the_first_is_stored_waits_for_that_write(
    fails: bool,
) -> None:
    store = GatedStore()
    store.fail = fails
    documents = RelayDocuments(store)
    update = an_update()
    first = asyncio.ensure_future(documents.apply("alice", DOC, update, device="d1", now_ms=1))
    await asyncio.sleep(0.01)
    again = asyncio.ensure_future(documents.apply("alice", DOC, update, device="d1", now_ms=2))
    await asyncio.sleep(0.01)
    assert not again.done()  # nothing new in memory, yet not stored: no acknowledgement yet
    store.gate.set()
    if fails:
        with pytest.raises(RelayStoreError):
            await first
        with pytest.raises(RelayStoreError):
            await again
        assert await store.load("alice", DOC) is None
    else:
        assert (await first).changed and not (await again).changed
        assert await store.load("alice", DOC) is not None


async def test_evicted_documents_are_freed() -> None:
    # Their observer once kept each record, and so each Doc, alive forever: memory grew with
    # every document load, whatever the bound.
    import gc

    from pycrdt import Doc as _Doc

    def live_docs() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, _Doc))

    store = MemoryRelayStore()
    docs = RelayDocuments(store, max_hot=5)
    before = live_docs()
    for n in range(200):
        doc_id = f"wl-{n:024x}"
        await docs.state("alice", doc_id, b"\x00")
    assert docs.hot_count == 5
    assert live_docs() - before <= 5 * 2  # the hot ones (and at most a scratch replica each)


async def test_a_peers_change_during_a_load_is_in_the_loaded_copy() -> None:
    # A relay of a group loads a document while a peer relay stores a change of it: the store
    # read may predate the peer's commit, and the change reached this relay while it was not hot.
    from foliosync.server.storage import StoredDocument, Watermark

    release = asyncio.Event()

    class SlowStore(MemoryRelayStore):
        async def load(self, user: str, doc_id: str) -> StoredDocument | None:
            stored = await super().load(user, doc_id)
            await release.wait()
            return stored

    peer: Doc = Doc()
    peer.get("symbols", type=Map)["AAPL\x1fp"] = {"t": "0019ad73584000000"}
    docs = RelayDocuments(SlowStore())
    loading = asyncio.ensure_future(docs.state("alice", "wl-" + "0" * 24, b"\x00"))
    await asyncio.sleep(0)
    assert not docs.apply_peer("alice", "wl-" + "0" * 24, peer.get_update(), Watermark(1, "p"))
    release.set()
    await loading
    diff, _, watermark = await docs.state("alice", "wl-" + "0" * 24, b"\x00")
    copy: Doc = Doc()
    copy.apply_update(diff)
    assert "AAPL\x1fp" in copy.get("symbols", type=Map)
    assert watermark == Watermark(1, "p")


async def test_the_next_update_is_judged_on_a_candidate_holding_the_peers_changes() -> None:
    """A relay of a group keeps its scratch replica up with its peers' changes (not rebuilt
    from the document at each alternation of writers): the rules must still see them."""
    from foliosync.server.storage import Watermark
    from foliosync.sync.model import DocumentKind
    from foliosync.sync.model.schema import Candidate

    doc_id = "wl-" + "1" * 24
    docs = RelayDocuments(MemoryRelayStore())
    seen: list[set[str]] = []

    async def rule(candidate: Candidate) -> None:
        seen.append(set(candidate.doc.get("symbols", type=Map).keys()))

    def edit(doc: Doc, key: str) -> bytes:
        before = doc.get_state()
        doc.get("symbols", type=Map)[key] = {"t": "0019ad73584000000"}
        return doc.get_update(before)

    device: Doc = Doc()
    first = edit(device, "AAPL\x1fa")
    await docs.apply(
        "alice", doc_id, first, device="d", now_ms=1, kind=DocumentKind.WATCHLIST, before_apply=rule
    )
    peer: Doc = Doc()
    peer.apply_update(device.get_update())
    assert docs.apply_peer("alice", doc_id, edit(peer, "MSFT\x1fb"), Watermark(2, "p"))
    third = edit(device, "NVDA\x1fc")  # made without the peer's change, as a device would
    await docs.apply(
        "alice", doc_id, third, device="d", now_ms=3, kind=DocumentKind.WATCHLIST, before_apply=rule
    )
    assert seen == [{"AAPL\x1fa"}, {"AAPL\x1fa", "MSFT\x1fb", "NVDA\x1fc"}]


async def test_an_idle_documents_scratch_replica_is_dropped_and_rebuilt_whole() -> None:
    # The replica in which updates are checked costs as much memory as its document: kept while
    # updates come, dropped after a pause, rebuilt from the document at the next update.
    import gc

    from pycrdt import Doc as _Doc

    from foliosync.sync.model import DocumentKind, EditContext, Watchlist
    from foliosync.sync.model.schema import Candidate

    def live_docs() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, _Doc))

    seen: list[set[str]] = []

    async def before_apply(candidate: Candidate) -> None:
        model = candidate.model()
        assert isinstance(model, Watchlist)
        seen.append(set(model.symbols))
        model.close()  # it observes the replica, which it would keep alive

    device: Doc = Doc()
    watchlist = Watchlist(device, EditContext("phone"))
    updates: list[bytes] = []
    device.observe(lambda event: updates.append(event.update))
    watchlist.initialize("Tech")
    watchlist.add(["AAPL"])
    watchlist.add(["MSFT"])
    docs = RelayDocuments(MemoryRelayStore())
    doc_id = "watchlist:" + "0" * 24
    before = live_docs()

    async def apply(update: bytes) -> None:
        await docs.apply(
            "alice",
            doc_id,
            update,
            device="phone",
            now_ms=1,
            kind=DocumentKind.WATCHLIST,
            before_apply=before_apply,
        )

    await apply(updates[0])
    await apply(updates[1])
    assert live_docs() - before == 2  # the document and its replica
    assert docs.drop_idle_scratches(60.0) == 0  # used a moment ago: kept
    assert docs.drop_idle_scratches(0.0) == 1
    assert live_docs() - before == 1
    await apply(updates[2])  # checked in a replica rebuilt from everything taken so far
    assert seen[-1] == {"AAPL", "MSFT"}
    assert live_docs() - before == 2
