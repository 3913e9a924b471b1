"""`foliosync relay backup` and `restore` with real processes: a backup taken while the relay
runs, restored after more edits synced, loses nothing (the devices send the rest back by state
vector) and duplicates nothing; shares, token revocations and the secret come back with the
documents, on this machine or a new one, and no restore lets a revoked token in again; an older
backup (relay.db alone) still restores and says what it lacks; bad input gets a clear error and
an exit code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from foliosync.client.replica import Replica
from foliosync.client.sync import SyncClient
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.sharing import Revocation, SQLiteShareStore
from foliosync.server.storage import SQLiteRelayStore
from foliosync.sync.errors import ConfigError
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol.frames import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    decode_frame,
    encode_frame,
)

TECH = document_id(DocumentKind.WATCHLIST, "Tech")


def foliosync() -> str:
    script = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert script is not None
    return script


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        foliosync(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RelayProcess:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            foliosync(),
            "relay",
            "--feed",
            "none",
            "--port",
            str(self.port),
            "--data",
            str(self.data),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(),
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        assert b"foliosync relay on" in line, line + await self.process.stderr.read()  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(self.process.communicate(), 20)
            assert self.process.returncode == 0, err
        self.process = None


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    running = RelayProcess(tmp_path / "relay-data")
    await running.start()
    try:
        yield running
    finally:
        if running.process is not None and running.process.returncode is None:
            running.process.kill()
            await running.process.wait()


class Device:
    """A replica file and the token of one device of alice's."""

    def __init__(self, path: Path, relay: RelayProcess, name: str) -> None:
        self.path = path
        self.relay = relay
        self.token = issue_token(load_or_create_secret(relay.data), "alice", device=name)

    @contextlib.asynccontextmanager
    async def replica(self) -> AsyncIterator[Replica]:
        replica = await Replica.open(self.path)
        try:
            yield replica
        finally:
            await replica.close()

    async def sync(self) -> None:
        async with self.replica() as replica:
            await SyncClient(replica, self.relay.url, self.token).sync_once(timeout=20)
            assert not await replica.pending_updates()


async def content(device: Device) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with device.replica() as replica:
        for info in replica.documents():
            if info.kind is DocumentKind.WATCHLIST:
                wl = await replica.watchlist(info.id)
                seen[info.name] = [e.symbol for e in wl.entries()]
            else:
                pf = await replica.portfolio(info.id)
                trades = sorted((t.symbol, str(t.quantity)) for t in pf.trades())
                positions = {s: str(p.quantity) for s, p in pf.positions().items()}
                seen[info.name] = (trades, positions)
    return seen


async def by_name(replica: Replica, name: str) -> str:
    return next(info.id for info in replica.documents() if info.name == name)


async def test_a_backup_taken_while_running_restores_with_nothing_lost_or_doubled(
    tmp_path: Path, relay: RelayProcess
) -> None:
    phone = Device(tmp_path / "phone.db", relay, "phone")
    laptop = Device(tmp_path / "laptop.db", relay, "laptop")
    async with phone.replica() as replica:
        tech = await replica.create_watchlist("Tech")
        await tech.add(["AAPL", "MSFT"])
        old = await replica.create_watchlist("Old")
        await old.add(["IBM", "INTC"])
        main = await replica.create_portfolio("Main")
        await main.add_trade("AAPL", "10", "150")
        sold = await main.add_trade("MSFT", "5", "400")
    await phone.sync()
    await laptop.sync()
    async with laptop.replica() as replica:
        await (await replica.watchlist(await by_name(replica, "Tech"))).add("NVDA")
        await (await replica.portfolio(await by_name(replica, "Main"))).add_trade(
            "NVDA", "3", "120"
        )
    await laptop.sync()
    await phone.sync()

    backup = tmp_path / "backup"
    code, out, err = await cli("relay", "backup", str(backup), "--data", str(relay.data))
    assert code == 0, err
    assert f"to {backup}" in out and "documents" in out

    # After the backup: additions, a removal alone in its document, a deleted trade.
    async with phone.replica() as replica:
        await (await replica.watchlist(await by_name(replica, "Tech"))).add("GOOGL")
        await (await replica.watchlist(await by_name(replica, "Old"))).remove("INTC")
        pf = await replica.portfolio(await by_name(replica, "Main"))
        await pf.delete_trade(sold.id)
        await pf.add_trade("AAPL", "-4", "160")
    await phone.sync()
    async with laptop.replica() as replica:
        await (await replica.watchlist(await by_name(replica, "Tech"))).add("TSLA")
    await laptop.sync()
    await phone.sync()
    expected = await content(phone)
    assert expected == await content(laptop)
    assert expected["Tech"] == ["AAPL", "MSFT", "NVDA", "GOOGL", "TSLA"]
    assert expected["Old"] == ["IBM"]

    code, _, err = await cli("relay", "restore", str(backup), "--data", str(relay.data))
    assert code == 1 and "a relay is running on the data directory" in err, err
    await relay.stop()
    code, out, err = await cli("relay", "restore", str(backup), "--data", str(relay.data))
    assert code == 0, err
    assert "kept as" in out
    assert list(relay.data.glob("relay.db.before-restore-*"))
    await relay.start()

    fresh = Device(tmp_path / "fresh.db", relay, "tablet")
    await fresh.sync()
    restored = await content(fresh)
    assert restored["Tech"] == ["AAPL", "MSFT", "NVDA"]  # the relay went back to the backup
    await phone.sync()
    await laptop.sync()
    await phone.sync()
    again = Device(tmp_path / "again.db", relay, "desktop")
    await again.sync()
    for device in (phone, laptop, again):
        assert await content(device) == expected
    trades, positions = expected["Main"]
    assert trades == sorted([("AAPL", "10"), ("NVDA", "3"), ("AAPL", "-4")])
    assert {s: Decimal(q) for s, q in positions.items()} == {
        "AAPL": Decimal(6),
        "NVDA": Decimal(3),
    }


async def test_backup_without_a_store_says_so(tmp_path: Path) -> None:
    code, out, err = await cli("relay", "backup", str(tmp_path / "b.db"), "--data", str(tmp_path))
    assert code == 1 and not out
    assert "no relay store in" in err and "Traceback" not in err
    assert not (tmp_path / "relay.db").exists() and not (tmp_path / "b.db").exists()


async def test_restore_refuses_what_is_not_a_relay_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = await SQLiteRelayStore.open(data / "relay.db")
    await store.append("alice", "wl:ab12", b"\x00\x00", 1, "phone")
    await store.close()
    before = (data / "relay.db").read_bytes()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE things (x)")
        conn.commit()
    for path, reason in (
        (text, "is not a foliosync relay store"),
        (other, "is not a foliosync relay store (no documents or updates table)"),
        (tmp_path / "missing.db", "does not exist"),
    ):
        code, _, err = await cli("relay", "restore", str(path), "--data", str(data))
        assert code == 1, err
        assert reason in err and "Traceback" not in err, err
        assert (data / "relay.db").read_bytes() == before  # nothing replaced, nothing moved
        assert not list(data.glob("relay.db.before-restore-*"))


async def test_a_copied_live_store_restores_too(tmp_path: Path) -> None:
    """A relay.db copied as it is (WAL mode, say from a file-system snapshot) is a valid
    backup: restore reads it without its -wal and -shm beside it."""
    source = tmp_path / "source"
    store = await SQLiteRelayStore.open(source / "relay.db")
    await store.append("alice", "wl:ab12", b"\x00\x00", 1, "phone")
    await store.close()
    copy = tmp_path / "copy.db"
    shutil.copyfile(source / "relay.db", copy)
    code, out, err = await cli("relay", "restore", str(copy), "--data", str(tmp_path / "new"))
    assert code == 0, err
    assert "(1 documents, 1 stored updates)" in out


async def test_a_backup_restores_into_a_relay_that_serves_it(
    tmp_path: Path, relay: RelayProcess
) -> None:
    phone = Device(tmp_path / "phone.db", relay, "phone")
    async with phone.replica() as replica:
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
    await phone.sync()
    backup = tmp_path / "backup"
    assert (await cli("relay", "backup", str(backup), "--data", str(relay.data)))[0] == 0
    assert sorted(p.name for p in backup.iterdir()) == [  # self-contained files, no -wal
        "foliosync-backup.json",
        "relay.db",
        "secret.key",
        "shares.db",
    ]
    code, _, err = await cli(
        "relay", "backup", str(relay.data / "relay.db"), "--data", str(relay.data)
    )
    assert code == 1 and "is the relay's store itself" in err
    await relay.stop()
    assert (await cli("relay", "restore", str(backup), "--data", str(relay.data)))[0] == 0
    await relay.start()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{relay.port}/readyz") as response,
    ):
        assert response.status == 200
    fresh = Device(tmp_path / "fresh.db", relay, "tablet")
    await fresh.sync()
    assert (await content(fresh))["Tech"] == ["AAPL"]


async def test_a_second_relay_on_the_same_data_is_refused(
    tmp_path: Path, relay: RelayProcess
) -> None:
    second = RelayProcess(relay.data)
    process = await asyncio.create_subprocess_exec(
        foliosync(),
        "relay",
        "--feed",
        "none",
        "--port",
        str(second.port),
        "--data",
        str(relay.data),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert b"a relay is running on the data directory" in err
    assert b"relay on" not in out


async def test_a_relay_with_every_deletion_is_sent_nothing_at_connect(
    tmp_path: Path, helpers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The deletions check costs nothing while the relay has them all: no Update at connect."""
    async with (
        helpers.serve_relay(tmp_path / "relay", feed="none") as running,
        helpers.opened_replica(tmp_path / "phone.db") as replica,
    ):
        wl = await replica.create_watchlist("Old")
        await wl.add(["IBM", "INTC", "AMD"])
        await wl.remove(["INTC"])
        token = running.token("alice", "phone")
        with caplog.at_level(logging.DEBUG, logger="foliosync.relay"):
            await SyncClient(replica, running.url, token).sync_once(timeout=10)
            assert any("acknowledged" in r.getMessage() for r in caplog.records)
            caplog.clear()
            for _ in range(2):
                await SyncClient(replica, running.url, token).sync_once(timeout=10)
            assert not [r for r in caplog.records if "acknowledged" in r.getMessage()]


async def test_a_backup_during_a_stream_of_commits_holds_every_one_before_it(
    tmp_path: Path, helpers: Any
) -> None:
    """The copy is one snapshot: intact, with every update committed before it started."""
    from foliosync.server.backup import backup_store, check_store

    async with helpers.serve_relay(tmp_path / "relay", feed="none") as running:
        store = running.relay.store
        committed = 0
        stop = asyncio.Event()

        async def write() -> None:
            nonlocal committed
            while not stop.is_set():
                await store.append("alice", f"wl:{committed % 7:04x}", b"\x00\x00", 1, "phone")
                committed += 1

        writer = asyncio.get_running_loop().create_task(write())
        try:
            await helpers.eventually(lambda: committed > 50)
            for round_ in range(3):
                before = committed
                target = tmp_path / f"backup-{round_}"
                await asyncio.to_thread(backup_store, running.config.data_dir, target)
                after = committed
                summary = await asyncio.to_thread(check_store, target / "relay.db")
                assert before <= summary.updates <= after
        finally:
            stop.set()
            await writer


async def test_an_embedded_relay_refuses_a_restore_and_a_second_relay(
    tmp_path: Path, helpers: Any
) -> None:
    """The data directory is locked by the relay's own start-up (create_app, however it is
    served), not only by the CLI: a restore under it is refused, and so is a second relay."""
    from foliosync.server.backup import backup_store, restore_store
    from foliosync.server.data_lock import DataDirLocked
    from foliosync.server.http_errors import JsonErrorAppRunner
    from foliosync.server.relay import RelayConfig, create_app

    data = tmp_path / "data"
    runner = JsonErrorAppRunner(
        create_app(RelayConfig(data_dir=data, feed="none")), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
        backup = tmp_path / "backup"
        backup_store(data, backup)  # a backup is fine while it runs
        with pytest.raises(DataDirLocked, match="a relay is running on the data directory"):
            restore_store(data, backup)
        assert not list(data.glob("relay.db.before-restore-*"))
        second = JsonErrorAppRunner(
            create_app(RelayConfig(data_dir=data, feed="none")),
            access_log=None,
            handle_signals=False,
        )
        with pytest.raises(DataDirLocked, match="a relay is running"):
            await second.setup()
        await second.cleanup()
    finally:
        await runner.cleanup()
    restored = restore_store(data, backup)  # stopped: the lock was released
    assert restored.previous is not None
    async with helpers.serve_relay(data, feed="none"):  # and a relay starts on it again
        pass


_SCHEMA = """
CREATE TABLE documents (user TEXT, doc_id TEXT, snapshot BLOB, changed_at INT, changed_by TEXT,
                        PRIMARY KEY (user, doc_id));
CREATE TABLE updates (seq INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT, doc_id TEXT, data BLOB);
"""


def _store_with_documents(path: Path, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(_SCHEMA)
        conn.executemany(
            "INSERT INTO documents VALUES (?, ?, x'', 1, 'phone')",
            [("alice", f"wl-{i:024x}") for i in range(count)],
        )
        conn.commit()


async def _killed_writer(path: Path, updates: int) -> None:
    """A process that wrote ``updates`` rows into ``path`` in WAL mode and was killed before any
    checkpoint: the rows are only in ``path-wal``."""
    child = f"""
import os, sqlite3
conn = sqlite3.connect({str(path)!r})
conn.execute("PRAGMA journal_mode = WAL")
conn.executescript({_SCHEMA!r})
conn.execute("PRAGMA wal_autocheckpoint = 0")
for _ in range({updates}):
    conn.execute("INSERT INTO updates (user, doc_id, data) VALUES ('bob', 'x', randomblob(500))")
conn.commit()
os._exit(9)
"""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", child)
    assert await process.wait() == 9
    assert Path(f"{path}-wal").stat().st_size > 0


async def test_a_restore_never_replays_a_wal_left_without_its_store(tmp_path: Path) -> None:
    """A killed relay's -wal and -shm, its relay.db deleted by hand: the restored store must hold
    the backup, not the old WAL's transactions replayed over it."""
    from foliosync.server.backup import backup_store, check_store, restore_store

    _store_with_documents(tmp_path / "other" / "relay.db", 3)
    backup = tmp_path / "backup"
    backup_store(tmp_path / "other", backup)
    data = tmp_path / "data"
    data.mkdir()
    await _killed_writer(data / "relay.db", 2000)
    (data / "relay.db").unlink()
    restored = restore_store(data, backup)
    assert str(restored.summary) == "3 documents, 0 stored updates"
    assert not (data / "relay.db-wal").exists() and not (data / "relay.db-shm").exists()
    assert str(check_store(data / "relay.db")) == "3 documents, 0 stored updates"


async def test_a_backup_replaces_an_earlier_backup_and_nothing_else(tmp_path: Path) -> None:
    """An earlier backup (or an empty directory) is replaced; a directory of other files, an
    older backup's file, or the relay's own files are refused, and left as they were."""
    from foliosync.server.backup import backup_store, check_store

    data = tmp_path / "data"
    _store_with_documents(data / "relay.db", 3)
    earlier = tmp_path / "earlier"
    _store_with_documents(tmp_path / "before" / "relay.db", 1)
    backup_store(tmp_path / "before", earlier)
    summary = backup_store(data, earlier)
    assert str(summary.store) == "3 documents, 0 stored updates"
    assert str(check_store(earlier / "relay.db")) == "3 documents, 0 stored updates"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial left
    (tmp_path / "empty").mkdir()
    backup_store(data, tmp_path / "empty")
    assert (tmp_path / "empty" / "relay.db").is_file()

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    older = tmp_path / "older.db"
    shutil.copyfile(data / "relay.db", older)
    for target, reason in (
        (photos, "exists and is not a backup made by `foliosync relay backup`"),
        (older, "is a backup of the older kind \\(relay.db alone\\)"),
        (data / "relay.db", "is the relay's store itself"),
        (data, "is in the relay's data directory"),
    ):
        with pytest.raises(ConfigError, match=reason):
            backup_store(data, target)
    code, out, err = await cli("relay", "backup", str(photos), "--data", str(data))
    assert code == 1 and not out and "is not a backup made by" in err and "Traceback" not in err
    assert [p.name for p in photos.iterdir()] == ["cat.jpg"]
    assert older.is_file() and (data / "relay.db").is_file()


async def test_backups_and_restored_stores_are_readable_by_their_owner_only(
    tmp_path: Path,
) -> None:
    """They hold every user's documents: 0600 whatever the umask."""
    from foliosync.server.backup import backup_store, restore_store

    _store_with_documents(tmp_path / "data" / "relay.db", 2)
    (tmp_path / "data" / "secret.key").write_text("s" * 64 + "\n")
    backup = tmp_path / "backup"
    previous = os.umask(0o022)
    try:
        backup_store(tmp_path / "data", backup)
        restore_store(tmp_path / "other", backup)
    finally:
        os.umask(previous)
    assert backup.stat().st_mode & 0o777 == 0o700
    for name in ("relay.db", "shares.db", "secret.key", "foliosync-backup.json"):
        assert (backup / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("relay.db", "shares.db", "secret.key"):
        assert (tmp_path / "other" / name).stat().st_mode & 0o777 == 0o600, name


async def _http(relay: RelayProcess, token: str, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            f"http://127.0.0.1:{relay.port}{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        return response.status, await response.json()


async def _hello_refused(relay: RelayProcess, token: str) -> str:
    """The code of the fatal Error a Hello with ``token`` gets."""
    async with aiohttp.ClientSession() as http, http.ws_connect(relay.url) as ws:
        await ws.send_bytes(encode_frame(Hello(PROTOCOL_VERSION, token, "test")))
        message = await ws.receive(timeout=10)
        frame = decode_frame(message.data)
        assert isinstance(frame, Error) and frame.fatal, frame
        return frame.code


async def _shared_symbols(path: Path, relay: RelayProcess, token: str) -> list[str]:
    """What bob's device reads of alice's shared watchlist after a sync."""
    replica = await Replica.open(path)
    try:
        await SyncClient(replica, relay.url, token).sync_once(timeout=20)
        return [e.symbol for e in (await replica.watchlist(f"alice/{TECH}")).entries()]
    finally:
        await replica.close()


async def test_shares_revocations_and_the_secret_come_back_and_no_revoked_token_gets_in(
    tmp_path: Path, relay: RelayProcess
) -> None:
    """A share and a revoked laptop, backed up while the relay runs; restored on a new machine,
    the share works and the laptop stays out with the tokens issued before the backup. Restored
    on this machine, a revocation made after the backup is kept too."""
    secret = load_or_create_secret(relay.data)
    alice = issue_token(secret, "alice", device="phone")
    bob = issue_token(secret, "bob", device="desk")
    laptop = issue_token(secret, "alice", device="laptop")
    tablet = issue_token(secret, "alice", device="tablet")
    admin = issue_token(secret, "ops", scopes=frozenset({"admin"}))
    replica = await Replica.open(tmp_path / "alice.db")
    try:
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        await SyncClient(replica, relay.url, alice).sync_once(timeout=20)
    finally:
        await replica.close()
    share = {"doc": TECH, "user": "bob", "access": "read"}
    assert (await _http(relay, alice, "POST", "/v1/shares", share))[0] == 201
    lost = {"device": "laptop", "user": "alice"}
    assert (await _http(relay, admin, "POST", "/v1/revocations", lost))[0] == 200
    assert (await _http(relay, laptop, "GET", "/v1/shares"))[0] == 401

    backup = tmp_path / "backup"
    code, out, err = await cli("relay", "backup", str(backup), "--data", str(relay.data))
    assert code == 0, err
    assert "1 shares, 1 token revocations; the secret" in out
    later = {"device": "tablet", "user": "alice"}  # after the backup: not in it
    assert (await _http(relay, admin, "POST", "/v1/revocations", later))[0] == 200
    await relay.stop()

    moved = RelayProcess(tmp_path / "new-machine")
    code, out, err = await cli("relay", "restore", str(backup), "--data", str(moved.data))
    assert code == 0 and not err, err
    assert "(2 documents, 3 stored updates)" in out  # the index and the watchlist
    assert "shares: 1 shares, 1 token revocations" in out
    await moved.start()
    try:
        assert await _shared_symbols(tmp_path / "bob.db", moved, bob) == ["AAPL"]
        assert (await _http(moved, laptop, "GET", "/v1/shares"))[0] == 401
        assert await _hello_refused(moved, laptop) == "auth_failed"
        status, listed = await _http(moved, alice, "GET", "/v1/shares")
        assert status == 200 and [s["user"] for s in listed["shared_by_me"]] == ["bob"]
        assert (await _http(moved, tablet, "GET", "/v1/shares"))[0] == 200
        await moved.stop()
    finally:
        if moved.process is not None and moved.process.returncode is None:
            moved.process.kill()
            await moved.process.wait()

    code, out, err = await cli("relay", "restore", str(backup), "--data", str(relay.data))
    assert code == 0 and not err, err
    assert "kept 1 token revocations recorded since the backup" in out
    assert "1 shares, 2 token revocations" in out
    assert "the shares.db it replaced is kept as" in out
    await relay.start()
    for token in (laptop, tablet):
        assert (await _http(relay, token, "GET", "/v1/shares"))[0] == 401
    assert await _shared_symbols(tmp_path / "bob2.db", relay, bob) == ["AAPL"]


async def test_an_older_backup_of_relay_db_alone_restores_and_says_what_it_lacks(
    tmp_path: Path,
) -> None:
    """A backup made before backups held the shares: the documents come back, the data
    directory's own shares.db and secret.key are left as they are, and the operator is told."""
    data = tmp_path / "data"
    store = await SQLiteRelayStore.open(data / "relay.db")
    await store.append("alice", "wl:ab12", b"\x00\x00", 1, "phone")
    await store.close()
    older = tmp_path / "foliosync-backup.db"
    with (
        contextlib.closing(sqlite3.connect(data / "relay.db")) as source,
        contextlib.closing(sqlite3.connect(older)) as copy,
    ):
        source.backup(copy)

    kept = tmp_path / "kept"
    shares = await SQLiteShareStore.open(kept / "shares.db")
    await shares.grant("alice", TECH, "bob", "read")
    await shares.revoke_tokens(Revocation(1, user="alice", device="laptop"))
    await shares.close()
    (kept / "secret.key").write_text("k" * 64 + "\n")
    code, out, err = await cli("relay", "restore", str(older), "--data", str(kept))
    assert code == 0, err
    assert "(1 documents, 1 stored updates)" in out
    assert "holds no shares and token revocations" in err
    assert "is kept as it is (1 shares, 1 token revocations)" in err
    assert "secret.key" not in err
    assert (kept / "secret.key").read_text() == "k" * 64 + "\n"
    assert sorted(p.name for p in kept.glob("*.before-restore-*")) == []

    bare = tmp_path / "bare"
    code, out, err = await cli("relay", "restore", str(older), "--data", str(bare))
    assert code == 0, err
    assert "every share is gone, and so is every revocation" in err
    assert "revoke the tokens of lost devices again" in err
    assert "holds no secret.key" in err and "Traceback" not in err


async def test_a_restore_puts_the_backups_secret_back_and_keeps_the_other_aside(
    tmp_path: Path,
) -> None:
    from foliosync.server.backup import backup_store, restore_store

    _store_with_documents(tmp_path / "data" / "relay.db", 1)
    (tmp_path / "data" / "secret.key").write_text("a" * 64 + "\n")
    backup = tmp_path / "backup"
    backup_store(tmp_path / "data", backup)
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret.key").write_text("b" * 64 + "\n")
    restored = restore_store(other, backup)
    assert (other / "secret.key").read_text().strip() == "a" * 64
    (aside,) = other.glob("secret.key.before-restore-*")
    assert aside.read_text().strip() == "b" * 64 and aside in restored.kept_aside
    assert any("secret.key was replaced by the backup's" in w for w in restored.warnings)

    # Kept apart from the backup by its owner: the data directory's own is left alone.
    (backup / "secret.key").unlink()
    again = restore_store(other, backup)
    assert not again.secret and not again.warnings
    assert (other / "secret.key").read_text().strip() == "a" * 64


async def test_a_damaged_share_store_in_a_backup_replaces_nothing(tmp_path: Path) -> None:
    from foliosync.server.backup import backup_store

    _store_with_documents(tmp_path / "data" / "relay.db", 2)
    backup = tmp_path / "backup"
    backup_store(tmp_path / "data", backup)
    (backup / "shares.db").write_bytes(b"not a database\n" * 100)
    target = tmp_path / "target"
    _store_with_documents(target / "relay.db", 5)
    before = (target / "relay.db").read_bytes()
    code, _, err = await cli("relay", "restore", str(backup), "--data", str(target))
    assert code == 1 and "is not a foliosync share store" in err and "Traceback" not in err
    assert (target / "relay.db").read_bytes() == before
    assert sorted(p.name for p in target.iterdir()) == ["relay.db"]


async def test_an_unreadable_share_store_being_replaced_is_said(tmp_path: Path) -> None:
    """Its revocations cannot be carried over: the restore goes on (the backup's are sound) and
    says that any made since the backup must be made again."""
    from foliosync.server.backup import backup_store, check_shares, restore_store

    _store_with_documents(tmp_path / "data" / "relay.db", 1)
    backup = tmp_path / "backup"
    backup_store(tmp_path / "data", backup)
    target = tmp_path / "target"
    target.mkdir()
    (target / "shares.db").write_bytes(b"\x00" * 4096)
    restored = restore_store(target, backup)
    assert any("revoke those tokens again" in w for w in restored.warnings), restored.warnings
    assert str(check_shares(target / "shares.db")) == "0 shares, 0 token revocations"


async def test_a_backup_whose_shares_db_was_removed_leaves_the_data_directorys_own(
    tmp_path: Path,
) -> None:
    from foliosync.server.backup import backup_store, check_shares, restore_store

    _store_with_documents(tmp_path / "data" / "relay.db", 1)
    backup = tmp_path / "backup"
    backup_store(tmp_path / "data", backup)
    (backup / "shares.db").unlink()
    target = tmp_path / "target"
    shares = await SQLiteShareStore.open(target / "shares.db")
    await shares.revoke_tokens(Revocation(1, user="alice", device="laptop"))
    await shares.close()
    restored = restore_store(target, backup)
    assert restored.shares is None
    assert [w for w in restored.warnings if "holds no shares.db" in w and "kept as it is" in w]
    assert str(check_shares(target / "shares.db")) == "0 shares, 1 token revocations"
