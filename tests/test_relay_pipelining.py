"""A device's backlog is pipelined: checked while earlier updates are written, acked in order,
each only once stored; a write that fails ends the connection and acknowledges nothing after."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from pycrdt import Doc, Map

from foliosync.server.storage import MemoryRelayStore, RelayStoreError
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol import Ack, Error, ErrorCode, Update

TECH = document_id(DocumentKind.WATCHLIST, "Tech")


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


class GatedStore(MemoryRelayStore):
    """Appends wait at a gate while it is closed; ``fail`` makes the next ones raise."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.fail: set[bytes] = set()

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        if update in self.fail:
            raise RelayStoreError("the disk is gone")
        return await super().append(user, doc_id, update, changed_at, changed_by)


@contextlib.asynccontextmanager
async def synced_device(
    tmp_path: Path, relay_server: Any, store: GatedStore
) -> AsyncIterator[tuple[Any, aiohttp.ClientSession, Any, Any]]:
    """A relay on ``store`` and one device that synced TECH and created it (its first update
    goes alone: a new document is never pipelined)."""
    services = _services()
    async with (
        relay_server(tmp_path / "relay", store=store) as relay,
        aiohttp.ClientSession() as http,
    ):
        device = services.RawClient(await http.ws_connect(relay.url))
        await device.hello(relay.token("alice", "d1"))
        await device.sync(TECH)
        edits = services.WatchlistEdits()
        await device.send(Update(TECH, 1, edits.add("FIRST")))
        assert await device.receive() == Ack(TECH, 1)
        yield relay, http, device, edits


async def eventually(condition: Any, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.01)


async def test_a_backlog_is_checked_while_written_and_acked_in_order_once_stored(
    tmp_path: Path, relay_server: Any
) -> None:
    store = GatedStore()
    async with synced_device(tmp_path, relay_server, store) as (_relay, _http, device, edits):
        store.gate.clear()
        for seq in range(2, 12):
            await device.send(Update(TECH, seq, edits.add(f"S{seq:02d}")))
        # All ten read, checked and handed to the store while none is written yet...
        await eventually(lambda: store.waiting == 10)
        # ...and none acknowledged before its write returns.
        try:
            frame = await device.receive(timeout=0.3)
        except TimeoutError:
            frame = None
        assert frame is None, frame
        store.gate.set()
        acks = [await device.receive() for _ in range(10)]
        assert acks == [Ack(TECH, seq) for seq in range(2, 12)]
        stored = await store.load("alice", TECH)
        assert stored is not None and len(stored.updates) == 11


async def test_a_failed_write_in_a_backlog_ends_the_connection_and_acks_nothing_after(
    tmp_path: Path, relay_server: Any
) -> None:
    store = GatedStore()
    services = _services()
    async with synced_device(tmp_path, relay_server, store) as (relay, http, device, edits):
        store.gate.clear()
        updates = [edits.add(f"S{seq:02d}") for seq in range(2, 7)]
        store.fail.add(updates[2])  # seq 4
        for seq, update in enumerate(updates, start=2):
            await device.send(Update(TECH, seq, update))
        await eventually(lambda: store.waiting == 5)
        store.gate.set()
        frames = []
        while (frame := await device.receive()) is not None:  # until the relay closes
            frames.append(frame)
        assert frames[:2] == [Ack(TECH, 2), Ack(TECH, 3)]
        error = frames[2]
        assert isinstance(error, Error) and error.code == ErrorCode.INTERNAL and error.fatal
        assert frames[3:] == []  # 5 and 6 were stored, but an Ack would settle 4 too
        assert device.ws.close_code == 1011

        # What was stored is there; the device resends the rest on its next connection.
        again = services.RawClient(await http.ws_connect(relay.url))
        await again.hello(relay.token("alice", "d1"))
        reply = await again.sync(TECH)
        copy: Doc = Doc()
        copy.apply_update(reply.update)
        held = {key.split("\x1f")[0] for key in copy.get("symbols", type=Map)}
        # 5 and 6 wait in the store for 4, which the device never saw acknowledged.
        assert {"FIRST", "S02", "S03"} <= held and "S04" not in held
