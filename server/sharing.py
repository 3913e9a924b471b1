"""Sharing: who else may read or write a user's document, and which tokens no longer count.

Share records and revocations are the relay's own state, not CRDT content: a grantee must not be
able to grant itself anything by editing a document. They sit behind a small port,
:class:`ShareStore`, with a SQLite adapter (``shares.db`` in the relay's data directory, beside
``relay.db``) and a memory one; ``foliosync.server.sharing_pg`` holds the PostgreSQL one. Every
adapter runs ``foliosync.testing.share_contract``.

A document alice shares is addressed by the others as ``alice/wl-...``; she keeps its plain id.
:class:`SharingAuthorization` (the default authorization extension) decides, per frame:

- the owner: read and write; a read-write grantee: read and write;
- a read-only grantee: read; its Updates get ``read_only`` (the device rolls the edit back);
- anyone else: ``forbidden``; and the owner naming her own document as ``alice/...``:
  ``not_found`` (the owner's id is the plain one).

Revocations name a device of a user (every token issued for it until the revocation stops
working: a lost laptop) or one token by its ``jti``. :class:`TokenAuthentication` in
``foliosync.server.extensions`` asks :meth:`ShareStore.token_revoked` for every token it accepts,
so a revoked token is refused on ``/ws`` and on every HTTP route alike.

The adapters keep every record in memory as well (share lists are small and asked on every
frame), writing through to their database before a change is reported done.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import aiosqlite

from foliosync._sqlite import connect as sqlite_connect
from foliosync.sync.errors import AccessDenied, RelayStoreError, ValidationError
from foliosync.sync.model import INDEX_DOCUMENT_ID, kind_of
from foliosync.sync.model.document import split_owner

__all__ = [
    "READ_ONLY",
    "REVOKED",
    "SHARED",
    "SQLITE_SCHEMA",
    "MemoryShareStore",
    "Revocation",
    "SQLiteShareStore",
    "Share",
    "ShareAccess",
    "ShareStore",
    "check_grant",
    "check_revocation",
    "owner_and_id",
    "shared_id",
    "sharing_access",
]

READ_ONLY = "read_only"
"""The Error code of an Update of a document shared read-only with its sender."""
REVOKED = "revoked"
"""The Error code telling a connection that a share it synced on was revoked."""
SHARED = "shared"
"""The code of the notice telling a grantee's open connections that a document was shared."""

ShareAccess = Literal["read", "write"]
_ACCESSES = ("read", "write")
_USER = re.compile(r"\A[A-Za-z0-9_.@+\-]{1,128}\Z")  # a token's user (foliosync.server.auth)


@dataclass(frozen=True, slots=True)
class Share:
    """``owner`` lets ``grantee`` read (or also write) her document ``doc_id`` (her plain id)."""

    owner: str
    doc_id: str
    grantee: str
    access: ShareAccess
    granted_at: int
    """Seconds since the epoch."""

    @property
    def shared_id(self) -> str:
        """The id the grantee uses: ``owner/doc_id``."""
        return shared_id(self.owner, self.doc_id)

    def to_json(self) -> dict[str, object]:
        return {
            "owner": self.owner,
            "doc": self.doc_id,
            "id": self.shared_id,
            "user": self.grantee,
            "access": self.access,
            "granted_at": self.granted_at,
        }


@dataclass(frozen=True, slots=True)
class Revocation:
    """Tokens that stop working: those of ``user``'s ``device`` issued at or before
    ``revoked_at`` (``user`` "": that device name of every user), or the one token ``jti``."""

    revoked_at: int
    user: str = ""
    device: str = ""
    jti: str = ""

    def covers(self, user: str, device: str, jti: str, issued_at: int) -> bool:
        if self.jti:
            return jti == self.jti
        return (
            bool(device)
            and device == self.device
            and (not self.user or self.user == user)
            and issued_at <= self.revoked_at
        )


def shared_id(owner: str, doc_id: str) -> str:
    return f"{owner}/{doc_id}"


def check_grant(owner: str, doc_id: str, grantee: str, access: str) -> ShareAccess:
    """The checks of every adapter's :meth:`ShareStore.grant`: ValidationError names what is
    wrong (the HTTP route answers 400 with it)."""
    if not isinstance(doc_id, str) or "/" in doc_id or doc_id == INDEX_DOCUMENT_ID:
        raise ValidationError(f"not a document one can share: {str(doc_id)[:60]!r}")
    kind_of(doc_id)
    for who in (owner, grantee):
        if not isinstance(who, str) or not _USER.match(who):
            raise ValidationError(f"invalid user name {str(who)[:60]!r}")
    if owner == grantee:
        raise ValidationError("a user cannot share a document with themselves")
    if access not in _ACCESSES:
        raise ValidationError(f"invalid access {access!r}: read or write")
    return "read" if access == "read" else "write"


class ShareStore(Protocol):
    """Where the relay keeps shares and token revocations. Every method raises
    :class:`RelayStoreError` if the store fails, ValidationError for bad arguments."""

    async def grant(self, owner: str, doc_id: str, grantee: str, access: ShareAccess) -> Share:
        """Share (or change the access of a share); returns the share as stored."""
        ...

    async def revoke(self, owner: str, doc_id: str, grantee: str) -> bool:
        """End a share; False if there was none."""
        ...

    async def by_owner(self, owner: str) -> list[Share]:
        """What ``owner`` shares, sorted by document then grantee."""
        ...

    async def by_grantee(self, grantee: str) -> list[Share]:
        """What is shared with ``grantee``, sorted by owner then document."""
        ...

    async def access(self, owner: str, doc_id: str, user: str) -> ShareAccess | None:
        """What ``user`` may do with ``owner``'s ``doc_id`` by a share (None: no share)."""
        ...

    async def revoke_tokens(self, revocation: Revocation) -> None:
        """Record a revocation, for good."""
        ...

    async def revocations(self) -> list[Revocation]:
        """Every revocation recorded, oldest first."""
        ...

    async def token_revoked(self, user: str, device: str, jti: str, issued_at: int) -> bool:
        """Whether a token of these claims is revoked."""
        ...

    async def close(self) -> None: ...


class MemoryShareStore:
    """Shares in a dict: for tests and for relays whose shares need not outlive them."""

    def __init__(self) -> None:
        self._shares: dict[tuple[str, str, str], Share] = {}
        self._revocations: list[Revocation] = []
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RelayStoreError("the share store is closed")

    def _remember(self, share: Share) -> None:
        self._shares[(share.owner, share.doc_id, share.grantee)] = share

    def _forget(self, owner: str, doc_id: str, grantee: str) -> bool:
        return self._shares.pop((owner, doc_id, grantee), None) is not None

    async def grant(self, owner: str, doc_id: str, grantee: str, access: ShareAccess) -> Share:
        self._check_open()
        share = Share(owner, doc_id, grantee, check_grant(owner, doc_id, grantee, access), _now())
        self._remember(share)
        return share

    async def revoke(self, owner: str, doc_id: str, grantee: str) -> bool:
        self._check_open()
        return self._forget(owner, doc_id, grantee)

    async def by_owner(self, owner: str) -> list[Share]:
        self._check_open()
        found = [s for s in self._shares.values() if s.owner == owner]
        return sorted(found, key=lambda s: (s.doc_id, s.grantee))

    async def by_grantee(self, grantee: str) -> list[Share]:
        self._check_open()
        found = [s for s in self._shares.values() if s.grantee == grantee]
        return sorted(found, key=lambda s: (s.owner, s.doc_id))

    async def access(self, owner: str, doc_id: str, user: str) -> ShareAccess | None:
        self._check_open()
        share = self._shares.get((owner, doc_id, user))
        return None if share is None else share.access

    async def revoke_tokens(self, revocation: Revocation) -> None:
        self._check_open()
        self._revocations.append(check_revocation(revocation))

    async def revocations(self) -> list[Revocation]:
        self._check_open()
        return list(self._revocations)

    async def token_revoked(self, user: str, device: str, jti: str, issued_at: int) -> bool:
        self._check_open()
        return any(r.covers(user, device, jti, issued_at) for r in self._revocations)

    async def close(self) -> None:
        self._closed = True


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS shares (
    owner TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    grantee TEXT NOT NULL,
    access TEXT NOT NULL CHECK (access IN ('read', 'write')),
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (owner, doc_id, grantee)
);
CREATE TABLE IF NOT EXISTS token_revocations (
    id INTEGER PRIMARY KEY,
    revoked_at INTEGER NOT NULL,
    user TEXT NOT NULL,
    device TEXT NOT NULL,
    jti TEXT NOT NULL
);
"""
"""The tables of ``shares.db``; ``foliosync relay backup`` writes them into an empty share store
when a data directory has none yet."""


class SQLiteShareStore(MemoryShareStore):
    """Shares and revocations in their own SQLite file (``shares.db`` in the data directory,
    under the relay's data-directory lock), read into memory at open."""

    def __init__(self, path: Path, conn: aiosqlite.Connection) -> None:
        super().__init__()
        self.path = path
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> SQLiteShareStore:
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await sqlite_connect(str(file), isolation_level=None)
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA busy_timeout = 5000")
            await conn.executescript(SQLITE_SCHEMA)
            store = cls(file, conn)
            async with conn.execute(
                "SELECT owner, doc_id, grantee, access, granted_at FROM shares"
            ) as cursor:
                for owner, doc_id, grantee, access, granted_at in await cursor.fetchall():
                    store._remember(Share(owner, doc_id, grantee, access, granted_at))
            async with conn.execute(
                "SELECT revoked_at, user, device, jti FROM token_revocations ORDER BY id"
            ) as cursor:
                for revoked_at, user, device, jti in await cursor.fetchall():
                    store._revocations.append(Revocation(revoked_at, user, device, jti))
        except sqlite3.Error as exc:
            raise RelayStoreError(f"cannot open the share store {file}: {exc}") from exc
        return store

    async def _write(self, sql: str, params: Iterable[object]) -> int:
        self._check_open()
        async with self._lock:
            try:
                cursor = await self._conn.execute(sql, tuple(params))
                await cursor.close()
                return cursor.rowcount
            except sqlite3.Error as exc:
                raise RelayStoreError(f"the share store failed: {exc}") from exc

    async def grant(self, owner: str, doc_id: str, grantee: str, access: ShareAccess) -> Share:
        self._check_open()
        share = Share(owner, doc_id, grantee, check_grant(owner, doc_id, grantee, access), _now())
        await self._write(
            "INSERT INTO shares (owner, doc_id, grantee, access, granted_at) VALUES (?,?,?,?,?) "
            "ON CONFLICT (owner, doc_id, grantee) DO UPDATE SET access = excluded.access, "
            "granted_at = excluded.granted_at",
            (owner, doc_id, grantee, share.access, share.granted_at),
        )
        self._remember(share)
        return share

    async def revoke(self, owner: str, doc_id: str, grantee: str) -> bool:
        self._check_open()
        await self._write(
            "DELETE FROM shares WHERE owner = ? AND doc_id = ? AND grantee = ?",
            (owner, doc_id, grantee),
        )
        return self._forget(owner, doc_id, grantee)

    async def revoke_tokens(self, revocation: Revocation) -> None:
        self._check_open()
        checked = check_revocation(revocation)
        await self._write(
            "INSERT INTO token_revocations (revoked_at, user, device, jti) VALUES (?,?,?,?)",
            (checked.revoked_at, checked.user, checked.device, checked.jti),
        )
        self._revocations.append(checked)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            try:
                await self._conn.close()
            except sqlite3.Error as exc:
                raise RelayStoreError(f"closing the share store failed: {exc}") from exc


def check_revocation(revocation: Revocation) -> Revocation:
    """The checks of every adapter's :meth:`ShareStore.revoke_tokens`."""
    if not isinstance(revocation, Revocation):
        raise ValidationError(f"not a Revocation: {revocation!r}")
    if bool(revocation.jti) == bool(revocation.device):
        raise ValidationError("a revocation names either a device or a token (jti)")
    for value in (revocation.user, revocation.device, revocation.jti):
        if value and not _USER.match(value):
            raise ValidationError(f"invalid name {value[:60]!r}")
    return revocation


def _now() -> int:
    return int(time.time())


def owner_and_id(user: str, doc_id: str) -> tuple[str, str]:
    """Whose document ``doc_id`` (as ``user`` names it) is, and its id there."""
    owner, local = split_owner(doc_id)
    return (user, local) if owner is None else (owner, local)


async def sharing_access(shares: ShareStore, user: str, doc_id: str, access: ShareAccess) -> None:
    """Whether ``user`` may ``access`` ``doc_id`` as they name it: None, or AccessDenied with
    the Error's code (see the module's documentation)."""
    owner, local = split_owner(doc_id)
    if owner is None:
        return
    if owner == user:
        raise AccessDenied(f"{doc_id}: your own documents have no owner prefix", "not_found")
    granted = await shares.access(owner, local, user)
    if granted is None:
        raise AccessDenied(f"{doc_id} belongs to another user")
    if access == "write" and granted == "read":
        raise AccessDenied(f"{owner} shares {local} with you read-only", READ_ONLY)
