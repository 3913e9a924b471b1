"""Output piped to a reader that stops early: every command ends quietly, as Unix tools do.

Real pipes and real readers: ``head -1`` in a shell pipeline (the output is larger than a pipe's
buffer, so the writer is still writing when head has gone), and a pipe whose reading end is
already closed when the command starts (so that its first write fails, however small).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from foliosync.client.cli import EXIT_PIPE_CLOSED

SCRIPT = shutil.which("foliosync", path=os.path.dirname(sys.executable))
SYMBOLS = [f"S{i:04d}" for i in range(3000)]  # `watchlist show` prints about 150 KB


def foliosync_writing_to(stdout: int, *args: str) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None
    return subprocess.run(
        [SCRIPT, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipes") / "replica.db"
    assert SCRIPT is not None
    for args in (["watchlist", "create", "Big"], ["watchlist", "add", "Big", *SYMBOLS]):
        done = subprocess.run([SCRIPT, "--db", str(path), *args], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["watchlist", "show", "Big"],
        ["watchlist", "show", "Big", "--json"],
        # 250 KB: far past a pipe's buffer and head's first read, whatever the timing.
        ["prices", *(f"P{i:05d}" for i in range(10_000))],
    ],
)
def test_head_stops_reading_and_the_command_exits_quietly(db: Path, args: list[str]) -> None:
    assert SCRIPT is not None
    pipeline = '"$@" | head -1; echo "status ${PIPESTATUS[0]}" >&2'
    done = subprocess.run(
        ["bash", "-c", pipeline, "bash", SCRIPT, "--db", str(db), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert len(done.stdout.splitlines()) == 1  # head got its line
    assert done.stderr == f"status {EXIT_PIPE_CLOSED}\n"  # and nothing else was said


@pytest.mark.parametrize(
    "args",
    [
        ["watchlist", "list"],
        ["watchlist", "show", "Big", "--json"],
        ["status", "--json"],
        ["prices", "AAPL"],
        ["market", "--json"],
        ["portfolio", "list"],
        ["--help"],
    ],
)
def test_a_reader_gone_before_the_first_write(db: Path, args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader closed its end early: the first write gets EPIPE
    try:
        done = foliosync_writing_to(write_end, "--db", str(db), *args)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    # argparse ignores a failed write of its help text itself, and then exits 0 as usual
    assert done.returncode == (0 if args == ["--help"] else EXIT_PIPE_CLOSED)


def test_a_closed_pipe_changes_nothing_in_the_replica(db: Path) -> None:
    """The replica is closed properly on the way out: the next command finds it intact."""
    assert SCRIPT is not None
    subprocess.run(
        [
            "bash",
            "-c",
            '"$@" | head -1 > /dev/null',
            "bash",
            SCRIPT,
            "--db",
            str(db),
            "watchlist",
            "show",
            "Big",
        ],
        timeout=60,
    )
    done = subprocess.run(
        [SCRIPT, "--db", str(db), "watchlist", "list"], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, "Big  (3000 symbols, 2 pending)\n")
