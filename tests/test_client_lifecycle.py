"""Opening and closing: a replica or a sync client never keeps a process alive, and the
``async with`` forms close what they opened, by an exception too.

The process tests run real scripts in a subprocess, as an app would, bounded by a timeout: a
regression shows up as a timeout here, not as a hung test run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from foliosync.client import Replica, SyncClient
from foliosync.sync.errors import ReplicaCorrupt
from foliosync.sync.model import DocumentKind

EXIT_WITHIN = 20.0  # seconds: a clean exit takes well under one


async def run_script(source: str, *args: str) -> tuple[int, str, str]:
    """Run ``source`` in a fresh interpreter without blocking this loop (which may serve a
    relay); fail the test if the process does not exit by itself."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(source),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONDEVMODE": "", "PYTHONWARNINGS": ""},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), EXIT_WITHIN)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"the process did not exit within {EXIT_WITHIN:g} s")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


OPEN_AND_RAISE = """
    import asyncio, sys
    from foliosync.client import Replica

    async def main() -> None:
        replica = await Replica.open(sys.argv[1])
        await replica.create_watchlist("Tech")
        raise RuntimeError("the app failed")

    asyncio.run(main())
"""

OPEN_AND_FORGET = """
    import asyncio, sys
    from foliosync.client import Replica

    async def main() -> None:
        replica = await Replica.open(sys.argv[1])
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        print("edited", flush=True)

    asyncio.run(main())
"""

START_AND_RAISE = """
    import asyncio, sys
    from foliosync.client import Replica, SyncClient

    async def main() -> None:
        replica = await Replica.open(sys.argv[1])
        client = SyncClient(replica, sys.argv[2], sys.argv[3])
        client.start()
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        if sys.argv[4] == "wait":
            await client.wait_in_sync(10)
        raise RuntimeError("the app failed")

    asyncio.run(main())
"""


async def test_a_replica_left_open_by_an_exception_does_not_hang_the_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.db"
    code, _, err = await run_script(OPEN_AND_RAISE, str(path))
    assert code == 1
    assert "RuntimeError: the app failed" in err
    assert err.count("Traceback") == 1, err  # the app's, and no other from a thread
    async with Replica.open(path) as replica:  # the edit made before the failure is there
        assert [d.name for d in replica.documents()] == ["Tech"]


async def test_a_replica_never_closed_does_not_hang_the_process(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    code, out, err = await run_script(OPEN_AND_FORGET, str(path))
    assert (code, out) == (0, "edited\n"), err
    assert "Traceback" not in err, err
    async with Replica.open(path) as replica:
        assert (await replica.watchlist("Tech")).symbols == ["AAPL"]


@pytest.mark.parametrize("when", ["connecting", "connected"])
async def test_a_sync_client_never_stopped_does_not_hang_the_process(
    tmp_path: Path, relay: Any, when: str
) -> None:
    path = tmp_path / "r.db"
    token = relay.token("alice", "d1")
    code, _, err = await run_script(
        START_AND_RAISE, str(path), relay.url, token, "wait" if when == "connected" else "no"
    )
    assert code == 1 and "RuntimeError: the app failed" in err, err
    assert err.count("Traceback") == 1, err


async def test_a_sync_client_to_an_unreachable_relay_does_not_hang_the_process(
    tmp_path: Path,
) -> None:
    code, _, err = await run_script(
        START_AND_RAISE, str(tmp_path / "r.db"), "ws://127.0.0.1:9/ws", "token", "no"
    )
    assert code == 1 and "RuntimeError: the app failed" in err, err


RELAY_STORE_AND_RAISE = """
    import asyncio, sys
    from foliosync.server.storage import SQLiteRelayStore

    async def main() -> None:
        store = await SQLiteRelayStore.open(sys.argv[1])
        raise RuntimeError("the server code failed")

    asyncio.run(main())
"""


async def test_a_relay_store_left_open_does_not_hang_the_process(tmp_path: Path) -> None:
    """The relay's store uses aiosqlite too: server code that opens it and fails exits."""
    code, _, err = await run_script(RELAY_STORE_AND_RAISE, str(tmp_path / "relay.db"))
    assert code == 1 and "RuntimeError: the server code failed" in err, err
    assert err.count("Traceback") == 1, err


async def test_the_sqlite_worker_thread_is_a_daemon(tmp_path: Path) -> None:
    """What the process tests rely on, checked directly: if aiosqlite renames its thread, this
    says why those tests hang."""
    async with Replica.open(tmp_path / "r.db") as replica:
        thread = replica._store._conn._thread
        assert thread.is_alive() and thread.daemon


async def test_async_with_open_closes_the_replica_also_on_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with pytest.raises(RuntimeError, match="inside"):
        async with Replica.open(path) as replica:
            await replica.create_watchlist("Tech")
            raise RuntimeError("inside")
    with pytest.raises(ReplicaCorrupt, match="closed"):
        await replica.create_watchlist("Other")
    # closed: the file opens again at once
    async with Replica.open(path) as again:
        assert [d.name for d in again.documents()] == ["Tech"]
    # and the awaited form still works; while open, the file is shared, not locked
    replica = await Replica.open(path)
    try:
        async with Replica.open(path) as beside:
            assert [d.name for d in beside.documents()] == ["Tech"]
    finally:
        await replica.close()


async def test_async_with_sync_client_sends_the_blocks_edits_before_it_stops(
    tmp_path: Path, relay: Any
) -> None:
    async with Replica.open(tmp_path / "a.db") as laptop:
        async with SyncClient(laptop, relay.url, relay.token("alice", "laptop")) as client:
            tech = await laptop.create_watchlist("Tech")
            await tech.add(["AAPL", "MSFT"])
        assert not client.connected
        assert laptop.info(tech.id).pending == 0  # acknowledged by the relay before the exit
    async with Replica.open(tmp_path / "b.db") as phone:
        await SyncClient(phone, relay.url, relay.token("alice", "phone")).sync_once(timeout=10)
        assert (await phone.watchlist("Tech")).symbols == ["AAPL", "MSFT"]


async def test_async_with_sync_client_stops_at_once_on_an_exception_and_keeps_the_edit(
    tmp_path: Path, relay: Any
) -> None:
    path = tmp_path / "a.db"
    token = relay.token("alice", "laptop")
    async with Replica.open(path) as replica:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RuntimeError, match="inside"):
            async with SyncClient(replica, "ws://127.0.0.1:9/ws", token, flush_timeout=30):
                tech = await replica.create_watchlist("Tech")
                await tech.add(["AAPL"])
                raise RuntimeError("inside")
        assert loop.time() - started < 5  # did not wait for a relay it cannot reach
        assert replica.info(tech.id).pending > 0  # kept, to be sent next time
        await SyncClient(replica, relay.url, token).sync_once(timeout=10)
        assert replica.info(tech.id).pending == 0


async def test_async_with_sync_client_reports_a_refused_token(tmp_path: Path, relay: Any) -> None:
    from foliosync.sync.errors import AuthError

    async with Replica.open(tmp_path / "a.db") as replica:
        with pytest.raises(AuthError):
            async with SyncClient(replica, relay.url, "forged", flush_timeout=30):
                await replica.create_watchlist("Tech")


async def test_cancelled_while_sending_on_exit_the_sync_client_still_stops(
    tmp_path: Path,
) -> None:
    async with Replica.open(tmp_path / "a.db") as replica:
        client = SyncClient(replica, "ws://127.0.0.1:9/ws", "token", flush_timeout=30)
        leaving = asyncio.Event()

        async def app() -> None:
            async with client:
                await replica.create_watchlist("Tech")
                leaving.set()

        task = asyncio.get_running_loop().create_task(app())
        await leaving.wait()
        await asyncio.sleep(0.1)  # in the exit's wait for a relay it cannot reach
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client._task is None  # stopped, not left reconnecting in the background
        tech = replica.resolve(DocumentKind.WATCHLIST, "Tech")
        assert replica.info(tech).pending > 0  # kept for the next connection
