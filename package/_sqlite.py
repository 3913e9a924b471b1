"""What the replica and the relay share about aiosqlite: connections that never hold a process.

aiosqlite (0.22) runs each connection in a non-daemon thread that ends only when the connection
is closed or garbage collected. A store left open when a program stops (an exception escaping
``asyncio.run``, whose traceback keeps the store alive) made the interpreter wait for that thread
forever: the process never exited. A daemon thread cannot hold the process, and leaving it behind
is safe: both stores commit what they accept (an edit, an acknowledged update) before saying so,
and SQLite rolls back an unfinished transaction when the file is next opened, as after a kill.
"""

from __future__ import annotations

import threading
from typing import Any

import aiosqlite

__all__ = ["connect"]


def connect(database: str, **kwargs: Any) -> aiosqlite.Connection:
    """``aiosqlite.connect`` whose worker thread is a daemon; await it as usual."""
    connecting = aiosqlite.connect(database, **kwargs)
    thread = getattr(connecting, "_thread", None)
    # Another aiosqlite may name it differently: tests/test_client_lifecycle.py then fails.
    if isinstance(thread, threading.Thread) and not thread.is_alive():
        thread.daemon = True
    return connecting
