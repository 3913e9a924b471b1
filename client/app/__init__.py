"""``foliosync app``: a desktop window on :class:`~foliosync.client.BackgroundClient` (Qt).

Nothing here imports PySide6 until a window is wanted: the library and ``foliosync --help`` work
without the ``desktop`` extra, and :func:`require_qt` turns its absence into one clear line.
"""

from __future__ import annotations

import importlib.util

from foliosync.sync.errors import ConfigError

__all__ = ["INSTALL_HINT", "require_qt"]

INSTALL_HINT = 'pip install "foliosync[desktop]"'


def require_qt() -> None:
    """ConfigError saying how to install Qt, unless PySide6 can be imported."""
    try:
        found = importlib.util.find_spec("PySide6.QtWidgets") is not None
    except ImportError:  # PySide6 itself missing: find_spec of a submodule imports the parent
        found = False
    if not found:
        raise ConfigError(f"the desktop app needs PySide6: {INSTALL_HINT}")
