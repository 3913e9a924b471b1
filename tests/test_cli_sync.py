"""`foliosync sync` and `foliosync status` as a user runs them, against a real relay."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from foliosync.client.replica import Replica

from .conftest import run_cli


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FOLIOSYNC_SERVER", "FOLIOSYNC_TOKEN", "FOLIOSYNC_DB"):
        monkeypatch.delenv(name, raising=False)


async def test_two_devices_meet_through_the_cli_and_remember_the_relay(
    tmp_path: Path, relay: Any, clean_env: None
) -> None:
    laptop, phone = str(tmp_path / "laptop.db"), str(tmp_path / "phone.db")
    assert (await run_cli("--db", laptop, "watchlist", "create", "Tech"))[0] == 0
    assert (await run_cli("--db", laptop, "watchlist", "add", "Tech", "AAPL"))[0] == 0
    assert (await run_cli("--db", phone, "watchlist", "create", "tech"))[0] == 0
    assert (await run_cli("--db", phone, "watchlist", "add", "tech", "MSFT"))[0] == 0

    code, out, err = await run_cli(
        "--db", laptop, "sync", "--server", relay.url, "--token", relay.token("alice", "laptop")
    )
    assert code == 0, err
    assert "in sync" in out
    # the phone gets server and token from the environment
    env = {"FOLIOSYNC_SERVER": relay.url, "FOLIOSYNC_TOKEN": relay.token("alice", "phone")}
    assert (await run_cli("--db", phone, "sync", env=env))[0] == 0
    # the laptop remembered both after its successful sync: no flags needed
    code, _, err = await run_cli("--db", laptop, "sync")
    assert code == 0, err

    for device in (laptop, phone):
        code, out, _ = await run_cli("--db", device, "watchlist", "show", "Tech")
        assert code == 0 and "AAPL" in out and "MSFT" in out


async def test_an_unreachable_relay_or_a_refused_token_fails_clearly_and_changes_nothing(
    tmp_path: Path, relay: Any, clean_env: None
) -> None:
    db = str(tmp_path / "device.db")
    assert (await run_cli("--db", db, "watchlist", "create", "Tech"))[0] == 0
    assert (await run_cli("--db", db, "watchlist", "add", "Tech", "AAPL"))[0] == 0
    before = (await run_cli("--db", db, "watchlist", "show", "Tech", "--json"))[1]

    code, _, err = await run_cli(
        "--db", db, "sync", "--server", "ws://127.0.0.1:9/ws", "--token", "x", "--timeout", "5"
    )
    assert code == 1 and "cannot reach the relay" in err and "Traceback" not in err

    code, _, err = await run_cli("--db", db, "sync", "--server", relay.url, "--token", "forged")
    assert code == 1 and "refused the token" in err and "Traceback" not in err

    code, _, err = await run_cli("--db", db, "sync")
    assert code == 1 and "no relay given" in err

    after = (await run_cli("--db", db, "watchlist", "show", "Tech", "--json"))[1]
    assert after == before  # local data untouched, still pending
    assert '"pending": 2' in after


HOLD_LEASE = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


async def test_sync_beside_the_syncing_process_says_so_and_remembers_no_unchecked_relay(
    tmp_path: Path, clean_env: None
) -> None:
    """Another process holds the sync lease and nothing is pending: `foliosync sync` never
    contacts the relay, so it neither claims to be in sync with it nor saves its URL and token."""
    db = tmp_path / "r.db"
    async with Replica.open(db) as replica:
        await replica.create_watchlist("Tech")
        for doc_id in replica.document_ids():  # as if the syncing process had sent them
            for update in await replica.pending_updates(doc_id):
                await replica.acknowledge(doc_id, update.seq)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLD_LEASE, f"{db}-sync", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 30)).strip() == b"held"
        code, out, err = await run_cli(
            "--db", str(db), "sync", "--server", "ws://127.0.0.1:9/ws", "--token", "bogus"
        )
    finally:
        holder.kill()
        await holder.wait()
    assert code == 0, err
    assert "another process syncs this replica; it has sent every change" in out
    assert "in sync with" not in out
    async with Replica.open(db) as replica:
        assert "server_url" not in replica.meta
        assert "token" not in replica.meta


FAR = ("--server", "ws://127.0.0.1:9/ws", "--token", "t")


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("prices", "AAPL", "--follow", "--duration", "nan", *FAR), "finite number of seconds"),
        (("prices", "AAPL", "--follow", "--duration", "-1", *FAR), "above 0"),
        (("prices", "AAPL", "--follow", "--duration", "inf", *FAR), "finite number of seconds"),
        (("sync", "--timeout", "nan", *FAR), "finite number of seconds"),
        (("sync", "--timeout", "inf", *FAR), "finite number of seconds"),
        (("sync", "--timeout", "0", *FAR), "above 0"),
        (("app", "--quit-after", "inf"), "finite number of seconds"),
        (("app", "--quit-after", "3000000"), "the longest a Qt timer waits"),
        (("demo", "--quit-after", "nan"), "finite number of seconds"),
        (("demo", "--quit-after", "1e10"), "the longest a Qt timer waits"),
    ],
)
async def test_time_flags_refuse_nan_infinity_and_what_no_timer_can_wait(
    tmp_path: Path, clean_env: None, args: tuple[str, ...], complaint: str
) -> None:
    """A duration is a finite number of seconds above 0 (and for a Qt timer, one it can wait):
    anything else is a usage error at once, not a command that ends at once or never."""
    code, _, err = await run_cli("--db", str(tmp_path / "r.db"), *args)
    assert code == 2, err
    assert complaint in err
