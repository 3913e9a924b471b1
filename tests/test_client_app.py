"""The README's "In an app" script, run as a user runs it: a file run with ``python``, against a
real relay, on a new replica and again on the same one.

tests/test_readme.py runs it against ``make relay``; here it also meets a relay that has no price
to give, which must not break it either.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from foliosync.client import Replica, SyncClient

README = Path(__file__).resolve().parent.parent / "README.md"
_SECTION = README.read_text(encoding="utf-8").split("\n## In an app\n", 1)[1].split("\n## ", 1)[0]
(APP,) = [  # the "In an app" script: the one of that section that drives a SyncClient itself
    block
    for block in re.findall(r"^```python\n(.*?)^```", _SECTION, re.M | re.S)
    if "SyncClient(" in block
]


async def run_app(folder: Path, server: str, token: str) -> tuple[int, str, str]:
    script = folder / "app.py"
    script.write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    env.update(FOLIOSYNC_SERVER=server, FOLIOSYNC_TOKEN=token)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        script.name,
        cwd=folder,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("the app did not exit within 60 s")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_app_runs_on_a_new_replica_and_again(tmp_path: Path, relay_server: Any) -> None:
    """Against a relay with the simulated feed (what ``make relay`` runs)."""
    folder = tmp_path / "app"
    folder.mkdir()
    async with relay_server(tmp_path / "relay", feed="sim") as relay:
        token = relay.token("alice", "laptop")
        for run in range(2):
            code, out, err = await run_app(folder, relay.url, token)
            assert (code, err) == (0, ""), (run, out, err)
            lines = out.splitlines()
            assert "187.25" in lines
            assert "live — synced just now" in lines
            assert any(line.startswith("SyncStatus(") and "pending=0" in line for line in lines)
            price = lines[-1].split()
            assert price[0].replace(".", "").isdigit(), out  # AAPL's price, with its age...
            assert " ago " in lines[-1] or "just now" in lines[-1], out
            assert price[-1] in {"live", "fresh", "stale", "outdated"}, out  # ...and its level
        # leaving the SyncClient block sent every edit: another device sees both runs' trades
        async with Replica.open(tmp_path / "phone.db") as phone:
            await SyncClient(phone, relay.url, relay.token("alice", "phone")).sync_once(10)
            assert (await phone.watchlist("Tech")).symbols == ["AAPL", "MSFT"]
            assert len((await phone.portfolio("Main")).trades()) == 2


async def test_the_app_runs_against_a_relay_without_prices(
    tmp_path: Path, relay_server: Any
) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    async with relay_server(tmp_path / "relay", feed="none") as relay:
        code, out, err = await run_app(folder, relay.url, relay.token("alice", "laptop"))
    assert (code, err) == (0, ""), (out, err)
    assert out.splitlines()[-1] == "no price for AAPL yet"
