"""Backing up a relay's store while it runs, and putting a backup back.

``backup`` opens the data directory's ``relay.db`` itself, from its own connection, and copies it
with SQLite's online backup API in one step. It does not talk to the running relay: the store is
in WAL mode, so a separate reader sees one consistent snapshot (every transaction committed
before the copy started, none after) while the relay goes on writing, and a backup needs neither
the relay's address nor a token, and works the same whether the relay runs or not. The relay
acknowledges an update only once it is committed, so a backup holds every update acknowledged
before it started. The copy is written beside the target and renamed into place when complete, in
rollback-journal mode: one self-contained file, no ``-wal`` beside it.

``restore`` refuses while a relay (or another restore) holds the data directory (see
:mod:`foliosync.server.data_lock`), checks that the file is a foliosync relay store, copies it
beside ``relay.db``, moves the current store (with its WAL, if a killed relay left one) aside as
``relay.db.before-restore-TIMESTAMP``, and renames the copy into place. Devices then send the
relay, at their next connection, whatever it lacks by state vector, including what they made
after the backup.

The relay's secret (``secret.key``) is not in the store: keep it with the backups, or tokens issued
before a restore on a new machine stop working.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from foliosync.server.data_lock import DataDirLock, DataDirLocked
from foliosync.server.storage import RelayStoreError
from foliosync.sync.errors import ConfigError

__all__ = ["STORE_FILE", "Restored", "StoreSummary", "backup_store", "check_store", "restore_store"]

STORE_FILE = "relay.db"

# The tables and columns the relay's schema (foliosync.server.storage) creates.
_EXPECTED = {
    "documents": {"user", "doc_id", "snapshot", "changed_at", "changed_by"},
    "updates": {"seq", "user", "doc_id", "data"},
}


@dataclass(frozen=True, slots=True)
class StoreSummary:
    """What a store holds, for the operator's confirmation."""

    documents: int
    updates: int

    def __str__(self) -> str:
        return f"{self.documents} documents, {self.updates} stored updates"


def _summarize(conn: sqlite3.Connection, path: Path) -> StoreSummary:
    """The summary of a foliosync relay store; ConfigError if ``conn`` is not one."""
    try:
        columns = {
            table: {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}
            for table in _EXPECTED
        }
        missing = [t for t, cols in _EXPECTED.items() if not cols <= columns[t]]
        if missing:
            raise ConfigError(
                f"{path} is not a foliosync relay store (no {' or '.join(missing)} table)"
            )
        check = conn.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise ConfigError(f"{path} is a damaged relay store: {check[0] if check else '?'}")
        documents = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
        updates = conn.execute("SELECT count(*) FROM updates").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a foliosync relay store ({exc})") from exc
    return StoreSummary(int(documents), int(updates))


def _connect(path: Path, mode: str) -> sqlite3.Connection:
    """An existing database only: SQLite would create an empty one for a mistyped name."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist" if not path.exists() else f"{path} is no file")
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open {path}: {exc}") from exc


def check_store(path: Path) -> StoreSummary:
    """Whether ``path`` is a readable foliosync relay store (ConfigError if not)."""
    conn = _connect(path, "ro")
    try:
        return _summarize(conn, path)
    finally:
        conn.close()


def _copy(source: sqlite3.Connection, target: Path) -> None:
    """``source`` into a new file ``target``, in one step, self-contained and on disk.

    Created readable by its owner only (0600), whatever the umask: a backup or a restored store
    holds every user's documents. SQLite opens the empty file as an empty database."""
    target.unlink(missing_ok=True)
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    dest = sqlite3.connect(target)
    try:
        source.backup(dest)  # pages=-1: the whole database in one step, from one snapshot
        dest.execute("PRAGMA journal_mode = DELETE")
        dest.commit()
    finally:
        dest.close()
    with open(target, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def backup_store(data_dir: Path, target: Path) -> StoreSummary:
    """Copy the store of ``data_dir`` to ``target`` (replaced if it exists), relay running or
    not. Raises ConfigError for a missing store or target directory, RelayStoreError if SQLite
    fails."""
    store = data_dir / STORE_FILE
    if not store.exists():
        raise ConfigError(f"no relay store in {data_dir} (no {STORE_FILE}): nothing to back up")
    if target.exists() and target.resolve() == store.resolve():
        raise ConfigError(f"{target} is the relay's store itself: back up to another file")
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write {target}: {target.parent} is not a directory")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    source = _connect(store, "rw")  # rw: a WAL reader needs the shared-memory file
    try:
        summary = _summarize(source, store)
        try:
            _copy(source, partial)
        except sqlite3.Error as exc:
            raise RelayStoreError(f"backing up {store} failed: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from exc
        # A -wal or -shm left beside the target (a database that was there before) would be
        # replayed into the copy when it is opened: the backup would not hold what it says.
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        os.replace(partial, target)
        _fsync_dir(target.parent)
    finally:
        source.close()
        partial.unlink(missing_ok=True)
    return summary


@dataclass(frozen=True, slots=True)
class Restored:
    summary: StoreSummary
    previous: Path | None  # where the replaced store was put, if there was one


def restore_store(data_dir: Path, backup: Path) -> Restored:
    """Put ``backup`` in place as the store of ``data_dir``; the current one is kept aside.

    Refused (DataDirLocked) while a relay runs on ``data_dir``; ConfigError if ``backup`` is not
    a foliosync relay store. Nothing is replaced unless the copy is complete."""
    summary = check_store(backup)
    lock = DataDirLock(data_dir, "restore")
    try:
        lock.acquire()
    except DataDirLocked as exc:
        raise DataDirLocked(f"{exc}: stop it, then restore") from None
    with lock:
        store = data_dir / STORE_FILE
        incoming = data_dir / f".{STORE_FILE}.restoring-{os.getpid()}"
        source = _connect(backup, "ro")
        try:
            _copy(source, incoming)
        except sqlite3.Error as exc:
            incoming.unlink(missing_ok=True)
            raise RelayStoreError(f"copying {backup} failed: {exc}") from exc
        except OSError as exc:
            incoming.unlink(missing_ok=True)
            raise ConfigError(f"cannot write into {data_dir}: {exc.strerror or exc}") from exc
        finally:
            source.close()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        aside = data_dir / f"{STORE_FILE}.before-restore-{stamp}"
        previous = aside if store.exists() else None
        # With its -wal and -shm under the matching names, the old store opens as it was. They
        # go aside even without a relay.db: SQLite would replay a WAL left beside the restored
        # file into it (a killed relay's, whose store was deleted by hand), undoing the restore.
        for suffix in ("-wal", "-shm", ""):
            old = data_dir / f"{STORE_FILE}{suffix}"
            if old.exists():
                os.replace(old, aside.with_name(aside.name + suffix))
        os.replace(incoming, store)
        _fsync_dir(data_dir)
    return Restored(summary, previous)
