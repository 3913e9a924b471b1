"""Valid inputs to start from: one or more encoded frames of every type, and real pycrdt updates.

Mutations of valid inputs reach far deeper than random bytes: a decoder refuses almost every
random message at its first byte, but a frame with one field wrong gets through every check
before that field's.
"""

from __future__ import annotations

import random

from pycrdt import Array, Doc, Map, Text

from foliosync.sync.protocol.frames import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Frame,
    Hello,
    Ping,
    Pong,
    PriceBatch,
    PriceSnapshot,
    Publish,
    Published,
    Resync,
    Subscribe,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    encode_frame,
)

__all__ = ["WATCHLIST", "crdt_updates", "frame_seeds", "sample_frames"]

WATCHLIST = "wl-52864113d0bf7ec5b0a294a5"
"""The id of the watchlist "Tech" (PROTOCOL.md, section 6.1)."""
_TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def crdt_updates(seed: int = 0) -> list[bytes]:
    """Real Yjs V1 updates: a watchlist as the devices write it, every shared type, deletions,
    several clients, and the empty update and state vector."""
    rng = random.Random(seed)
    updates: list[bytes] = [b"\x00\x00"]
    doc: Doc = Doc(client_id=1)  # type: ignore[type-arg]
    meta = doc.get("meta", type=Map)
    symbols = doc.get("symbols", type=Map)
    fields = doc.get("fields", type=Map)
    before = doc.get_state()
    with doc.transaction():
        meta["kind"] = "watchlist"
        meta["name"] = "Tech"
    updates.append(doc.get_update(before))
    for symbol in ("AAPL", "MSFT", "BRK.B"):
        before = doc.get_state()
        stamp = f"0019ad7358400{rng.randrange(1 << 16):04x}"
        with doc.transaction():
            symbols[f"{symbol}\x1fdev1"] = {"t": stamp}
            fields[f"{symbol}\x1fpos\x1fdev1"] = [stamp, "a0"]
        updates.append(doc.get_update(before))
    before = doc.get_state()
    del symbols["MSFT\x1fdev1"]
    updates.append(doc.get_update(before))  # a deletion
    other: Doc = Doc(client_id=2)  # type: ignore[type-arg]
    other.apply_update(doc.get_update())
    before = other.get_state()
    rich = other.get("rich", type=Map)
    with other.transaction():
        rich["nested"] = Map({"n": 1.5, "list": [1, "two", None, True]})
        rich["array"] = Array([1, 2, 3, "x" * 40])
        rich["text"] = Text("hello")
        rich["big"] = 2**53
    updates.append(other.get_update(before))
    text = rich["text"]
    assert isinstance(text, Text)
    before = other.get_state()
    text.insert(2, "ZZZ")
    del text[0:1]
    updates.append(other.get_update(before))
    updates.append(doc.get_update())  # whole documents
    updates.append(other.get_update())
    return updates


def sample_frames() -> list[Frame]:
    """At least one valid frame of every type, with and without their optional fields."""
    update = crdt_updates()[2]
    tick = ("AAPL", "187.25", 1764547200000, 7, None)
    return [
        Hello(PROTOCOL_VERSION, _TOKEN, "foliosync-js"),
        Hello(PROTOCOL_VERSION, "", ""),
        Welcome(PROTOCOL_VERSION, "alice", "js1", 1764547200000, ("index", WATCHLIST)),
        Welcome(PROTOCOL_VERSION, "alice", "js1", 0, ()),
        Error("bad_seq", "Update seq 1 after seq 1"),
        Error("bad_update", "not a valid update", WATCHLIST, 3),
        Error("not_found", "no such document", WATCHLIST),
        Ping(7),
        Pong(7),
        SyncRequest(WATCHLIST, b"\x00"),
        SyncRequest("index", b"\x01\x01\x05"),
        SyncReply(WATCHLIST, b"\x00\x00", b"\x00", None, None),
        SyncReply(WATCHLIST, update, b"\x01\x01\x02", 1764547200250, "js1"),
        Update(WATCHLIST, 1, update),
        Update(WATCHLIST, 0, update, 1764547200250, "js1"),
        Ack(WATCHLIST, 1),
        Subscribe(("AAPL", "MSFT", " brk.b ")),
        Subscribe(()),
        Resync(("AAPL",)),
        PriceSnapshot((tick,)),
        PriceBatch((tick, ("MSFT", "410.5", 1764547200001, 3, "100"))),
        Publish(1, (("AAPL", "187.3", 1764547200000), ("MSFT", 410, "2026-11-24T15:00:00Z", 5))),
        Published(1, 1, ((1, "price must be positive"),)),
    ]


def frame_seeds() -> list[bytes]:
    """The encoded sample frames: the corpus every frame mutation starts from."""
    return [encode_frame(frame) for frame in sample_frames()]
