"""A replica on a disk that is already full: reading works, an edit says the disk is full.

Two ways to take the space away, both real (no mock of SQLite or of the file system):

- ``ulimit -f 0`` on the process (SIGXFSZ ignored): no file of the process can grow, which is
  what a full disk does to SQLite's write-ahead log and shared-memory index. Runs everywhere.
- a 1 MiB tmpfs, filled up, in a private mount namespace (``unshare``): a truly full disk, the
  message included. Skipped where mount namespaces are not allowed.

(The in-process full-disk tests in test_replica_durability.py cap the file with
``max_page_count``, which cannot be set from outside a CLI process.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from foliosync.sync.prices import check_tick

SCRIPT = shutil.which("foliosync", path=os.path.dirname(sys.executable))

READ_ONLY = [
    ["watchlist", "list"],
    ["watchlist", "show", "Tech"],
    ["portfolio", "list"],
    ["portfolio", "show", "Main", "--json"],
    ["status"],
    ["prices", "AAPL"],
]


def foliosync(db: Path, *args: str, no_growth: bool = False) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None
    command = [SCRIPT, "--db", str(db), *args]
    if no_growth:  # the shell ignores SIGXFSZ (kept across exec) and forbids growing any file
        command = ["bash", "-c", 'trap "" XFSZ; ulimit -f 0; exec "$@"', "bash", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def make_replica(db: Path) -> None:
    for args in (
        ["watchlist", "create", "Tech"],
        ["watchlist", "add", "Tech", "AAPL", "MSFT"],
        ["portfolio", "create", "Main"],
        ["portfolio", "trade", "Main", "AAPL", "10", "187.25"],
    ):
        done = foliosync(db, *args)
        assert done.returncode == 0, done.stderr


def test_read_only_commands_work_when_no_file_can_grow(tmp_path: Path) -> None:
    db = tmp_path / "replica.db"
    make_replica(db)
    before = foliosync(db, "watchlist", "show", "Tech", "--json").stdout
    for args in READ_ONLY:
        done = foliosync(db, *args, no_growth=True)
        assert done.returncode == 0, (args, done.stderr)
        assert done.stderr == "", (args, done.stderr)
    shown = foliosync(db, "watchlist", "show", "Tech", no_growth=True).stdout
    assert "AAPL" in shown and "MSFT" in shown
    main = json.loads(foliosync(db, "portfolio", "show", "Main", "--json", no_growth=True).stdout)
    assert main["positions"]["AAPL"]["qty"] == "10"

    edit = foliosync(db, "watchlist", "add", "Tech", "GOOG", no_growth=True)
    assert edit.returncode == 1 and edit.stderr.startswith("foliosync: error:"), edit.stderr
    assert "Traceback" not in edit.stderr and "internal error" not in edit.stderr
    assert foliosync(db, "watchlist", "show", "Tech", "--json").stdout == before


KILLED = """
import asyncio, os, sys
from foliosync.client import Replica

async def main():
    replica = await Replica.open(sys.argv[1])
    await (await replica.watchlist("Tech")).add(["NVDA"])
    os._exit(0)  # as if killed: the edit is committed, in the write-ahead log only

asyncio.run(main())
"""

FULL_DISK = """
    import json, os, subprocess, sys
    folder, script = sys.argv[1], sys.argv[2]
    db = os.path.join(folder, "replica.db")

    def run(*args, db=db):
        done = subprocess.run([script, "--db", db, *args], capture_output=True, text=True)
        return [done.returncode, done.stdout, done.stderr]

    results = {"setup": [run("watchlist", "create", "Tech"),
                         run("watchlist", "add", "Tech", "AAPL", "MSFT"),
                         run("portfolio", "create", "Main"),
                         run("portfolio", "trade", "Main", "AAPL", "10", "187.25")]}
    # another replica, left by a process killed with an edit in its write-ahead log only
    logged = os.path.join(folder, "logged.db")
    results["setup"].append(run("watchlist", "create", "Tech", db=logged))
    subprocess.run([sys.executable, "-c", sys.argv[4], logged], check=True)
    results["wal"] = os.path.getsize(logged + "-wal")
    filler = os.path.join(folder, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # take every free block of the disk
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    results["free"] = os.statvfs(folder).f_bavail
    results["read"] = [run(*args) for args in json.loads(sys.argv[3])]
    results["edit"] = run("watchlist", "add", "Tech", "GOOG")
    results["create"] = run("watchlist", "create", "New")
    results["new"] = run("watchlist", "list", db=os.path.join(folder, "new.db"))
    # last: reading it folds the log into the file, and the log's blocks become free space
    results["logged"] = run("watchlist", "show", "Tech", db=logged)
    os.remove(filler)  # space is back
    results["after"] = [run("watchlist", "add", "Tech", "GOOG"), run("watchlist", "show", "Tech")]
    print(json.dumps(results))
"""


def run_on_full_disk(tmp_path: Path) -> dict[str, Any]:
    """Run FULL_DISK in a private mount namespace with a 1 MiB tmpfs at tmp_path/disk."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    namespace = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-rm"]
    mount = 'mount -t tmpfs -o size=1m tmpfs "$1" || exit 99; exec "${@:2}"'
    assert SCRIPT is not None
    command = [
        *namespace,
        "bash",
        "-c",
        mount,
        "bash",
        str(disk),
        sys.executable,
        "-c",
        textwrap.dedent(FULL_DISK),
        str(disk),
        SCRIPT,
        json.dumps(READ_ONLY),
        KILLED,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode == 99 or "unshare:" in done.stderr:
        pytest.skip(f"mount namespaces are not allowed here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_on_a_full_disk_reading_works_and_an_edit_says_the_disk_is_full(tmp_path: Path) -> None:
    results = run_on_full_disk(tmp_path)
    assert all(code == 0 for code, _, _ in results["setup"]), results["setup"]
    assert results["free"] == 0
    for args, (code, _, err) in zip(READ_ONLY, results["read"], strict=True):
        assert (code, err) == (0, ""), (args, err)
    assert "AAPL" in results["read"][1][1] and "MSFT" in results["read"][1][1]
    for code, out, err in (results["edit"], results["create"]):
        assert code == 1 and out == "", err
        assert err.startswith("foliosync: error: the disk is full"), err
        assert "the change was not saved" in err
    assert results["wal"] > 0
    code, out, err = results["logged"]
    assert code == 0 and "NVDA" in out, err
    code, _, err = results["new"]
    assert code == 1 and err.startswith("foliosync: error: the disk is full"), err
    assert "no space left to create replica" in err
    (code, _, err), (_, shown, _) = results["after"]
    assert code == 0, err
    assert [line.split()[0] for line in shown.splitlines()[1:]] == ["AAPL", "MSFT", "GOOG"]


async def test_prices_follow_shows_live_prices_when_they_cannot_be_saved(
    tmp_path: Path, relay_server: Any
) -> None:
    """Prices are a cache: with no room to keep them they are still shown, and the command
    ends as usual (the replica closes although its last write of prices failed)."""
    db = tmp_path / "replica.db"
    make_replica(db)
    async with relay_server(tmp_path / "relay", price_window_ms=0) as relay:
        now = time.time_ns() // 1_000_000
        assert relay.relay.prices.publish(
            [check_tick({"symbol": "AAPL", "price": "101", "time_ms": now}, now)]
        )
        assert SCRIPT is not None
        command = [
            SCRIPT,
            "--db",
            str(db),
            "prices",
            "AAPL",
            "--follow",
            "--duration",
            "1.5",
            "--server",
            relay.url,
            "--token",
            relay.token("alice", "d1"),
        ]
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            'trap "" XFSZ; ulimit -f 0; exec "$@"',
            "bash",
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    assert out.decode().startswith("AAPL") and "101" in out.decode()
    assert err.decode().count("prices not saved") == 1, err.decode()
    # nothing else was harmed: the replica opens and reads as before
    shown = foliosync(db, "watchlist", "show", "Tech")
    assert shown.returncode == 0 and "MSFT" in shown.stdout
