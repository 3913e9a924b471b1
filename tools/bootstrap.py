"""Set up the project's virtual environment with foliosync installed as users get it.

``make relay`` and ``make test`` both start here. It builds the sdist, then the wheel from that
sdist (as ``pip install foliosync`` would), and installs the wheel into the venv with the extras
asked for; the tests then run against that install, never against the checkout, so a module that
the wheel lacks fails the suite instead of hiding behind an editable install.

Two of these may run at once (``make relay`` in one shell, ``make test`` in another): an exclusive
lock beside the venv makes the second wait for the first, and a stamp in the venv (what was
installed from which sources) lets it skip the work the first one already did. A running relay
keeps its files: nothing is reinstalled when nothing changed. Set-ups of *different* venvs from
one checkout share its ``build/``, ``*.egg-info`` and ``dist/``: each builds into a directory of
its own, under a lock on the checkout, and then puts its sdist and wheel in ``dist/``.

Usage: ``python3 tools/bootstrap.py VENV [--extras test,bench] [--editable]``
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("package", "sync", "server", "client")
METADATA = ("pyproject.toml", "README.md")
STAMP = "foliosync-install.json"


def fingerprint() -> str:
    """A hash of everything that goes into the wheel: a change anywhere means a rebuild."""
    digest = hashlib.sha256()
    files = [ROOT / name for name in METADATA]
    for top in SOURCES:
        files.extend(sorted(p for p in (ROOT / top).rglob("*") if p.is_file()))
    for path in files:
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def run(*args: str | Path) -> None:
    """Run a step quietly; on failure show what it printed, then stop."""
    done = subprocess.run(
        [str(a) for a in args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if done.returncode != 0:
        sys.stdout.write(done.stdout.decode(errors="replace"))
        raise SystemExit(f"bootstrap: {' '.join(map(str, args))} failed ({done.returncode})")


def quiet_pip(python: Path, *args: str | Path) -> None:
    run(python, "-m", "pip", "--disable-pip-version-check", "-q", *args)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(venv: Path) -> Path:
    python = venv_python(venv)
    if python.exists():
        probe = subprocess.run([python, "-c", "import pip, build"], capture_output=True)
        if probe.returncode == 0:
            return python
    if venv.exists():  # half made by an interrupted run, or by an older Makefile without build
        shutil.rmtree(venv)
    run(sys.executable, "-m", "venv", venv)
    quiet_pip(python, "install", "--upgrade", "pip", "build")
    return python


@contextlib.contextmanager
def checkout_lock() -> Iterator[None]:
    """One build at a time in this checkout, whatever the venv: setuptools writes ``build/`` and
    ``*.egg-info`` inside it. The lock is on the checkout's directory itself, so no file is left
    behind; the system releases it when the process dies."""
    fd = os.open(ROOT, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_wheel(python: Path, out: Path) -> Path:
    """sdist first, then the wheel from the sdist: a file the sdist lacks is missing from the
    wheel too, so checking the installed wheel checks both. Built into ``out`` (this run's own),
    then copied into ``ROOT/dist`` (where the packaging tests read them), replacing what an
    earlier build left there; the wheel returned is ``out``'s, which no other run touches."""
    with checkout_lock():
        run(python, "-m", "build", "--outdir", out, ROOT)
        (wheel,) = out.glob("foliosync-*.whl")
        (sdist,) = out.glob("foliosync-*.tar.gz")
        dist = ROOT / "dist"
        dist.mkdir(exist_ok=True)
        for old in dist.glob("foliosync-*"):
            old.unlink()
        for built in (sdist, wheel):
            shutil.copy2(built, dist / built.name)
    return wheel


def install(venv: Path, extras: set[str], editable: bool) -> None:
    python = ensure_venv(venv)
    stamp = venv / STAMP
    had = json.loads(stamp.read_text()) if stamp.exists() else {}
    source = fingerprint()
    if (
        had.get("fingerprint") == source
        and had.get("editable") == editable
        and extras <= set(had.get("extras", ()))
    ):
        return
    # Keep what an earlier run installed (``make relay`` after ``make test`` keeps the test tools).
    extras |= set(had.get("extras", ()))
    stamp.unlink(missing_ok=True)
    suffix = f"[{','.join(sorted(extras))}]" if extras else ""
    # pip keeps an installed 0.1.0 when asked for 0.1.0 again: remove it so the new build lands.
    quiet_pip(python, "uninstall", "-y", "foliosync")
    if editable:
        with checkout_lock():  # setuptools builds the editable wheel in the checkout too
            quiet_pip(python, "install", "-e", f"{ROOT}{suffix}")
    else:
        with tempfile.TemporaryDirectory(prefix="foliosync-build-") as out:
            wheel = build_wheel(python, Path(out))
            quiet_pip(python, "install", f"foliosync{suffix} @ {wheel.as_uri()}")
    stamp.write_text(
        json.dumps({"fingerprint": source, "editable": editable, "extras": sorted(extras)})
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. test,bench")
    parser.add_argument(
        "--editable", action="store_true", help="an editable install instead of the wheel"
    )
    args = parser.parse_args()
    venv = args.venv if args.venv.is_absolute() else ROOT / args.venv
    lock_path = venv.with_name(venv.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        install(venv, {e for e in args.extras.split(",") if e}, args.editable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
