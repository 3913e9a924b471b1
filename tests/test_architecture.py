"""The layout promises of the project, checked: sync/ is pure, public APIs are declared."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import foliosync.client
import foliosync.server
import foliosync.sync

ROOT = Path(__file__).resolve().parent.parent
# What sync/ may never import: anything that awaits, touches files, sockets, processes or the
# environment. The relay and the client wrap sync/ with these; sync/ itself stays testable alone.
FORBIDDEN_IN_SYNC = {
    "aiohttp",
    "aiosqlite",
    "asyncio",
    "io",
    "os",
    "pathlib",
    "platformdirs",
    "redis",
    "selectors",
    "shutil",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "tempfile",
    "threading",
    "urllib",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _sync_modules() -> list[Path]:
    return sorted((ROOT / "sync").rglob("*.py"))


def test_sync_modules_exist() -> None:
    assert len(_sync_modules()) >= 10


@pytest.mark.parametrize("path", _sync_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sync_is_pure(path: Path) -> None:
    used = _imports(path) & FORBIDDEN_IN_SYNC
    assert not used, f"{path.relative_to(ROOT)} imports {sorted(used)}: sync/ must stay pure"


def _sync_has_no_await(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return not any(isinstance(n, ast.Await | ast.AsyncFunctionDef) for n in ast.walk(tree))


@pytest.mark.parametrize("path", _sync_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sync_never_awaits(path: Path) -> None:
    assert _sync_has_no_await(path), f"{path.relative_to(ROOT)} awaits: sync/ must stay pure"


def _isort_key(name: str) -> tuple[int, str]:
    """Ruff's (RUF022) order: CONSTANTS, then Classes, then functions, each alphabetical."""
    if name.isupper():
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def _public_modules() -> list[str]:
    names = []
    for package in (foliosync.sync, foliosync.client, foliosync.server):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _public_modules())
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} declares no __all__"
    assert list(exported) == sorted(exported, key=_isort_key), f"{name}.__all__ is not sorted"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for top in ("sync", "server")
        for p in (Path(__file__).resolve().parent.parent / top).rglob("*.py")
    ),
    ids=str,
)
def test_all_lists_every_public_function_and_class(path: Path) -> None:
    """A public name left out of ``__all__`` is missing from ``from module import *`` and from
    the documented API, though other modules import it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    exported: set[str] | None = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported = set(ast.literal_eval(node.value))
    if exported is None:
        return  # test_all_is_sorted_and_resolves requires one of importable modules
    public = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and not node.name.startswith("_")
    }
    assert not public - exported, f"{path.name}: not in __all__: {sorted(public - exported)}"


def test_no_module_reaches_into_another_s_private_names() -> None:
    """What one module needs of another is public (``authorize_request``, ``FRAME_CODES``), so a
    private helper can change without breaking a module that borrowed it."""
    reached = []
    for top in ("sync", "server"):
        for path in sorted((Path(__file__).resolve().parent.parent / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("foliosync"):
                    reached += [
                        f"{path.name}: {node.module}.{alias.name}"
                        for alias in node.names
                        if alias.name.startswith("_") and not alias.name.startswith("__")
                    ]
                if (
                    path.name != "frames.py"
                    and isinstance(node, ast.Attribute)
                    and node.attr == "_CODE"
                ):
                    reached.append(f"{path.name}: {ast.unparse(node)}")
    assert not reached, reached


def test_errors_form_one_tree() -> None:
    from foliosync.sync import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.FolioSyncError), name


def test_nothing_generic_is_installed() -> None:
    """The three folders install under foliosync.* only: no top-level sync, client or server."""
    import importlib.util

    for generic in ("sync", "client", "server"):
        spec = importlib.util.find_spec(generic)
        assert spec is None or "foliosync" not in str(spec.origin or ""), generic
