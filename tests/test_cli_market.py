from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def foliosync(*args: str) -> subprocess.CompletedProcess[str]:
    script = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert script is not None, "the foliosync console script is not installed next to python"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=60, check=False)


def test_json_in_session_on_an_early_close() -> None:
    result = foliosync("market", "--at", "2024-11-29T17:59:59Z", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "exchange": "NYSE",
        "at": "2024-11-29T12:59:59-05:00",
        "open": True,
        "session": {"open": "2024-11-29T09:30:00-05:00", "close": "2024-11-29T13:00:00-05:00"},
        "next_open": "2024-12-02T09:30:00-05:00",
        "next_close": "2024-11-29T13:00:00-05:00",
    }


def test_json_on_a_holiday_with_a_naive_time_read_as_new_york() -> None:
    result = foliosync("market", "--at", "2026-07-03T10:00:00", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["at"] == "2026-07-03T10:00:00-04:00"
    assert report["open"] is False
    assert report["session"] is None
    assert report["next_open"] == "2026-07-06T09:30:00-04:00"
    assert report["next_close"] == "2026-07-06T16:00:00-04:00"


def test_text_output() -> None:
    result = foliosync("market", "--at", "2024-03-11T13:30:00+00:00")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "NYSE is open at Mon 2024-03-11 09:30 EDT",
        "session that day: 09:30-16:00 EDT",
        "next close: Mon 2024-03-11 16:00 EDT",
        "next open:  Tue 2024-03-12 09:30 EDT",
    ]


def test_without_at_it_reports_now() -> None:
    result = foliosync("market", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exchange"] == "NYSE"
    assert isinstance(report["open"], bool)


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01T10:00", "2024-03-11T25:00Z"])
def test_an_unparsable_at_is_an_error(bad: str) -> None:
    result = foliosync("market", "--at", bad, "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("foliosync: error: --at:")
    assert "Traceback" not in result.stderr


def test_help_says_how_a_naive_time_is_read() -> None:
    result = foliosync("market", "--help")
    assert result.returncode == 0
    assert "without an offset is New York time" in " ".join(result.stdout.split())
