"""The share store contract (:class:`~foliosync.server.sharing.ShareStore`) as a suite of checks.

Every share store foliosync ships runs it (memory, SQLite, PostgreSQL); one written for an app
runs it too. A check takes ``open_store``, an async factory: every call opens a store on the
*same* data (for a durable store, a reopen after a close), and the check closes every store it
opened. Checks pick their own users, so they may share data::

    import pytest
    from foliosync.testing.share_contract import share_checks

    @pytest.mark.parametrize("check", share_checks(durable=True), ids=str)
    async def test_my_share_store(check, tmp_path):
        await check.run(lambda: MyShareStore.open(tmp_path / "shares.db"))

A failed check raises AssertionError with what the store did wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from foliosync.server.sharing import Revocation, ShareStore
from foliosync.sync.errors import RelayStoreError, ValidationError
from foliosync.sync.model import DocumentKind, document_id

__all__ = ["SHARE_CHECKS", "OpenShareStore", "ShareCheck", "check_share_store", "share_checks"]

OpenShareStore = Callable[[], Awaitable[ShareStore]]
"""Opens one more store on the data under test."""

_TIMEOUT = 30.0
_TECH = document_id(DocumentKind.WATCHLIST, "Tech")
_MAIN = document_id(DocumentKind.PORTFOLIO, "Main")


@dataclass(frozen=True, slots=True)
class ShareCheck:
    name: str
    check: Callable[[OpenShareStore], Awaitable[None]]
    durable: bool = False

    def __str__(self) -> str:
        return self.name

    async def run(self, open_store: OpenShareStore) -> None:
        async with asyncio.timeout(_TIMEOUT):
            await self.check(open_store)


@contextlib.asynccontextmanager
async def _opened(open_store: OpenShareStore) -> AsyncIterator[ShareStore]:
    store = await open_store()
    try:
        yield store
    finally:
        await store.close()


def _users(*names: str) -> list[str]:
    tag = secrets.token_hex(4)
    return [f"{name}-{tag}" for name in names]


async def _grant_and_list(open_store: OpenShareStore) -> None:
    alice, bob, carol = _users("alice", "bob", "carol")
    async with _opened(open_store) as store:
        share = await store.grant(alice, _TECH, bob, "read")
        assert (share.owner, share.doc_id, share.grantee, share.access) == (
            alice,
            _TECH,
            bob,
            "read",
        ), share
        assert share.shared_id == f"{alice}/{_TECH}"
        await store.grant(alice, _MAIN, bob, "write")
        await store.grant(alice, _TECH, carol, "write")
        assert [(s.doc_id, s.grantee) for s in await store.by_owner(alice)] == sorted(
            [(_MAIN, bob), (_TECH, bob), (_TECH, carol)]
        )
        assert [(s.owner, s.doc_id) for s in await store.by_grantee(bob)] == sorted(
            [(alice, _MAIN), (alice, _TECH)]
        )
        assert await store.access(alice, _TECH, bob) == "read"
        assert await store.access(alice, _MAIN, bob) == "write"
        assert await store.access(alice, _MAIN, carol) is None
        assert await store.access(bob, _TECH, alice) is None, "a share goes one way"
        assert await store.by_owner(bob) == []


async def _regrant_changes_access(open_store: OpenShareStore) -> None:
    alice, bob = _users("alice", "bob")
    async with _opened(open_store) as store:
        await store.grant(alice, _TECH, bob, "write")
        await store.grant(alice, _TECH, bob, "read")
        assert await store.access(alice, _TECH, bob) == "read"
        assert len(await store.by_grantee(bob)) == 1


async def _revoke(open_store: OpenShareStore) -> None:
    alice, bob = _users("alice", "bob")
    async with _opened(open_store) as store:
        await store.grant(alice, _TECH, bob, "write")
        assert await store.revoke(alice, _TECH, bob) is True
        assert await store.revoke(alice, _TECH, bob) is False, "a second revoke finds none"
        assert await store.access(alice, _TECH, bob) is None
        assert await store.by_grantee(bob) == [] and await store.by_owner(alice) == []


async def _bad_grants_are_refused(open_store: OpenShareStore) -> None:
    alice, bob = _users("alice", "bob")
    async with _opened(open_store) as store:
        for owner, doc, grantee, access in (
            (alice, "index", bob, "read"),
            (alice, "wl-nothex", bob, "read"),
            (alice, f"{bob}/{_TECH}", bob, "read"),
            (alice, _TECH, alice, "read"),
            (alice, _TECH, "bad user", "read"),
            (alice, _TECH, bob, "admin"),
        ):
            try:
                await store.grant(owner, doc, grantee, access)  # type: ignore[arg-type]
            except ValidationError:
                continue
            raise AssertionError(f"grant({doc!r}, {grantee!r}, {access!r}) was accepted")
        assert await store.by_owner(alice) == []


async def _token_revocations(open_store: OpenShareStore) -> None:
    alice, bob = _users("alice", "bob")
    async with _opened(open_store) as store:
        await store.revoke_tokens(Revocation(1000, user=alice, device="laptop"))
        await store.revoke_tokens(Revocation(1000, jti="abc123"))
        assert await store.token_revoked(alice, "laptop", "x", 999)
        assert await store.token_revoked(alice, "laptop", "x", 1000)
        assert not await store.token_revoked(alice, "laptop", "x", 1001), "issued after it"
        assert not await store.token_revoked(alice, "phone", "x", 999)
        assert not await store.token_revoked(bob, "laptop", "x", 999), "another user's laptop"
        assert await store.token_revoked(bob, "tablet", "abc123", 5000)
        assert len(await store.revocations()) == 2
        try:
            await store.revoke_tokens(Revocation(1000))
        except ValidationError:
            pass
        else:
            raise AssertionError("a revocation naming nothing was accepted")


async def _survives_reopen(open_store: OpenShareStore) -> None:
    alice, bob = _users("alice", "bob")
    async with _opened(open_store) as store:
        await store.grant(alice, _TECH, bob, "read")
        await store.revoke_tokens(Revocation(2000, user=bob, device="lost"))
    async with _opened(open_store) as store:
        assert await store.access(alice, _TECH, bob) == "read"
        assert await store.token_revoked(bob, "lost", "", 1999)


async def _closed_store_refuses(open_store: OpenShareStore) -> None:
    alice, bob = _users("alice", "bob")
    store = await open_store()
    await store.close()
    try:
        await store.grant(alice, _TECH, bob, "read")
    except RelayStoreError:
        return
    raise AssertionError("a closed store accepted a grant")


SHARE_CHECKS: tuple[ShareCheck, ...] = (
    ShareCheck("grant_and_list", _grant_and_list),
    ShareCheck("regrant_changes_access", _regrant_changes_access),
    ShareCheck("revoke", _revoke),
    ShareCheck("bad_grants_are_refused", _bad_grants_are_refused),
    ShareCheck("token_revocations", _token_revocations),
    ShareCheck("closed_store_refuses", _closed_store_refuses),
    ShareCheck("survives_reopen", _survives_reopen, durable=True),
)


def share_checks(*, durable: bool) -> list[ShareCheck]:
    return [c for c in SHARE_CHECKS if durable or not c.durable]


async def check_share_store(open_store: OpenShareStore, *, durable: bool) -> None:
    for check in share_checks(durable=durable):
        await check.run(open_store)
