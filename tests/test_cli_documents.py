"""The real `foliosync` console script, run as a user would: watchlists and portfolios offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from foliosync.sync.model import DocumentKind, document_id

SCRIPT = shutil.which("foliosync", path=os.path.dirname(sys.executable))


def run(
    *args: str, db: Path | None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None, "the foliosync console script is not installed next to python"
    environment = {k: v for k, v in os.environ.items() if k != "FOLIOSYNC_DB"}
    environment.update(env or {})
    command = [SCRIPT, *(["--db", str(db)] if db is not None else []), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, env=environment
    )


def ok(*args: str, db: Path | None) -> str:
    result = run(*args, db=db)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def as_json(*args: str, db: Path) -> Any:
    return json.loads(ok(*args, "--json", db=db))


def fails(*args: str, db: Path) -> str:
    result = run(*args, db=db)
    assert result.returncode != 0, (args, result.stdout)
    assert result.stderr.strip(), args
    assert "Traceback" not in result.stderr, result.stderr
    assert "error" in result.stderr.lower()
    return result.stderr


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cli" / "replica.db"


def test_watchlist_commands(db: Path) -> None:
    out = ok("watchlist", "list", db=db)
    assert "no watchlists" in out
    out = ok("watchlist", "create", "Tech", db=db)
    assert "Tech" in out
    shown = as_json("watchlist", "show", "tech", db=db)
    assert shown["id"] == document_id(DocumentKind.WATCHLIST, "Tech")
    assert shown["name"] == "Tech"
    assert shown["symbols"] == []
    created_pending = shown["pending"]
    assert created_pending >= 1

    out = ok("watchlist", "add", "Tech", "aapl", "MSFT", "brk.b", "7203.T", "--note", "core", db=db)
    assert "AAPL" in out and "BRK.B" in out
    out = ok("watchlist", "add", "Tech", "AAPL", db=db)  # nothing new
    assert "already" in out
    out = ok("watchlist", "remove", "Tech", "msft", db=db)
    assert "MSFT" in out
    out = ok("watchlist", "move", "Tech", "7203.T", "0", db=db)
    assert out.split() == ["7203.T", "AAPL", "BRK.B"]
    ok("watchlist", "move", "Tech", "AAPL", "-1", db=db)

    shown = as_json("watchlist", "show", "Tech", db=db)
    assert shown["symbols"] == ["7203.T", "BRK.B", "AAPL"]
    assert {e["symbol"]: e["note"] for e in shown["entries"]} == {
        "7203.T": "core",
        "BRK.B": "core",
        "AAPL": "core",
    }
    assert shown["pending"] == created_pending + 4  # add, remove, two moves; not the no-op

    text = ok("watchlist", "show", "Tech", db=db)
    assert text.splitlines()[0].startswith("Tech")
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["7203.T", "BRK.B", "AAPL"]

    ok("watchlist", "create", "Growth", db=db)
    listed = as_json("watchlist", "list", db=db)
    assert [(w["name"], w["symbols"]) for w in listed] == [("Growth", 0), ("Tech", 3)]
    assert {"id", "pending"} <= set(listed[0])
    text = ok("watchlist", "list", db=db)
    assert "Growth" in text and "Tech" in text


def test_portfolio_commands(db: Path) -> None:
    assert "no portfolios" in ok("portfolio", "list", db=db)
    ok("portfolio", "create", "Main", db=db)
    ok("portfolio", "trade", "Main", "AAPL", "10", "100", "--at", "2025-01-02T15:00Z", db=db)
    ok("portfolio", "trade", "Main", "aapl", "10", "110", "--at", "2025-01-03T15:00Z", db=db)
    out = ok("portfolio", "trade", "Main", "AAPL", "-4", "170", "--at", "2025-01-06T15:00Z", db=db)
    assert "sold" in out
    ok("portfolio", "trade", "Main", "BTC-USD", "0.1", "42000", "--note", "dca", db=db)
    ok("portfolio", "trade", "Main", "BTC-USD", "0.2", "42000", db=db)

    shown = as_json("portfolio", "show", "main", db=db)
    assert shown["id"] == document_id(DocumentKind.PORTFOLIO, "Main")
    assert shown["name"] == "Main"
    aapl = shown["positions"]["AAPL"]
    # avg (10*100 + 10*110) / 20 = 105; 4 sold at 170 realize 4 * 65 = 260
    assert (aapl["qty"], aapl["avg_cost"], aapl["realized"]) == ("16", "105", "260")
    btc = shown["positions"]["BTC-USD"]
    assert (btc["qty"], btc["avg_cost"]) == ("0.3", "42000")
    assert len(shown["trades"]) == 5
    assert {t["qty"] for t in shown["trades"]} == {"10", "-4", "0.1", "0.2"}
    first = shown["trades"][0]
    assert (first["symbol"], first["qty"], first["price"]) == ("AAPL", "10", "100")
    assert first["time"] == "2025-01-02T15:00:00.000Z"
    assert [t["note"] for t in shown["trades"] if t["symbol"] == "BTC-USD"] == ["dca", None]
    pending = shown["pending"]

    # correct the first buy's price by a prefix of its id: avg (10*101 + 10*110) / 20 = 105.5
    out = ok("portfolio", "correct", "Main", first["id"][:8], "--price", "101", db=db)
    assert first["id"][:8] in out
    shown = as_json("portfolio", "show", "Main", db=db)
    aapl = shown["positions"]["AAPL"]
    assert (aapl["qty"], aapl["avg_cost"]) == ("16", "105.5")
    assert Decimal(aapl["realized"]) == 4 * (170 - Decimal("105.5"))
    assert shown["pending"] == pending + 1

    ok("portfolio", "correct", "Main", first["id"], "--qty", "20", "--note", "fixed", db=db)
    shown = as_json("portfolio", "show", "Main", db=db)
    assert shown["trades"][0]["qty"] == "20" and shown["trades"][0]["note"] == "fixed"
    assert shown["positions"]["AAPL"]["qty"] == "26"

    btc_ids = [t["id"] for t in shown["trades"] if t["symbol"] == "BTC-USD"]
    for trade_id in btc_ids:
        assert trade_id[:8] in ok("portfolio", "delete-trade", "Main", trade_id, db=db)
    shown = as_json("portfolio", "show", "Main", db=db)
    assert set(shown["positions"]) == {"AAPL"}
    assert len(shown["trades"]) == 3

    text = ok("portfolio", "show", "Main", db=db)
    assert "AAPL" in text and "BTC-USD" not in text
    listed = as_json("portfolio", "list", db=db)
    assert [(p["name"], p["trades"], p["positions"]) for p in listed] == [("Main", 3, 1)]
    assert listed[0]["id"] == shown["id"]
    assert "Main" in ok("portfolio", "list", db=db)


def test_the_replica_location_comes_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "env" / "replica.db"
    result = run("watchlist", "create", "Env", db=None, env={"FOLIOSYNC_DB": str(path)})
    assert result.returncode == 0, result.stderr
    result = run("watchlist", "add", "Env", "IBM", db=None, env={"FOLIOSYNC_DB": str(path)})
    assert result.returncode == 0, result.stderr
    assert path.exists()
    assert as_json("watchlist", "show", "Env", db=path)["symbols"] == ["IBM"]
    # --db wins over the environment
    other = tmp_path / "other.db"
    result = run("watchlist", "list", db=other, env={"FOLIOSYNC_DB": str(path)})
    assert result.returncode == 0 and "no watchlists" in result.stdout


def test_errors_are_one_line_on_stderr_and_change_nothing(db: Path) -> None:
    ok("watchlist", "create", "Tech", db=db)
    ok("watchlist", "add", "Tech", "AAPL", db=db)
    ok("portfolio", "create", "Main", db=db)
    ok("portfolio", "trade", "Main", "AAPL", "1", "100", db=db)
    watchlist = as_json("watchlist", "show", "Tech", db=db)
    portfolio = as_json("portfolio", "show", "Main", db=db)

    assert "symbol" in fails("watchlist", "add", "Tech", "IBM", "A B", db=db).lower()
    assert "Nope" in fails("watchlist", "add", "Nope", "AAPL", db=db)
    fails("watchlist", "create", " tech ", db=db)
    fails("watchlist", "move", "Tech", "AAPL", "5", db=db)
    fails("portfolio", "trade", "Main", "AAPL", "ten", "100", db=db)
    fails("portfolio", "trade", "Main", "AAPL", "0", "100", db=db)
    fails("portfolio", "trade", "Main", "AAPL", "1", "100", "--at", "yesterday", db=db)
    fails("portfolio", "correct", "Main", portfolio["trades"][0]["id"], db=db)  # no field
    fails("portfolio", "delete-trade", "Main", "ffffffff", db=db)
    fails("portfolio", "create", "MAIN", db=db)

    assert as_json("watchlist", "show", "Tech", db=db) == watchlist
    assert as_json("portfolio", "show", "Main", db=db) == portfolio


def test_a_file_that_is_not_a_replica_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "not-a-replica.db"
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    fails("watchlist", "list", db=path)
    assert path.read_bytes() == before
