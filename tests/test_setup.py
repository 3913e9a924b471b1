"""The README's set-up, as a new user meets it: a copy of the checkout, a fresh venv, two set-ups
started at the same time (``make relay`` in one shell, ``make test`` in another)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copy_checkout(target: Path) -> None:
    """The files a clone has (tracked, or new and not ignored), nothing built."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def test_set_ups_at_once_build_one_working_venv_and_share_the_checkout_safely(
    tmp_path: Path,
) -> None:
    """Three set-ups from one checkout at once: two into its .venv (``make relay`` in one shell,
    ``make test`` in another) make one working venv; a third into another venv shares build/,
    *.egg-info and dist/ with them, so they take turns; dist/ ends with one sdist and one wheel.
    One test, the set-ups side by side: each costs tens of seconds of the suite."""
    checkout = tmp_path / "foliosync"
    copy_checkout(checkout)
    venv, other = checkout / ".venv", tmp_path / "venv-b"
    command = [sys.executable, "tools/bootstrap.py", str(venv)]
    running = [
        subprocess.Popen(args, cwd=checkout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for args in (
            command,
            [*command, "--extras", "test"],
            [sys.executable, "tools/bootstrap.py", str(other)],
        )
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in running]
    for process, output in zip(running, outputs, strict=True):
        assert process.returncode == 0, output

    # The wheel, not the checkout: run from elsewhere so that nothing of the copy is on sys.path.
    done = subprocess.run(
        [
            venv / "bin/python",
            "-c",
            "import foliosync, foliosync.client, foliosync.server, foliosync.sync.model;"
            "print(foliosync.__version__, foliosync.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    version, location = done.stdout.split()
    assert "site-packages" in location and not location.startswith(str(checkout / "package"))
    assert (venv / "bin/pytest").exists()  # the second set-up's extras are there too
    done = subprocess.run(
        [venv / "bin/foliosync", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == f"foliosync {version}"
    done = subprocess.run(
        [other / "bin/python", "-c", "import foliosync.server.relay, foliosync.client.cli"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    built = sorted(p.name for p in (checkout / "dist").iterdir())
    assert len(built) == 2, built
    assert {Path(name).suffix for name in built} == {".gz", ".whl"}, built

    # A fourth run with nothing changed does nothing: a running relay keeps its files.
    installed = location.replace("__init__.py", "client/cli.py")
    before = Path(installed).stat().st_mtime_ns
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path(installed).stat().st_mtime_ns == before
