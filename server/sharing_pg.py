"""Shares and token revocations in PostgreSQL (asyncpg), for relays that share one database.

The same DSN as ``--store postgresql://...`` serves: the tables are ``foliosync_shares`` and
``foliosync_token_revocations``, created on open. Unlike the SQLite adapter, nothing is kept in
memory: every question (``access`` on each SyncRequest and Update, ``token_revoked`` on each
authentication) reads the database, so that a share ended or a token revoked through one relay
counts at the next frame on all of them. The connections the other relays hold open are told at
once by a control event on the fan-out (``foliosync.server.fanout``), published once the row is
committed here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from foliosync.server.sharing import (
    Revocation,
    Share,
    ShareAccess,
    check_grant,
    check_revocation,
)
from foliosync.sync.errors import ConfigError, RelayStoreError

__all__ = ["PostgresShareStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS foliosync_shares (
    owner TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    grantee TEXT NOT NULL,
    access TEXT NOT NULL CHECK (access IN ('read', 'write')),
    granted_at BIGINT NOT NULL,
    PRIMARY KEY (owner, doc_id, grantee)
);
CREATE INDEX IF NOT EXISTS foliosync_shares_grantee ON foliosync_shares (grantee);
CREATE TABLE IF NOT EXISTS foliosync_token_revocations (
    id BIGSERIAL PRIMARY KEY,
    revoked_at BIGINT NOT NULL,
    "user" TEXT NOT NULL,
    device TEXT NOT NULL,
    jti TEXT NOT NULL
);
"""

_FOREIGN = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)
_COLUMNS = "owner, doc_id, grantee, access, granted_at"


def _share(row: Any) -> Share:
    return Share(row["owner"], row["doc_id"], row["grantee"], row["access"], row["granted_at"])


class PostgresShareStore:
    """A :class:`~foliosync.server.sharing.ShareStore` over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._closed = False

    @classmethod
    async def open(cls, dsn: str, *, timeout: float = 10.0) -> PostgresShareStore:
        try:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=5, timeout=timeout)
        except ValueError as exc:
            raise ConfigError(f"bad PostgreSQL address: {exc}") from exc
        except _FOREIGN as exc:
            raise RelayStoreError(f"cannot open the share store: {exc}") from exc
        store = cls(pool)
        try:
            # Relays of a group start together: CREATE TABLE IF NOT EXISTS alone races on the
            # catalog (a unique violation in pg_type), so they take turns on an advisory lock.
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('foliosync_shares'))")
                await conn.execute(_SCHEMA)
        except _FOREIGN as exc:
            await pool.close()
            raise RelayStoreError(f"cannot create the share tables: {exc}") from exc
        return store

    async def _run(self, method: str, sql: str, *args: object) -> Any:
        if self._closed:
            raise RelayStoreError("the share store is closed")
        try:
            async with self._pool.acquire() as conn:
                return await getattr(conn, method)(sql, *args)
        except _FOREIGN as exc:
            raise RelayStoreError(f"the share store failed: {exc}") from exc

    async def grant(self, owner: str, doc_id: str, grantee: str, access: ShareAccess) -> Share:
        checked = check_grant(owner, doc_id, grantee, access)
        row = await self._run(
            "fetchrow",
            f"INSERT INTO foliosync_shares ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (owner, doc_id, grantee) DO UPDATE SET access = EXCLUDED.access, "
            f"granted_at = EXCLUDED.granted_at RETURNING {_COLUMNS}",
            owner,
            doc_id,
            grantee,
            checked,
            int(time.time()),
        )
        return _share(row)

    async def revoke(self, owner: str, doc_id: str, grantee: str) -> bool:
        status = await self._run(
            "execute",
            "DELETE FROM foliosync_shares WHERE owner = $1 AND doc_id = $2 AND grantee = $3",
            owner,
            doc_id,
            grantee,
        )
        return bool(status != "DELETE 0")

    async def by_owner(self, owner: str) -> list[Share]:
        rows = await self._run(
            "fetch",
            f"SELECT {_COLUMNS} FROM foliosync_shares WHERE owner = $1 ORDER BY doc_id, grantee",
            owner,
        )
        return [_share(r) for r in rows]

    async def by_grantee(self, grantee: str) -> list[Share]:
        rows = await self._run(
            "fetch",
            f"SELECT {_COLUMNS} FROM foliosync_shares WHERE grantee = $1 ORDER BY owner, doc_id",
            grantee,
        )
        return [_share(r) for r in rows]

    async def access(self, owner: str, doc_id: str, user: str) -> ShareAccess | None:
        value = await self._run(
            "fetchval",
            "SELECT access FROM foliosync_shares WHERE owner = $1 AND doc_id = $2 AND grantee = $3",
            owner,
            doc_id,
            user,
        )
        if value is None:
            return None
        return "read" if value == "read" else "write"

    async def revoke_tokens(self, revocation: Revocation) -> None:
        check_revocation(revocation)
        await self._run(
            "execute",
            'INSERT INTO foliosync_token_revocations (revoked_at, "user", device, jti) '
            "VALUES ($1, $2, $3, $4)",
            revocation.revoked_at,
            revocation.user,
            revocation.device,
            revocation.jti,
        )

    async def revocations(self) -> list[Revocation]:
        rows = await self._run(
            "fetch",
            'SELECT revoked_at, "user", device, jti FROM foliosync_token_revocations ORDER BY id',
        )
        return [Revocation(r["revoked_at"], r["user"], r["device"], r["jti"]) for r in rows]

    async def token_revoked(self, user: str, device: str, jti: str, issued_at: int) -> bool:
        found = await self._run(
            "fetchval",
            "SELECT EXISTS (SELECT 1 FROM foliosync_token_revocations WHERE "
            "(jti <> '' AND jti = $3) OR (jti = '' AND device <> '' AND device = $2 "
            'AND ("user" = \'\' OR "user" = $1) AND $4 <= revoked_at))',
            user,
            device,
            jti,
            issued_at,
        )
        return bool(found)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._pool.close()
        except _FOREIGN as exc:
            raise RelayStoreError(f"closing the share store failed: {exc}") from exc
