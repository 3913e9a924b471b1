"""The relay writes its own WebSocket frames on its fast path: check them at every size."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from foliosync.server.relay import websocket_binary_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_frames_follow_rfc6455_length_encoding(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = websocket_binary_frame(payload)
    assert frame[0] == 0x82  # FIN, binary
    length = frame[1]
    assert not length & 0x80  # a server never masks
    if size < 126:
        header = 2
        assert length == size
    elif size < 65536:
        header = 4
        assert length == 126 and struct.unpack(">H", frame[2:4])[0] == size
    else:
        header = 10
        assert length == 127 and struct.unpack(">Q", frame[2:10])[0] == size
    assert frame[header:] == payload


async def test_a_large_document_reaches_a_new_device_whole(
    tmp_path: Any, relay_server: Any, open_replica: Any, helpers: Any
) -> None:
    # The default relay (no small frame limit): a SyncReply of ~250 KB takes the 8-byte length.
    async with relay_server(tmp_path / "relay") as relay:
        laptop = await open_replica("laptop")
        tech = await laptop.create_watchlist("Tech")
        symbols = [f"S{i:05d}X" for i in range(4000)]  # within the 5,000 a watchlist may hold
        for start in range(0, len(symbols), 1000):
            await tech.add(symbols[start : start + 1000], note="x" * 20)
        client = helpers.fast_client(laptop, relay.url, relay.token("alice", "laptop"))
        await client.sync_once(timeout=30)

        phone = await open_replica("phone")
        await helpers.fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once(30)
        got = await phone.watchlist("Tech")
        assert got.symbols == tech.symbols and len(got.symbols) == 4000
        assert {e.note for e in got.entries()} == {"x" * 20}
        whole = await phone.diff(tech.id, b"\x00")  # the document from nothing: what was sent
        assert len(whole) > 65536  # so the reply really needed the 8-byte length
