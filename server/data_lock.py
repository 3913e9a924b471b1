"""Which process owns a relay data directory: an exclusive lock on ``relay.lock`` inside it.

The relay takes it at start-up whenever it opens its default SQLite store (``create_app``'s
lifecycle: the CLI and any embedding alike) and releases it after closing the store, so that a
second relay on the same directory and a ``foliosync relay restore`` (which replaces the store
under it) are refused with a message instead of corrupting what the first one writes. The
operating system releases the lock when the process ends, even by ``kill -9``: a crashed relay
never leaves a stale lock behind. The file holds the owner's pid for the message; it is left in
place (deleting it would race a new owner).

On systems without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from foliosync.sync.errors import DataDirLocked

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "DataDirLock", "DataDirLocked"]

LOCK_FILE = "relay.lock"


class DataDirLock:
    """``with DataDirLock(data_dir, purpose):`` the directory is ours, or DataDirLocked."""

    def __init__(self, data_dir: Path, purpose: str = "relay") -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, purpose = _read_owner(fd)
                os.close(fd)
                what = "a relay is running" if purpose == "relay" else f"a {purpose} is under way"
                raise DataDirLocked(
                    f"{what} on the data directory {self.data_dir}{f' (pid {pid})' if pid else ''}"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.purpose}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock

    def __enter__(self) -> DataDirLock:
        if self._fd is None:  # not taken yet by an explicit acquire()
            self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _read_owner(fd: int) -> tuple[str, str]:
    """The pid and purpose the owner wrote ("" and "relay" if unreadable)."""
    try:
        words = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return "", "relay"
    pid = words[0] if words and words[0].isdigit() else ""
    return pid, words[1] if len(words) > 1 else "relay"
