"""The README as a new user follows it: every command and snippet, run exactly as written.

The quick start's ``make relay`` serves a real relay on 127.0.0.1:8765 from this checkout; the
README's shell blocks then run, in order, in one bash session (so ``export`` carries over), and
its Python block runs as a script. Only the environment is ours: ``FOLIOSYNC_DATA`` and
``FOLIOSYNC_DB`` point into a temporary directory, so that the user's own relay and replica are
never touched. A command that runs until stopped (``--follow``) is stopped after a few seconds,
and must have shown what it promises by then. The browser snippet is run by
tests/test_browser.py; the layout block is checked against the tree here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RELAY_PORT = 8765
FOLLOW_SECONDS = 6


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int  # where it starts in README.md, for messages

    @property
    def commands(self) -> list[str]:
        """One entry per shell command; continuation lines joined, blank lines dropped."""
        commands: list[str] = []
        pending = ""
        for raw in self.body.splitlines():
            pending += raw
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            if pending.strip():
                commands.append(pending.strip())
            pending = ""
        return commands


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```([\w-]*)\n(.*?)^```", text, re.M | re.S):
        blocks.append(Block(match[1], match[2], text[: match.start()].count("\n") + 1))
    return blocks


def test_every_block_has_a_runner() -> None:
    """A new block must say what it is, so that a test runs it (or checks it)."""
    blocks = readme_blocks()
    assert blocks
    for block in blocks:
        assert block.lang in {"sh", "python", "js", "text"}, (
            f"README.md:{block.line}: a fenced block needs one of sh, python, js, text"
        )
    quick_start = blocks[0]
    assert [c.split("#")[0].strip() for c in quick_start.commands] == ["make relay", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    """``make test`` cannot run inside itself: CI runs it, from .ci/run, on a fresh clone."""
    quick_start = readme_blocks()[0]
    assert "make test" in [c.split("#")[0].strip() for c in quick_start.commands]
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ".ci/run must run the README's `make test`"


def test_the_layout_block_names_what_is_there() -> None:
    (layout,) = [b for b in readme_blocks() if b.lang == "text"]
    folder = sub = ""
    named = 0
    for line in layout.body.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):  # a top-level folder: `sync/      pure code ...`
            folder, sub = line.split()[0].rstrip("/"), ""
            assert (ROOT / folder).is_dir(), f"README names {folder}/, which does not exist"
            named += 1
            continue
        first = line.split()[0]
        if first.endswith("/"):  # a sub-folder: `  model/       watchlist.py, ...`
            sub = first.rstrip("/")
            assert (ROOT / folder / sub).is_dir(), f"README names {folder}/{sub}/: absent"
        for word in re.findall(r"[\w/]+\.(?:py|md|mjs|json|csv)\b", line):
            candidates = [ROOT / folder / word, ROOT / folder / sub / word, ROOT / word]
            assert any(c.is_file() for c in candidates), f"README names {folder}/{word}: absent"
            named += 1
    assert named > 20


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    env.update(
        FOLIOSYNC_DATA=str(tmp_path / "relay-data"),
        FOLIOSYNC_DB=str(tmp_path / "replica.db"),
        HOME=str(tmp_path / "home"),
    )
    env.pop("VIRTUAL_ENV", None)
    (tmp_path / "home").mkdir()
    return env


@pytest.fixture
def make_relay(user_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The quick start's first command, in this checkout, as written."""
    assert _port_free(RELAY_PORT), f"port {RELAY_PORT} is taken: stop the relay that uses it"
    command = readme_blocks()[0].commands[0].split("#")[0].strip()
    assert command == "make relay"
    log = (tmp_path / "relay.log").open("wb")
    relay = subprocess.Popen(
        shlex.split(command),
        cwd=ROOT,
        env=user_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240  # a fresh set-up builds the wheel first
    while _port_free(RELAY_PORT):
        if relay.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"make relay did not start:\n{(tmp_path / 'relay.log').read_text()}")
        time.sleep(0.2)
    try:
        yield relay
    finally:
        os.killpg(relay.pid, signal.SIGINT)
        try:
            relay.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(relay.pid, signal.SIGKILL)
            relay.wait()
        log.close()


def end_marker(index: int) -> str:
    """After a command: its exit status, on a line of its own (output may lack a last newline)."""
    return f'status=$?; echo; echo "::end {index} $status"'


def session_script(blocks: list[Block], scratch: Path) -> tuple[str, list[str]]:
    """One bash session for every block after the quick start: each command prints its exit
    status after it; a Python block runs as a script from a scratch folder."""
    lines = ["cd " + shlex.quote(str(ROOT))]
    commands: list[str] = []
    for block in blocks:
        if block.lang == "sh":
            for command in block.commands:
                index = len(commands)
                commands.append(command)
                run = command
                if "--follow" in command:  # runs until stopped: stop it, keep what it showed
                    run = f"timeout -s INT {FOLLOW_SECONDS} {command}"
                lines += [f"echo '::begin {index}'", run, end_marker(index)]
        elif block.lang == "python":
            index = len(commands)
            commands.append(f"python (README.md:{block.line})")
            script = scratch / f"snippet-{index}.py"
            script.write_text(block.body)
            lines += [
                f"echo '::begin {index}'",
                f"(cd {shlex.quote(str(scratch))} && python {shlex.quote(script.name)})",
                end_marker(index),
            ]
    return "\n".join(lines) + "\n", commands


def test_the_readme_runs_as_written(
    make_relay: subprocess.Popen[bytes], user_env: dict[str, str], tmp_path: Path
) -> None:
    blocks = [b for b in readme_blocks()[1:] if b.lang in {"sh", "python"}]
    assert any(b.lang == "python" for b in blocks)
    scratch = tmp_path / "app"
    scratch.mkdir()
    script, commands = session_script(blocks, scratch)
    done = subprocess.run(
        ["bash", "-c", script], env=user_env, capture_output=True, text=True, timeout=300
    )
    transcript = done.stdout + done.stderr
    outputs: dict[int, str] = {}
    for match in re.finditer(r"^::begin (\d+)\n(.*?)^::end \1 (\d+)$", done.stdout, re.M | re.S):
        index, output, status = int(match[1]), match[2], int(match[3])
        outputs[index] = output
        expected = {0, 124} if "--follow" in commands[index] else {0}
        assert status in expected, (
            f"`{commands[index]}` exited {status}:\n{output}\n--- stderr ---\n{done.stderr}"
        )
    assert sorted(outputs) == list(range(len(commands))), f"not every command ran:\n{transcript}"

    def outputs_of(command: str) -> list[str]:
        """The outputs, in order, of the README's commands that are ``command`` but for their
        comments."""
        found = [
            outputs[i] for i, line in enumerate(commands) if line.split("  #")[0].strip() == command
        ]
        assert found, f"the README no longer runs `{command}`"
        return found

    def output_of(command: str) -> str:
        return outputs_of(command)[0]

    # What the README says each command shows.
    assert "AAPL" in output_of("foliosync portfolio show Main --json")
    assert re.search(r"AAPL\s+\S+.*\bago\b", output_of("foliosync prices AAPL MSFT")), (
        "prices promises the last known price with its age"
    )
    assert "AAPL" in output_of("foliosync prices AAPL --follow")
    # beside a process that holds the replica and syncs it, an edit, then the others see it
    first, *_, last = outputs_of("foliosync watchlist show Tech")
    assert "AMZN" not in first and "AMZN" in last
    assert "live" in output_of("foliosync status")
    status = json.loads(output_of("foliosync status --json"))
    assert status["pending"] == 0 and status["state"] == "not_running", status
