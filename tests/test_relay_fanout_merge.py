"""A busy document fanned out wide: its changes reach each device merged, whole, never echoed."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from pycrdt import Doc, Map

from foliosync.server.fanout import Change, websocket_binary_frame
from foliosync.server.held_changes import HeldDocument
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol import Ack, Update, encode_frame
from foliosync.sync.updates import decode_update

TECH = document_id(DocumentKind.WATCHLIST, "Tech")
RECEIVERS = 70  # more than the relay's wide fan-out (64 connections in one flush)


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


Editor = _services().WatchlistEdits


async def receive_until(raw: Any, want: set[str], frames: list[Update]) -> Doc:
    """Apply the Updates ``raw`` gets until its copy holds every symbol of ``want``."""
    doc: Doc = Doc()
    symbols = doc.get("symbols", type=Map)
    while {key.split("\x1f")[0] for key in symbols} < want:
        frame = await raw.receive(timeout=10)
        if isinstance(frame, Update):
            frames.append(frame)
            doc.apply_update(frame.update)
    return doc


async def test_a_busy_documents_changes_reach_every_device_merged_and_whole(
    tmp_path: Path, relay_server: Any
) -> None:
    services = _services()
    # A long delay, so that the burst below surely falls in one held flush or two.
    async with (
        relay_server(tmp_path / "relay", fanout_flush_delay=0.3) as relay,
        aiohttp.ClientSession() as http,
    ):

        async def connect(device: str) -> Any:
            raw = services.RawClient(await http.ws_connect(relay.url))
            await raw.hello(relay.token("alice", device))
            await raw.sync(TECH)
            return raw

        editor = await connect("editor")
        second = await connect("second")  # edits once during the burst, and receives
        receivers = [await connect(f"r{k:02d}") for k in range(RECEIVERS)]
        first_hand, other_hand = Editor(), Editor()

        # The first change fans out at once (to 71 connections: a wide flush); the burst
        # after it is held and merged.
        await editor.send(Update(TECH, 1, first_hand.add("S000")))
        assert await editor.receive() == Ack(TECH, 1)
        burst = [f"S{i:03d}" for i in range(1, 31)]
        for seq, symbol in enumerate(burst, start=2):
            await editor.send(Update(TECH, seq, first_hand.add(symbol)))
            if seq == 10:
                await second.send(Update(TECH, 1, other_hand.add("OTHER")))
        acks = [await editor.receive() for _ in burst]
        assert acks == [Ack(TECH, seq) for seq in range(2, 32)]  # in order, nothing else

        want = {"S000", *burst, "OTHER"}
        got: list[list[Update]] = [[] for _ in receivers]
        docs = await asyncio.gather(
            *(receive_until(r, want, frames) for r, frames in zip(receivers, got, strict=True))
        )
        assert len({d.get_state() for d in docs}) == 1  # every copy alike
        for frames in got:
            # 32 changes in fewer frames: the held ones came merged.
            assert len(frames) < len(want), [len(f.update) for f in frames]
            assert frames[-1].changed_by in {"editor", "second"}
        # Both editors' changes came in one merged update for those who made neither.
        editor_client = first_hand.doc.client_id
        other_client = other_hand.doc.client_id
        assert any(
            {editor_client, other_client} <= set(decode_update(f.update).structs)
            for frames in got
            for f in frames
        )

        # The second editor got the burst but never its own change back.
        seen: list[Update] = []
        mine_back = False
        while True:
            frame = await second.receive(timeout=10)
            if frame == Ack(TECH, 1):
                continue
            if isinstance(frame, Update):
                seen.append(frame)
                mine_back |= other_client in decode_update(frame.update).structs
                copy: Doc = Doc()
                for update in seen:
                    copy.apply_update(update.update)
                held = {k.split("\x1f")[0] for k in copy.get("symbols", type=Map)}
                if held >= want - {"OTHER"}:
                    break
        assert not mine_back
        # And the first editor only the second's change, none of its own.
        echoed = await receive_until(editor, {"OTHER"}, [])
        assert set(decode_update(echoed.get_update()).structs) == {other_client}
        await editor.quiet()


def change(update: bytes, origin: str, n: int) -> Change:
    return Change("alice", TECH, update, n, origin, origin, wire=bytes([n]))


class Peer:
    def __init__(self, id: str) -> None:
        self.id = id


def test_who_gets_what_of_a_held_document() -> None:
    a, b, late, first = Peer("a"), Peer("b"), Peer("late"), Peer("first")
    one, other = Editor(), Editor()
    c1 = change(one.add("AAA"), "first", 1)
    c2 = change(other.add("BBB"), "a", 2)
    c3 = change(one.add("CCC"), "first", 3)
    held: HeldDocument[Peer] = HeldDocument()
    for peer in (a, b):
        held.add(peer, c1)
    for peer in (b, first, late):  # a made c2: it is not handed to a
        held.add(peer, c2)
    for peer in (a, b, late):  # nor c3 to first, which made it
        held.add(peer, c3)
    assert held.changes == [c1, c2, c3]  # each once, though handed to several receivers
    deliveries = dict(held.deliveries())
    # Who made one of them gets the others one by one; who synced late, those from then on.
    assert deliveries[a] == [c1, c3]
    assert deliveries[first] == [c2]
    assert deliveries[late] == [c2, c3]
    # Who gets all of them gets one merged change: the last one's watermark, the same content.
    [merged] = deliveries[b]
    assert (merged.changed_at, merged.changed_by, merged.origin) == (3, "first", "")
    doc: Doc = Doc()
    doc.apply_update(merged.update)
    assert sorted(doc.get("symbols", type=Map).keys()) == ["AAA\x1fraw", "BBB\x1fraw", "CCC\x1fraw"]
    decoded = Update(TECH, 0, merged.update, 3, "first")
    assert merged.frame == encode_frame(decoded)
    assert merged.wire == websocket_binary_frame(merged.frame)


def test_a_held_document_of_one_change_is_sent_as_it_is() -> None:
    peer = Peer("x")
    held: HeldDocument[Peer] = HeldDocument()
    c = change(Editor().add("AAA"), "y", 1)
    held.add(peer, c)
    assert held.deliveries() == [(peer, [c])]


def test_changes_that_cannot_merge_go_one_by_one() -> None:
    held: HeldDocument[Peer] = HeldDocument()
    c1, c2 = change(b"\x07garbage", "y", 1), change(Editor().add("AAA"), "y", 2)
    peer = Peer("x")
    held.add(peer, c1)
    held.add(peer, c2)
    assert held.deliveries() == [(peer, [c1, c2])]
