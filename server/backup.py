"""Backing up a relay's data directory while it runs, and putting a backup back.

A backup is a directory holding what a relay on another machine needs to carry on where this one
was: ``relay.db`` (the documents), ``shares.db`` (shares and token revocations), ``secret.key``
(the secret tokens are signed with) and ``foliosync-backup.json`` (what it holds, and the mark
that lets a later backup replace it). ``relay.lock`` and stores kept aside by earlier restores
are not copied. Without ``shares.db`` a restore on a new machine would lose every share and,
worse, every revocation: a lost laptop's token would work again. Without ``secret.key`` every
token issued before would be refused there.

``backup`` reads the data directory itself, from its own connections, and does not talk to the
running relay: both stores are in WAL mode, so a separate reader sees one consistent snapshot of
each (every transaction committed before its copy started, none after) while the relay goes on
writing, and a backup needs neither the relay's address nor a token. Each store is copied with
SQLite's online backup API in one step, ``relay.db`` first and ``shares.db`` just after. So the
backup holds every update the relay acknowledged, and every share and revocation it reported
done, before the backup started; a change made while it runs may be in one copy and not the
other, which no restore minds (a share names a document by id whether or not the store holds it
yet, and devices send the relay the documents it lacks). The two are not one snapshot: the relay
never writes them in one transaction, so there is no single moment to capture. The copies are
written in rollback-journal mode (self-contained files, no ``-wal`` beside them), readable by
their owner only, into a directory beside the target that is renamed into place when complete.

``restore`` refuses while a relay (or another restore) holds the data directory (see
:mod:`foliosync.server.data_lock`), checks everything it will put in place before it replaces
anything, then, under that one lock, moves each file it replaces (with its WAL, if a killed relay
left one) aside as ``NAME.before-restore-TIMESTAMP`` and renames the checked copies into place.
A revocation is for good, so every revocation the replaced ``shares.db`` holds that the backup
lacks (one recorded after the backup) is carried into the restored one: a restore never lets in
again a token the data directory had refused (on a new machine there is none to carry: a backup
lacks what was revoked after it). Shares are as they were at the backup. Devices then send the
relay, at their next connection, whatever it lacks by state vector, including what they made
after the backup. A backup made before backups held the shares (one ``relay.db`` file) still
restores: the documents only, the data directory's own ``shares.db`` and ``secret.key`` left as
they are, and :attr:`Restored.warnings` says what that means for them.

The backup holds the secret: whoever reads it can sign tokens for any user, as whoever reads the
data directory can. Keep backups as safe as that directory. To keep the secret elsewhere, delete
``secret.key`` from the backup: a restore then keeps the data directory's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from foliosync.server.auth import SECRET_FILE
from foliosync.server.data_lock import DataDirLock, DataDirLocked
from foliosync.server.sharing import SQLITE_SCHEMA
from foliosync.server.storage import RelayStoreError
from foliosync.sync.errors import ConfigError

__all__ = [
    "MANIFEST_FILE",
    "SHARES_FILE",
    "STORE_FILE",
    "BackupSummary",
    "Restored",
    "ShareSummary",
    "StoreSummary",
    "backup_store",
    "check_shares",
    "check_store",
    "restore_store",
]

STORE_FILE = "relay.db"
SHARES_FILE = "shares.db"
MANIFEST_FILE = "foliosync-backup.json"
_FORMAT = 1
_Summary = TypeVar("_Summary")

# The tables and columns the relay's schemas (foliosync.server.storage, .sharing) create.
_STORE_TABLES = {
    "documents": {"user", "doc_id", "snapshot", "changed_at", "changed_by"},
    "updates": {"seq", "user", "doc_id", "data"},
}
_SHARE_TABLES = {
    "shares": {"owner", "doc_id", "grantee", "access", "granted_at"},
    "token_revocations": {"id", "revoked_at", "user", "device", "jti"},
}


@dataclass(frozen=True, slots=True)
class StoreSummary:
    """What a document store holds, for the operator's confirmation."""

    documents: int
    updates: int

    def __str__(self) -> str:
        return f"{self.documents} documents, {self.updates} stored updates"


@dataclass(frozen=True, slots=True)
class ShareSummary:
    """What a share store holds."""

    shares: int
    revocations: int

    def __str__(self) -> str:
        return f"{self.shares} shares, {self.revocations} token revocations"


@dataclass(frozen=True, slots=True)
class BackupSummary:
    store: StoreSummary
    shares: ShareSummary
    secret: bool
    """Whether ``secret.key`` is in it (a data directory whose relay never ran has none)."""

    def __str__(self) -> str:
        secret = "the secret" if self.secret else "no secret.key"
        return f"{self.store}; {self.shares}; {secret}"


def _check_tables(
    conn: sqlite3.Connection, path: Path, tables: dict[str, set[str]], what: str
) -> None:
    """ConfigError unless ``conn`` has ``tables`` and passes SQLite's quick check."""
    try:
        columns = {
            table: {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}
            for table in tables
        }
        missing = [t for t, cols in tables.items() if not cols <= columns[t]]
        if missing:
            raise ConfigError(f"{path} is not a {what} (no {' or '.join(missing)} table)")
        check = conn.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise ConfigError(f"{path} is a damaged {what}: {check[0] if check else '?'}")
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a {what} ({exc})") from exc


def _count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _summarize(conn: sqlite3.Connection, path: Path) -> StoreSummary:
    """The summary of a foliosync relay store; ConfigError if ``conn`` is not one."""
    _check_tables(conn, path, _STORE_TABLES, "foliosync relay store")
    return StoreSummary(_count(conn, "documents"), _count(conn, "updates"))


def _summarize_shares(conn: sqlite3.Connection, path: Path) -> ShareSummary:
    _check_tables(conn, path, _SHARE_TABLES, "foliosync share store")
    return ShareSummary(_count(conn, "shares"), _count(conn, "token_revocations"))


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
    with contextlib.closing(_connect(path, "ro")) as conn:
        return _summarize(conn, path)


def check_shares(path: Path) -> ShareSummary:
    """Whether ``path`` is a readable foliosync share store (ConfigError if not)."""
    with contextlib.closing(_connect(path, "ro")) as conn:
        return _summarize_shares(conn, path)


def _create_private(target: Path) -> None:
    """An empty file readable by its owner only (0600), whatever the umask: backups and
    restored files hold every user's documents, or the secret."""
    target.unlink(missing_ok=True)
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _copy(source: sqlite3.Connection, target: Path) -> None:
    """``source`` into a new file ``target``, in one step, self-contained and on disk."""
    _create_private(target)
    dest = sqlite3.connect(target)  # SQLite opens the empty file as an empty database
    try:
        source.backup(dest)  # pages=-1: the whole database in one step, from one snapshot
        dest.execute("PRAGMA journal_mode = DELETE")
        dest.commit()
    finally:
        dest.close()
    _fsync(target)


def _empty_shares(target: Path) -> None:
    """The share store of a relay that never ran with sharing: its tables, no rows."""
    _create_private(target)
    with contextlib.closing(sqlite3.connect(target)) as conn:
        conn.executescript(SQLITE_SCHEMA)
        conn.commit()
    _fsync(target)


def _read_secret(path: Path) -> str:
    """The secret in ``path``, checked as the relay checks it at start."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if len(secret) < 32:
        raise ConfigError(f"{path} holds no usable secret")
    return secret


def _write_secret(target: Path, secret: str) -> None:
    _create_private(target)
    with open(target, "w") as file:
        file.write(secret + "\n")
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform opens directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_backup(path: Path) -> bool:
    """Whether ``path`` is a directory this module wrote (and may therefore replace)."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == _FORMAT


def _check_target(data_dir: Path, target: Path) -> None:
    """ConfigError unless ``target`` is free, empty or an earlier backup: a backup replaces
    nothing else (a mistyped ``~`` would otherwise be swept away)."""
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write {target}: {target.parent} is not a directory")
    if not target.exists() and not target.is_symlink():
        return
    where = target.resolve()
    if where == (data_dir / STORE_FILE).resolve():
        raise ConfigError(f"{target} is the relay's store itself: back up to another place")
    if where == data_dir.resolve() or data_dir.resolve() in where.parents:
        raise ConfigError(f"{target} is in the relay's data directory: back up to another place")
    if target.is_symlink():
        raise ConfigError(f"{target} is a symbolic link: give the directory it names, or a new one")
    if target.is_dir():
        if _is_backup(target) or not any(target.iterdir()):
            return
        raise ConfigError(
            f"{target} exists and is not a backup made by `foliosync relay backup`: "
            "give a new directory, or remove that one"
        )
    try:
        older = target.is_file() and check_store(target) is not None
    except ConfigError:
        older = False
    if older:
        raise ConfigError(
            f"{target} is a backup of the older kind (relay.db alone); a backup is now a "
            "directory: give a new name, or remove that file"
        )
    raise ConfigError(f"{target} exists and is no directory: give a new name")


def _copy_store(
    path: Path, target: Path, summarize: Callable[[sqlite3.Connection, Path], _Summary]
) -> _Summary:
    """Snapshot the database ``path`` into ``target``; its summary, from the same connection."""
    source = _connect(path, "rw")  # rw: a WAL reader needs the shared-memory file
    try:
        summary = summarize(source, path)
        try:
            _copy(source, target)
        except sqlite3.Error as exc:
            raise RelayStoreError(f"backing up {path} failed: {exc}") from exc
        return summary
    finally:
        source.close()


def backup_store(data_dir: Path, target: Path) -> BackupSummary:
    """Back up ``data_dir`` into the directory ``target`` (an earlier backup there is replaced),
    relay running or not. Raises ConfigError for a missing store, a target that is something
    else, or a target that cannot be written; RelayStoreError if SQLite fails."""
    store = data_dir / STORE_FILE
    if not store.exists():
        raise ConfigError(f"no relay store in {data_dir} (no {STORE_FILE}): nothing to back up")
    _check_target(data_dir, target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    replaced = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(mode=0o700)
        stored = _copy_store(store, partial / STORE_FILE, _summarize)
        if (data_dir / SHARES_FILE).exists():
            shares = _copy_store(data_dir / SHARES_FILE, partial / SHARES_FILE, _summarize_shares)
        else:  # a relay from before sharing, never started since: it has none
            _empty_shares(partial / SHARES_FILE)
            shares = ShareSummary(0, 0)
        secret_file = data_dir / SECRET_FILE
        has_secret = secret_file.exists()
        if has_secret:
            _write_secret(partial / SECRET_FILE, _read_secret(secret_file))
        summary = BackupSummary(stored, shares, has_secret)
        manifest = {
            "format": _FORMAT,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": str(data_dir.resolve()),
            STORE_FILE: {"documents": stored.documents, "updates": stored.updates},
            SHARES_FILE: {"shares": shares.shares, "revocations": shares.revocations},
            SECRET_FILE: has_secret,
        }
        _create_private(partial / MANIFEST_FILE)
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(partial / MANIFEST_FILE)
        _fsync_dir(partial)
        if target.exists():  # an earlier backup, or an empty directory (checked above)
            os.replace(target, replaced)
        os.replace(partial, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        if replaced.exists() and not target.exists():
            os.replace(replaced, target)  # put the earlier backup back
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    return summary


@dataclass(frozen=True, slots=True)
class Restored:
    summary: StoreSummary
    previous: Path | None
    """Where the replaced ``relay.db`` was put, if there was one."""
    shares: ShareSummary | None = None
    """What the restored ``shares.db`` holds; None: the backup held none (the data directory's
    own was left as it is)."""
    secret: bool = False
    """Whether ``secret.key`` came from the backup."""
    kept_aside: tuple[Path, ...] = ()
    """Every file the restore replaced, where it is now."""
    carried_revocations: int = 0
    """Revocations of the replaced ``shares.db`` the backup lacked, carried into the restored
    one."""
    warnings: tuple[str, ...] = ()
    """What the operator must know or do, in words."""


@dataclass(frozen=True, slots=True)
class _Backup:
    """A backup read and checked, before anything of the data directory is touched."""

    store: Path
    summary: StoreSummary
    shares: Path | None
    share_summary: ShareSummary | None
    secret: str | None


def _open_backup(backup: Path) -> _Backup:
    if backup.is_dir():
        store = backup / STORE_FILE
        if not store.exists():
            raise ConfigError(
                f"{backup} holds no {STORE_FILE}: not a backup made by `foliosync relay backup`"
            )
        shares = backup / SHARES_FILE
        secret = backup / SECRET_FILE
        return _Backup(
            store,
            check_store(store),
            shares if shares.exists() else None,
            check_shares(shares) if shares.exists() else None,
            _read_secret(secret) if secret.exists() else None,
        )
    return _Backup(backup, check_store(backup), None, None, None)  # relay.db alone


def _revocations(path: Path) -> set[tuple[int, str, str, str]]:
    with contextlib.closing(_connect(path, "rw")) as conn:  # rw: its WAL, if a relay left one
        rows = conn.execute("SELECT revoked_at, user, device, jti FROM token_revocations")
        return {(int(a), str(u), str(d), str(j)) for a, u, d, j in rows}


def _carry_revocations(replaced: Path, incoming: Path, warnings: list[str]) -> int:
    """Add to ``incoming`` the revocations of ``replaced`` it lacks; how many."""
    try:
        current = _revocations(replaced)
    except (ConfigError, sqlite3.Error) as exc:
        warnings.append(
            f"the replaced {replaced.name} could not be read ({exc}): revocations recorded "
            "after the backup, if there were any, are not in the restored one; revoke those "
            "tokens again (foliosync token revoke)"
        )
        return 0
    with contextlib.closing(sqlite3.connect(incoming)) as conn:
        rows = conn.execute("SELECT revoked_at, user, device, jti FROM token_revocations")
        have = {(int(a), str(u), str(d), str(j)) for a, u, d, j in rows}
        missing = sorted(current - have)
        conn.executemany(
            "INSERT INTO token_revocations (revoked_at, user, device, jti) VALUES (?,?,?,?)",
            missing,
        )
        conn.commit()
    _fsync(incoming)
    return len(missing)


def _older_backup_warnings(data_dir: Path, backup: Path) -> list[str]:
    """What restoring a backup without ``shares.db`` leaves to the operator."""
    if backup.is_dir():
        lacking = f"{backup} holds no {SHARES_FILE}, so no shares and token revocations"
    else:
        lacking = (
            f"{backup} is a backup of {STORE_FILE} alone (from before backups held the shares): "
            "it holds no shares and token revocations"
        )
    shares = data_dir / SHARES_FILE
    if shares.exists():
        try:
            held = f" ({check_shares(shares)})"
        except ConfigError:
            held = ""
        return [f"{lacking}; {shares} is kept as it is{held}"]
    return [
        f"{lacking}, and {data_dir} has no {SHARES_FILE}: every share is gone, and so is every "
        "revocation: revoke the tokens of lost devices again (foliosync token revoke) and "
        "share again"
    ]


def _install(
    data_dir: Path, name: str, incoming: Path, stamp: str, kept: list[Path]
) -> Path | None:
    """Move ``data_dir/name`` (with its -wal and -shm) aside, ``incoming`` into its place.

    The -wal and -shm go aside even without the file: SQLite would replay a WAL left beside the
    restored file into it (a killed relay's, whose file was deleted by hand), undoing the
    restore."""
    current = data_dir / name
    aside = data_dir / f"{name}.before-restore-{stamp}"
    previous = aside if current.exists() else None
    for suffix in ("-wal", "-shm", ""):
        old = data_dir / f"{name}{suffix}"
        if old.exists():
            moved = aside.with_name(aside.name + suffix)
            os.replace(old, moved)
            if not suffix:
                kept.append(moved)
    os.replace(incoming, current)
    return previous


def _same_secret(path: Path, secret: str) -> bool:
    try:
        return path.read_text().strip() == secret
    except (OSError, UnicodeDecodeError):
        return False


def restore_store(data_dir: Path, backup: Path) -> Restored:
    """Put the backup ``backup`` (a directory, or an older backup's ``relay.db`` file) in place
    in ``data_dir``; every file it replaces is kept aside.

    Refused (DataDirLocked) while a relay runs on ``data_dir``; ConfigError if ``backup`` is not
    a foliosync backup. Nothing is replaced unless every copy is complete."""
    if backup.resolve() == data_dir.resolve():
        raise ConfigError(f"{backup} is the data directory itself: restore from a backup")
    found = _open_backup(backup)
    lock = DataDirLock(data_dir, "restore")
    try:
        lock.acquire()
    except DataDirLocked as exc:
        raise DataDirLocked(f"{exc}: stop it, then restore") from None
    warnings: list[str] = []
    kept: list[Path] = []
    with lock:
        tag = f"restoring-{os.getpid()}"
        incoming = {
            name: data_dir / f".{name}.{tag}" for name in (STORE_FILE, SHARES_FILE, SECRET_FILE)
        }
        secret_file = data_dir / SECRET_FILE
        new_secret = found.secret
        if new_secret is not None and _same_secret(secret_file, new_secret):
            new_secret = None  # nothing to replace
        carried = 0
        try:
            for name, source_path in ((STORE_FILE, found.store), (SHARES_FILE, found.shares)):
                if source_path is not None:
                    with contextlib.closing(_connect(source_path, "ro")) as source:
                        _copy(source, incoming[name])
            if found.shares is not None and (data_dir / SHARES_FILE).exists():
                carried = _carry_revocations(
                    data_dir / SHARES_FILE, incoming[SHARES_FILE], warnings
                )
            if new_secret is not None:
                _write_secret(incoming[SECRET_FILE], new_secret)
        except (sqlite3.Error, OSError) as exc:
            for path in incoming.values():
                path.unlink(missing_ok=True)
            if isinstance(exc, sqlite3.Error):
                raise RelayStoreError(f"copying {backup} failed: {exc}") from exc
            raise ConfigError(f"cannot write into {data_dir}: {exc.strerror or exc}") from exc
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        previous = _install(data_dir, STORE_FILE, incoming[STORE_FILE], stamp, kept)
        if found.shares is not None:
            _install(data_dir, SHARES_FILE, incoming[SHARES_FILE], stamp, kept)
        replaced_secret = new_secret is not None and _install(
            data_dir, SECRET_FILE, incoming[SECRET_FILE], stamp, kept
        )
        if replaced_secret:
            warnings.append(
                f"{SECRET_FILE} was replaced by the backup's: tokens signed with the one it "
                f"replaced (kept as {kept[-1]}) are refused from now on"
            )
        _fsync_dir(data_dir)
    if found.shares is None:
        warnings += _older_backup_warnings(data_dir, backup)
    if found.secret is None and not secret_file.exists():
        warnings.append(
            f"{backup} holds no {SECRET_FILE}, and {data_dir} has none: copy the backed-up "
            "relay's there before starting it, or it makes a new one and refuses every token "
            "issued before"
        )
    return Restored(
        summary=found.summary,
        previous=previous,
        shares=None
        if found.share_summary is None
        else ShareSummary(found.share_summary.shares, found.share_summary.revocations + carried),
        secret=found.secret is not None,
        kept_aside=tuple(kept),
        carried_revocations=carried,
        warnings=tuple(warnings),
    )
