"""PROTOCOL.md against the code: its worked example is what the encoder writes, byte for byte, and
it names every frame and error code, so a client written from it alone does not have to guess.

``.venv/bin/python tests/test_protocol_spec.py`` prints the example's hex blocks, for when a frame
changes and the spec must follow.
"""

from __future__ import annotations

import re
from pathlib import Path

from pycrdt import Doc, Map

from foliosync.server.auth import issue_token, verify_token
from foliosync.sync.model import DocumentKind, EditContext, Watchlist, document_id
from foliosync.sync.protocol import (
    Ack,
    Error,
    ErrorCode,
    Frame,
    Hello,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    decode_frame,
    encode_frame,
)
from foliosync.sync.protocol import frames as frames_module

SPEC = Path(__file__).resolve().parent.parent / "PROTOCOL.md"

# The example's fixed inputs: a secret, an instant (2025-12-01T00:00:00Z) and a Yjs client id.
SECRET = b"an-example-secret-for-protocol-md-only"
NOW_S = 1_764_547_200
CLIENT_ID = 1
TECH = document_id(DocumentKind.WATCHLIST, "Tech")
STAMP = f"{NOW_S * 1000:013x}0000"  # the HLC stamp of that instant, counter 0


def example_token() -> str:
    return issue_token(SECRET, "alice", device="js1", ttl_seconds=30 * 86400, now=NOW_S)


def example_update() -> bytes:
    """Watchlist "Tech" created with AAPL by device js1, written as plain map entries."""
    doc: Doc = Doc(client_id=CLIENT_ID)
    meta = doc.get("meta", type=Map)
    symbols = doc.get("symbols", type=Map)
    fields = doc.get("fields", type=Map)
    with doc.transaction():
        meta["kind"] = "watchlist"
        meta["name"] = "Tech"
        symbols["AAPL\x1fjs1"] = {"t": STAMP}
        fields["AAPL\x1fpos\x1fjs1"] = [STAMP, "a0"]
    return doc.get_update()


def examples() -> dict[str, Frame]:
    return {
        "Hello": Hello(1, example_token(), "foliosync-js"),
        "Welcome": Welcome(1, "alice", "js1", NOW_S * 1000, ("index", TECH)),
        "SyncRequest": SyncRequest(TECH, b"\x00"),
        "SyncReply": SyncReply(TECH, b"\x00\x00", b"\x00", None, None),
        "Update": Update(TECH, 1, example_update()),
        "Ack": Ack(TECH, 1),
        "Update-fanned-out": Update(TECH, 0, example_update(), NOW_S * 1000 + 250, "js1"),
        "Error": Error("bad_seq", f"Update seq 1 of '{TECH}' after seq 1: seqs must increase"),
    }


def hex_block(data: bytes) -> str:
    """16 bytes a line, bytes separated by spaces."""
    lines = [data[i : i + 16].hex(" ") for i in range(0, len(data), 16)]
    return "\n".join(lines)


_BLOCK = re.compile(r"<!-- example: ([\w-]+) -->\n```text\n(.*?)```", re.S)


def spec_blocks() -> dict[str, bytes]:
    text = SPEC.read_text(encoding="utf-8")
    return {name: bytes.fromhex(body.replace("\n", " ")) for name, body in _BLOCK.findall(text)}


def test_the_worked_example_is_what_the_encoder_writes() -> None:
    blocks = spec_blocks()
    expected = examples()
    assert sorted(blocks) == sorted(expected)
    for name, frame in expected.items():
        assert blocks[name] == encode_frame(frame), f"the {name} example in PROTOCOL.md is stale"
        assert decode_frame(blocks[name]) == frame


def test_the_example_token_is_one_the_relay_accepts() -> None:
    identity = verify_token(SECRET, example_token(), now=NOW_S + 60)
    assert (identity.user, identity.device, identity.scopes) == ("alice", "js1", {"sync"})


def test_the_example_update_is_a_watchlist_holding_aapl() -> None:
    doc: Doc = Doc()
    doc.apply_update(example_update())
    watchlist = Watchlist(doc, EditContext("reader"))
    assert (watchlist.name, watchlist.symbols) == ("Tech", ["AAPL"])
    assert watchlist.entries()[0].position == "a0"


def test_the_spec_names_every_frame_and_every_error_code() -> None:
    text = SPEC.read_text(encoding="utf-8")
    for code in ErrorCode:
        assert f"`{code.value}`" in text, f"error code {code.value} is not in PROTOCOL.md"
    for cls in frames_module._FRAME_TYPES:
        assert re.search(rf"^\| {cls._CODE} \| {cls.__name__} \|", text, re.M), cls.__name__
    assert TECH in text and document_id(DocumentKind.PORTFOLIO, "Main") in text


if __name__ == "__main__":
    for name, frame in examples().items():
        print(f"<!-- example: {name} -->\n```text\n{hex_block(encode_frame(frame))}\n```\n")
