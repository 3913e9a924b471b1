"""Several processes on one replica: each reads and edits it, sees the others' changes within a
bound, one syncs at a time, and a SIGKILL of any of them loses nothing it had returned from.

Real processes (``python -c`` workers and the installed ``foliosync`` script), real SQLite files,
a real relay on 127.0.0.1. Two Replica objects in one process stand in for two processes only in
the in-process tests of compaction and the convergence property: each has its own SQLite
connection, which is all the file sees of a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc

from foliosync.client.health import ConnectionState
from foliosync.client.replica import DocumentChange, Replica
from foliosync.sync.errors import ConnectionLost, ReplicaLocked, SyncLeaseUnavailable
from foliosync.sync.freshness import FreshnessLevel
from foliosync.sync.model import INDEX_DOCUMENT_ID, DocumentKind, EditContext, Watchlist
from foliosync.sync.prices import check_tick

WORKER = """
import asyncio, json, sys, time
from foliosync.client.replica import Replica
from foliosync.client.sync import Backoff, SyncClient


def pending(replica):
    return sum(replica.info(d).pending for d in replica.document_ids())


async def line():
    return (await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)).strip()


async def settle(replica, client):
    for _ in range(400):
        if pending(replica) == 0:
            break
        await asyncio.sleep(0.05)
    print(json.dumps({"pending": pending(replica), "syncing": client.syncing}), flush=True)


async def main(path, mode, prefix, count, url=None, token=None):
    pace = float(url) if mode == "pace" else 0
    async with Replica.open(path) as replica:
        client = None
        if mode == "sync":
            client = SyncClient(replica, url, token, backoff=Backoff(base=0.05, cap=0.3))
            client.start()
            for _ in range(50):  # the one that gets the lease connects; the other waits
                if client.connected:
                    break
                await asyncio.sleep(0.02)
        wl = await replica.watchlist("Shared")
        print("ready", flush=True)
        await line()
        for i in range(count):
            await wl.add([f"{prefix}{i:03d}"])
            print(f"ok {i} {time.monotonic()}", flush=True)  # CLOCK_MONOTONIC: one per machine
            if pace:
                await asyncio.sleep(pace)
        if client is not None:
            await settle(replica, client)
            if await line() == "more":
                for i in range(10):
                    await wl.add([f"{prefix.lower()}X{i}"])
                await settle(replica, client)
                await line()
            await client.stop()
        else:
            print("done", flush=True)
            await line()
            await replica.refresh()
            print("final " + json.dumps(wl.symbols), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:]))
"""

SHOW = """
import asyncio, json, sys
from foliosync.client.replica import Replica

async def main(path):
    async with Replica.open(path) as replica:
        print(json.dumps((await replica.watchlist("Shared")).symbols))

asyncio.run(main(sys.argv[1]))
"""


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_line(process: asyncio.subprocess.Process, timeout: float = 30) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    if not line:
        assert process.stderr is not None
        err = await process.stderr.read()
        pytest.fail(f"the worker ended: {err.decode()[-2000:]}")
    return line.decode().strip()


async def expect(process: asyncio.subprocess.Process, wanted: str) -> str:
    """Read lines until one starts with ``wanted``; returns it."""
    while not (line := await read_line(process)).startswith(wanted):
        pass
    return line


async def say(process: asyncio.subprocess.Process, text: str) -> None:
    assert process.stdin is not None
    process.stdin.write(text.encode() + b"\n")
    await process.stdin.drain()


async def finish(*processes: asyncio.subprocess.Process) -> None:
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def shown(path: Path) -> list[str]:
    """The watchlist as a new process reads it from the file."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SHOW, str(path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    symbols: list[str] = json.loads(out)
    return symbols


async def make_shared(path: Path) -> None:
    async with Replica.open(path) as replica:
        await replica.create_watchlist("Shared")


async def test_two_processes_edit_one_watchlist_and_a_kill_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    await make_shared(path)
    a, b = await spawn(str(path), "edit", "A", "200"), await spawn(str(path), "edit", "B", "200")
    try:
        for process in (a, b):
            assert await read_line(process) == "ready"
        await say(a, "go")
        await say(b, "go")
        confirmed = -1
        while confirmed < 80:  # B is killed mid-way, A goes on
            confirmed = int((await read_line(b)).split()[1])
        b.send_signal(signal.SIGKILL)
        await b.wait()
        await expect(a, "done")
        await say(a, "report")
        seen_by_a = json.loads((await expect(a, "final ")).removeprefix("final "))
        await a.wait()
        assert a.returncode == 0
    finally:
        await finish(a, b)
    returned = {f"A{i:03d}" for i in range(200)} | {f"B{i:03d}" for i in range(confirmed + 1)}
    in_file = await shown(path)  # a third process
    assert returned <= set(in_file), sorted(returned - set(in_file))
    assert len(in_file) == len(set(in_file))
    assert seen_by_a == in_file  # A saw every edit of B that reached the file, and nothing else


async def test_an_edit_in_another_process_is_notified_here_within_a_bound(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.db"
    await make_shared(path)
    heard: list[tuple[float, DocumentChange]] = []
    async with Replica.open(path) as replica:
        tech = await replica.watchlist("Shared")
        replica.subscribe(lambda change: heard.append((time.monotonic(), change)))
        worker = await spawn(str(path), "pace", "S", "30", "0.03")
        edits: list[float] = []
        try:
            assert await read_line(worker) == "ready"
            await say(worker, "go")
            for _ in range(30):
                edits.append(float((await read_line(worker)).split()[2]))  # when it returned
            await expect(worker, "done")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while len(heard) < 30 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await say(worker, "report")
            await expect(worker, "final ")
        finally:
            await finish(worker)
        assert [c.origin for _, c in heard] == ["other-process"] * 30
        assert all(c.seq and c.update for _, c in heard)  # pending edits: a syncer sends them on
        assert [c.seq for _, c in heard] == sorted({c.seq for _, c in heard})  # once each, in order
        assert tech.symbols == [f"S{i:03d}" for i in range(30)]
    delays = [at - edited for (at, _), edited in zip(heard, edits, strict=True)]
    assert min(delays) > 0
    print(
        f"\nother-process notification delay over {len(delays)} edits: "
        f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"
    )
    assert max(delays) < 1.0


async def test_the_cli_works_while_prices_follow_holds_the_replica(
    tmp_path: Path, relay_server: Any, helpers: Any
) -> None:
    """The issue's case: `foliosync prices --follow` runs, and status, show and add work beside
    it; the follower (the syncing process) sends the edit made by the CLI to the relay."""
    db = str(tmp_path / "replica.db")
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        token = relay.token("alice", "laptop")
        for args in (["watchlist", "create", "Tech"], ["watchlist", "add", "Tech", "AAPL"]):
            code, _, err = await helpers.run_cli("--db", db, *args)
            assert code == 0, err
        now = time.time_ns() // 1_000_000
        assert relay.relay.prices.publish(
            [check_tick({"symbol": "AAPL", "price": "101", "time_ms": now}, now)]
        )
        script = os.path.join(os.path.dirname(sys.executable), "foliosync")
        follow = await asyncio.create_subprocess_exec(
            script,
            *("--db", db, "prices", "AAPL", "--follow", "--duration", "60"),
            *("--server", relay.url, "--token", token),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert (await read_line(follow)).startswith("AAPL")
            code, out, err = await helpers.run_cli("--db", db, "status")
            assert code == 0 and err == "", err
            code, out, err = await helpers.run_cli("--db", db, "watchlist", "show", "Tech")
            assert code == 0 and "AAPL" in out, err
            code, out, err = await helpers.run_cli("--db", db, "watchlist", "add", "Tech", "NVDA")
            assert code == 0, err
            code, out, err = await helpers.run_cli("--db", db, "watchlist", "show", "Tech")
            assert code == 0 and "NVDA" in out, err
            async with Replica.open(tmp_path / "phone.db") as phone:
                phone_client = helpers.fast_client(phone, relay.url, relay.token("alice", "phone"))

                async def phone_has_nvda() -> bool:
                    await phone_client.sync_once()
                    try:
                        return "NVDA" in (await phone.watchlist("Tech")).symbols
                    except KeyError:
                        return False

                await helpers.eventually(phone_has_nvda, timeout=15, interval=0.2)
            # a one-shot sync beside the syncing process: that one sent everything already
            code, out, err = await helpers.run_cli(
                "--db", db, "sync", "--server", relay.url, "--token", token, "--timeout", "20"
            )
            assert code == 0, err
            code, out, err = await helpers.run_cli("--db", db, "status", "--json")
            assert code == 0, err
            assert all(d["pending"] == 0 for d in json.loads(out)["documents"]), out
            assert follow.returncode is None  # still following
        finally:
            if follow.returncode is None:
                follow.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(follow.wait(), 15)
            finally:
                await finish(follow)


async def test_processes_creating_one_replica_at_once_all_succeed(
    tmp_path: Path, helpers: Any
) -> None:
    """A new file created by several processes at once: one creates the schema and the device,
    every one adds its watchlist; the same name twice is a clear error, not a crash."""
    db = str(tmp_path / "new.db")
    names = ["One", "Two", "Three", "Four", "Four"]
    done = await asyncio.gather(
        *(helpers.run_cli("--db", db, "watchlist", "create", n) for n in names)
    )
    assert sorted(code for code, _, _ in done) == [0, 0, 0, 0, 1], done
    refused = next(err for code, _, err in done if code == 1)
    assert refused.startswith("foliosync: error:") and "exists already" in refused, refused
    code, out, err = await helpers.run_cli("--db", db, "watchlist", "list")
    assert code == 0, err
    assert sorted(line.split()[0] for line in out.splitlines()) == sorted(set(names)), out


async def test_two_sync_clients_in_two_processes_send_everything_once(
    tmp_path: Path, relay_server: Any, helpers: Any
) -> None:
    path = tmp_path / "r.db"
    await make_shared(path)
    async with relay_server(tmp_path / "relay") as relay:
        token = relay.token("alice", "laptop")
        async with Replica.open(path) as replica:  # nothing pending when the workers start
            await helpers.fast_client(replica, relay.url, token).sync_once()
        counters = relay.relay.counters
        before = counters.updates_acknowledged
        one = await spawn(str(path), "sync", "P", "50", relay.url, token)
        two = await spawn(str(path), "sync", "Q", "50", relay.url, token)
        try:
            for process in (one, two):
                assert await read_line(process) == "ready"
            await say(one, "go")
            await say(two, "go")
            settled = [json.loads(await expect(p, "{")) for p in (one, two)]
            assert [s["pending"] for s in settled] == [0, 0]
            assert sorted(s["syncing"] for s in settled) == [False, True]  # one syncer at a time
            assert counters.updates_acknowledged - before == 100  # every edit sent exactly once
            # The syncer is killed; the other takes its lease over and sends its own edits.
            syncer, other = (one, two) if settled[0]["syncing"] else (two, one)
            syncer.send_signal(signal.SIGKILL)
            await syncer.wait()
            await say(other, "more")
            after = json.loads(await expect(other, "{"))
            assert after == {"pending": 0, "syncing": True}
            # sent once: each edit alone if the new syncer was connected when it was made, or
            # all of them at once in its first sync if not
            assert 1 <= counters.updates_acknowledged - before - 100 <= 10
            await say(other, "exit")
            await asyncio.wait_for(other.wait(), 15)
            assert other.returncode == 0
        finally:
            await finish(one, two)
        async with Replica.open(tmp_path / "phone.db") as phone:
            await helpers.fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once()
            symbols = set((await phone.watchlist("Shared")).symbols)
    expected = {f"{p}{i:03d}" for p in "PQ" for i in range(50)}
    expected |= {f"{'P' if other is one else 'Q'}X{i}" for i in range(10)}
    assert symbols == expected


async def test_a_syncer_killed_mid_stream_loses_nothing_it_returned_from(
    tmp_path: Path, relay_server: Any, helpers: Any
) -> None:
    """Both processes edit; whichever syncs is SIGKILLed in the middle of its edits (some sent,
    some not yet acknowledged); the other takes over and every edit either had returned reaches
    the relay."""
    path = tmp_path / "r.db"
    await make_shared(path)
    async with relay_server(tmp_path / "relay") as relay:
        token = relay.token("alice", "laptop")
        async with Replica.open(path) as replica:
            await helpers.fast_client(replica, relay.url, token).sync_once()
        one = await spawn(str(path), "sync", "P", "200", relay.url, token)
        two = await spawn(str(path), "sync", "Q", "60", relay.url, token)
        try:
            for process in (one, two):
                assert await read_line(process) == "ready"
            lease = tmp_path / "r.db-sync"
            assert lease.exists()
            await say(one, "go")
            confirmed = -1
            while confirmed < 40:
                confirmed = int((await read_line(one)).split()[1])
            await say(two, "go")
            while confirmed < 80:
                confirmed = int((await read_line(one)).split()[1])
            one.send_signal(signal.SIGKILL)  # the syncer if it got the lease first, else not
            await one.wait()
            settled = json.loads(await expect(two, "{"))
            assert settled == {"pending": 0, "syncing": True}
            await say(two, "exit")
            await asyncio.wait_for(two.wait(), 15)
        finally:
            await finish(one, two)
        async with Replica.open(tmp_path / "phone.db") as phone:
            await helpers.fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once()
            symbols = set((await phone.watchlist("Shared")).symbols)
    returned = {f"P{i:03d}" for i in range(confirmed + 1)} | {f"Q{i:03d}" for i in range(60)}
    assert returned <= symbols, sorted(returned - symbols)


HOLD_LEASE = """
import fcntl, os, sys, time
read_only = sys.argv[2] == "read-only"
fd = os.open(sys.argv[1], os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


@asynccontextmanager
async def lease_held(lease: Path | str, *, read_only: bool = False) -> AsyncIterator[None]:
    """Another process holds the sync lease ``lease`` (through a read-only descriptor if asked)
    until the block ends."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_LEASE,
        str(lease),
        "read-only" if read_only else "read-write",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert await read_line(holder) == "held"
        yield
    finally:
        await finish(holder)


async def test_a_one_shot_sync_beside_the_syncing_process(tmp_path: Path, helpers: Any) -> None:
    """While another process holds the sync lease, a one-shot sync does not connect: it ends at
    once when nothing is pending, and otherwise says who has not sent the changes yet."""
    path = tmp_path / "r.db"
    await make_shared(path)
    async with lease_held(f"{path}-sync"), Replica.open(path) as replica:
        client = helpers.fast_client(replica, "ws://127.0.0.1:9/ws", "token")
        with pytest.raises(ConnectionLost, match="another process syncs"):
            await client.sync_once(timeout=0.5)  # creating Shared is pending
        assert not client.syncing
        for doc_id in replica.document_ids():  # as if the syncing process had sent them
            for update in await replica.pending_updates(doc_id):
                await replica.acknowledge(doc_id, update.seq)
        started = time.monotonic()
        await client.sync_once(timeout=5)  # nothing pending: nothing to do
        assert time.monotonic() - started < 1


async def test_a_compaction_elsewhere_hides_no_row_from_a_reader(tmp_path: Path) -> None:
    """Compaction deletes acknowledged rows: a process that had not read them yet merges the new
    snapshot instead; and a process behind the file compacts only after catching up."""
    path = tmp_path / "r.db"
    far = Watchlist(Doc(), EditContext("far-device"))  # another device, through a "relay"
    async with (
        Replica.open(path, watch_interval=None) as reader,
        Replica.open(path, watch_interval=None) as writer,
    ):
        await (await reader.create_watchlist("Shared")).add(["AAPL"])
        await writer.refresh()
        theirs = await writer.watchlist("Shared")
        doc_id = theirs.id
        far.doc.apply_update(theirs.model.doc.get_update())
        far.add(["FAR"])
        await writer.apply_remote(doc_id, far.doc.get_update())  # an acknowledged row
        await theirs.add(["MSFT"])  # a pending row
        await writer.compact(doc_id)  # deletes the remote row the reader never read
        await reader.refresh()
        assert (await reader.watchlist("Shared")).symbols == ["AAPL", "FAR", "MSFT"]
        # now the reader is behind: the writer adds, the reader compacts without refreshing
        await theirs.add(["NVDA"])
        far.add(["FAR2"])
        await writer.apply_remote(doc_id, far.doc.get_update())
        await reader.compact(doc_id)
        after = (await reader.watchlist("Shared")).symbols
        assert sorted(after) == ["AAPL", "FAR", "FAR2", "MSFT", "NVDA"]
    assert await shown(path) == after


OPS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from(["add", "remove", "refresh", "compact"]),
        st.sampled_from(["AAPL", "MSFT", "NVDA", "GOOG"]),
    ),
    max_size=25,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_any_interleaving_of_two_processes_converges(tmp_path: Path, ops: list[Any]) -> None:
    """Edits of two openers of one file, interleaved anyhow with reads of each other's changes
    and compactions, end in the same document for both and for a new opener."""

    async def run() -> None:
        path = tmp_path / f"p{time.monotonic_ns()}.db"
        await make_shared(path)
        async with (
            Replica.open(path, watch_interval=None) as a,
            Replica.open(path, watch_interval=None) as b,
        ):
            replicas = {"a": a, "b": b}
            for who, op, symbol in ops:
                replica = replicas[who]
                wl = await replica.watchlist("Shared")
                if op == "add":
                    await wl.add([symbol])
                elif op == "remove" and symbol in wl.symbols:
                    await wl.remove(symbol)
                elif op == "refresh":
                    await replica.refresh()
                elif op == "compact":
                    await replica.compact(wl.id)
            await a.refresh()
            await b.refresh()
            seen_a = (await a.watchlist("Shared")).symbols
            seen_b = (await b.watchlist("Shared")).symbols
        async with Replica.open(path) as fresh:
            assert seen_a == seen_b == (await fresh.watchlist("Shared")).symbols

    asyncio.run(run())


async def test_a_row_listed_by_another_process_during_a_pending_read_never_skips_one(
    tmp_path: Path, relay: Any, helpers: Any
) -> None:
    """A new document's rows are read before they are sent; another process's index row,
    notified with its update during that read, must wait for them: sent first, its Ack would
    settle the unsent row below it, and the other device would never list the new watchlist."""
    path = tmp_path / "r.db"
    async with Replica.open(path, watch_interval=None) as replica:
        client = helpers.fast_client(replica, relay.url, relay.token("ann", "laptop"))
        client.start()
        try:
            await client.wait_in_sync(10)
            reading, release = asyncio.Event(), asyncio.Event()
            real = replica._store.pending

            async def slow_pending(doc_id: str | None = None) -> Any:
                if doc_id == INDEX_DOCUMENT_ID and not release.is_set():
                    reading.set()
                    await release.wait()  # a busy disk, until the other process's row is in
                return await real(doc_id)

            replica._store.pending = slow_pending  # type: ignore[method-assign]
            await replica.create_watchlist("Alpha")  # notified without an update: read
            await asyncio.wait_for(reading.wait(), 10)
            code, _, err = await helpers.run_cli("--db", str(path), "watchlist", "create", "Beta")
            assert code == 0, err
            await replica.refresh()  # Beta's index row, notified with its seq and update
            release.set()
            await helpers.eventually(
                lambda: all(replica.info(d).pending == 0 for d in replica.document_ids())
            )
            await client.wait_in_sync(10)
        finally:
            await client.stop()
    async with Replica.open(tmp_path / "phone.db") as phone:
        await helpers.fast_client(phone, relay.url, relay.token("ann", "phone")).sync_once(10)
        index = await phone.index()
        assert sorted(e.name for e in index.entries()) == ["Alpha", "Beta"]


async def test_a_replica_opened_through_a_symlink_meets_the_same_lease(
    tmp_path: Path, helpers: Any
) -> None:
    """The lease belongs to the file, not to the path as spelled: while another process syncs
    r.db, a client of link.db -> r.db waits for it instead of connecting too."""
    path = tmp_path / "r.db"
    await make_shared(path)
    link = tmp_path / "link.db"
    link.symlink_to(path.name)
    async with lease_held(f"{path}-sync"):
        async with Replica.open(link) as replica:
            client = helpers.fast_client(replica, "ws://127.0.0.1:9/ws", "token")
            with pytest.raises(ConnectionLost, match="another process syncs"):
                await client.sync_once(timeout=0.5)  # creating Shared is pending
            assert not client.syncing
        assert not (tmp_path / "link.db-sync").exists()


async def test_a_read_only_lease_file_still_keeps_a_second_syncer_out(
    tmp_path: Path, helpers: Any
) -> None:
    """A lock file the client may not write (mode 0400) is locked through a read-only
    descriptor: another process holding it that way still keeps this client from syncing."""
    path = tmp_path / "r.db"
    await make_shared(path)
    lease = tmp_path / "r.db-sync"
    lease.touch()
    lease.chmod(0o400)
    async with lease_held(str(lease), read_only=True), Replica.open(path) as replica:
        client = helpers.fast_client(replica, "ws://127.0.0.1:9/ws", "token")
        with pytest.raises(ConnectionLost, match="another process syncs"):
            await client.sync_once(timeout=0.5)  # creating Shared is pending


async def test_a_lease_file_that_cannot_exist_refuses_to_sync(tmp_path: Path, helpers: Any) -> None:
    """No lock file can be opened (here a dangling link in its place): the client says so and
    does not sync, rather than sync beside another process that might; and a lock file it
    creates has the replica's own mode."""
    path = tmp_path / "r.db"
    await make_shared(path)
    path.chmod(0o640)
    lease = tmp_path / "r.db-sync"
    lease.symlink_to(tmp_path / "missing" / "r.db-sync")
    async with Replica.open(path) as replica:
        client = helpers.fast_client(replica, "ws://127.0.0.1:9/ws", "token")
        with pytest.raises(SyncLeaseUnavailable, match="not syncing"):
            await client.sync_once(timeout=5)
        assert not client.syncing
    lease.unlink()
    async with Replica.open(path) as replica:
        client = helpers.fast_client(replica, "ws://127.0.0.1:9/ws", "token")
        with pytest.raises(ConnectionLost, match="cannot reach"):
            await client.sync_once(timeout=5)
    assert lease.stat().st_mode & 0o777 == 0o640 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_a_failed_catch_up_is_tried_again_on_the_next_look(
    tmp_path: Path, helpers: Any
) -> None:
    """The file's change counter moved when the catch-up failed (a busy file): the next look
    reads again instead of believing nothing changed, so another process's edit is seen."""
    path = tmp_path / "r.db"
    await make_shared(path)
    async with Replica.open(path, watch_interval=0.05) as replica:
        real = replica._store.changes_since
        failures = 0

        async def fail_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise ReplicaLocked("busy for now")
            return await real(*args, **kwargs)

        replica._store.changes_since = fail_once  # type: ignore[method-assign]
        code, _, err = await helpers.run_cli("--db", str(path), "watchlist", "create", "Other")
        assert code == 0, err
        await helpers.eventually(
            lambda: "Other" in {info.name for info in replica.documents()}, timeout=5
        )
        assert failures == 1


SYNCER = """
import asyncio, sys
from foliosync.client.replica import Replica
from foliosync.client.sync import Backoff, SyncClient

async def main(path, url, token):
    async with Replica.open(path) as replica:
        client = SyncClient(replica, url, token, backoff=Backoff(base=0.05, cap=0.3))
        client.start()
        await client.wait_in_sync(30)
        print("in sync", flush=True)
        await asyncio.sleep(120)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_process_waiting_for_the_lease_follows_the_syncer_and_stays_fresh(
    tmp_path: Path, relay: Any, helpers: Any
) -> None:
    """Beside the syncing process, a client says another process syncs (not "connecting"), and
    its documents' last sync advances with that process's heartbeat instead of drifting."""
    path = tmp_path / "r.db"
    await make_shared(path)
    syncer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SYNCER,
        str(path),
        relay.url,
        relay.token("ann", "laptop"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert await read_line(syncer) == "in sync"
        async with Replica.open(path) as replica:
            client = helpers.fast_client(replica, relay.url, relay.token("ann", "laptop"))
            client.start()
            try:
                await helpers.eventually(lambda: client.state is ConnectionState.FOLLOWING)
                assert client.health().describe().startswith("another process syncs")
                doc_id = replica.resolve(DocumentKind.WATCHLIST, "Shared")
                first = replica.info(doc_id).last_synced_at
                assert first is not None
                await helpers.eventually(
                    lambda: (replica.info(doc_id).last_synced_at or 0) > first + 1000, timeout=10
                )
                assert client.freshness(doc_id).level is FreshnessLevel.LIVE
                assert not client.syncing
            finally:
                await client.stop()
    finally:
        await finish(syncer)
    code, out, err = await helpers.run_cli("--db", str(path), "status", "--json")
    assert code == 0, err
    assert json.loads(out)["documents"][0]["last_synced_at"] is not None


async def test_a_compaction_notifies_after_it_commits_and_merges_outside_its_transaction(
    tmp_path: Path,
) -> None:
    """Listeners of the rows a compaction reads run once the write lock is free again (their
    work must not hold up every other process), and the pending rows' merge is computed before
    the transaction: rows committed by another process meanwhile are not merged, and not lost."""
    import sqlite3

    path = tmp_path / "r.db"
    async with (
        Replica.open(path, watch_interval=None) as compactor,
        Replica.open(path, watch_interval=None) as other,
    ):
        shared = await compactor.create_watchlist("Shared")
        await other.refresh()
        theirs = await other.watchlist("Shared")
        await theirs.add(["AAPL"])  # a row the compactor reads inside its transaction
        lock_free: list[bool] = []

        def listener(change: DocumentChange) -> None:
            if change.origin == "other-process":
                probe = sqlite3.connect(path, timeout=0)
                try:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.rollback()
                    lock_free.append(True)
                except sqlite3.OperationalError:
                    lock_free.append(False)
                finally:
                    probe.close()

        compactor.subscribe(listener)
        await compactor.compact(shared.id)
        assert lock_free and all(lock_free)
        assert (await compactor.watchlist("Shared")).symbols == ["AAPL"]

        store = compactor._store
        before = await compactor.pending_updates(shared.id)

        def merge_while_another_process_commits(updates: list[bytes]) -> bytes:
            with sqlite3.connect(path, timeout=0) as conn:  # fails if inside the transaction
                conn.execute(
                    "INSERT INTO updates (doc_id, data, pending, changes) VALUES (?, ?, 1, 1)",
                    (shared.id, updates[-1]),
                )
            return updates[-1]

        await store.compact(
            shared.id,
            0,
            {},
            lambda changes: compactor._loaded[shared.id].model.doc.get_update(),
            merge=merge_while_another_process_commits,
            merge_after=0,
        )
        after = await compactor.pending_updates(shared.id)
        assert [p.seq for p in after][: len(before)] == [p.seq for p in before]  # not merged
        assert len(after) == len(before) + 1  # and the new row kept
