"""The package as users get it: the suite runs against foliosync installed from its wheel.

An editable install finds every module of the checkout, so a sub-package left out of the wheel
went unseen until a user's `import foliosync.client` failed. These tests compare the installed
distribution with the checkout, file by file, and import every module from the install.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

import foliosync

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {
    "package": "foliosync",
    "sync": "foliosync/sync",
    "server": "foliosync/server",
    "client": "foliosync/client",
}
HOW = "build and install it with `make test` (tools/bootstrap.py)"


def checkout_files() -> dict[str, Path]:
    """Installed path -> checkout file, for every file the package ships."""
    files = {}
    for folder, target in MAPPED.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and path.suffix
                in {
                    ".py",
                    ".typed",
                }
            ):
                files[f"{target}/{path.relative_to(ROOT / folder).as_posix()}"] = path
    return files


@pytest.fixture(scope="module")
def dist() -> metadata.Distribution:
    return metadata.distribution("foliosync")


def test_installed_from_a_wheel_not_the_checkout(dist: metadata.Distribution) -> None:
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct_url.get("dir_info", {}).get("editable"), (
        f"foliosync is an editable install of the checkout; the suite tests the wheel: {HOW}"
    )
    assert direct_url.get("url", "").endswith(".whl"), f"not installed from a wheel: {HOW}"
    package_dir = Path(foliosync.__file__).resolve().parent
    assert package_dir != ROOT / "package"
    assert Path(str(dist.locate_file("foliosync"))).resolve() == package_dir


def test_every_module_of_the_checkout_is_installed_as_it_is(dist: metadata.Distribution) -> None:
    installed = {str(f): f for f in dist.files or []}
    missing = [name for name in checkout_files() if name not in installed]
    assert not missing, f"the wheel lacks {missing[:5]}: list them in pyproject.toml"
    stale = [
        name
        for name, path in checkout_files().items()
        if Path(str(dist.locate_file(installed[name]))).read_bytes() != path.read_bytes()
    ]
    assert not stale, f"the installed package is older than the checkout ({stale[:3]}): {HOW}"


def test_every_installed_module_imports(dist: metadata.Distribution) -> None:
    modules = sorted(
        str(f)[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for f in dist.files or []
        if str(f).startswith("foliosync/") and str(f).endswith(".py")
    )
    assert "foliosync.sync.model" in modules and "foliosync.sync.protocol.frames" in modules
    for name in modules:
        if name != "foliosync.__main__":  # runs the CLI: tested below as a process
            module = importlib.import_module(name)
            assert Path(module.__file__ or "").is_relative_to(Path(foliosync.__file__).parent)


def test_nothing_generic_lands_in_site_packages(dist: metadata.Distribution) -> None:
    tops = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    assert tops == {"foliosync", f"foliosync-{dist.version}.dist-info"}
    assert (dist.read_text("top_level.txt") or "").split() == ["foliosync"]


def test_version_and_python_dash_m(dist: metadata.Distribution) -> None:
    assert foliosync.__version__ == dist.version
    done = subprocess.run(
        [sys.executable, "-m", "foliosync", "--version"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"foliosync {dist.version}"
    done = subprocess.run(
        [sys.executable, "-m", "foliosync", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "watchlist" in done.stdout and "relay" in done.stdout


def test_the_sdist_holds_every_module(dist: metadata.Distribution) -> None:
    """The wheel was built from the sdist, and both are kept in dist/ by the set-up."""
    sdists = sorted((ROOT / "dist").glob(f"foliosync-{dist.version}.tar.gz"))
    assert sdists, f"no sdist in dist/: {HOW}"
    with tarfile.open(sdists[0]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    missing = [
        path.relative_to(ROOT).as_posix()
        for path in checkout_files().values()
        if path.relative_to(ROOT).as_posix() not in names
    ]
    assert not missing, f"the sdist lacks {missing[:5]}"
    assert {"pyproject.toml", "README.md"} <= names
