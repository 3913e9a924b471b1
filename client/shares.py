"""What a device knows of shared documents: whose they are, read-only or not, revoked or not.

A document another user shares has the id ``OWNER/id`` on this device as on the relay; it is
not written into this user's index (the index is the user's own document, and the relay's
Welcome lists the shared ids on every connection). What the relay says of it is kept in the
replica's settings under ``share:OWNER/id``: ``read`` (read-only), ``write``, or ``revoked``
(the owner ended the share: the device stops syncing it and keeps its last copy, read-only).

The sharing commands talk to the relay's HTTP API (``/v1/shares``, ``/v1/revocations``) on
the host and port of its WebSocket URL.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from foliosync.client.replica import Replica
from foliosync.sync.errors import AccessDenied, AuthError, ConfigError, ConnectionLost
from foliosync.sync.model.document import split_owner

__all__ = [
    "READ_ONLY",
    "REVOKED",
    "SHARED",
    "SHARE_META_PREFIX",
    "call_relay",
    "http_base",
    "mark_share",
    "owner_label",
    "remember_shares",
    "share_state",
]

SHARE_META_PREFIX = "share:"
# The relay's codes (foliosync.server.sharing; PROTOCOL.md, Sharing).
READ_ONLY = "read_only"
REVOKED = "revoked"
SHARED = "shared"


def share_state(replica: Replica, doc_id: str) -> str | None:
    """``read``, ``write``, ``revoked``, or None (one's own document, or not known yet)."""
    return replica.meta.get(SHARE_META_PREFIX + doc_id)


async def mark_share(replica: Replica, doc_id: str, state: str) -> None:
    await replica.set_meta(**{SHARE_META_PREFIX + doc_id: state})


def owner_label(replica: Replica, doc_id: str) -> str:
    """`` (alice, read-only)`` for a shared document, "" for one's own: what lists append."""
    owner, _local = split_owner(doc_id)
    if owner is None:
        return ""
    state = share_state(replica, doc_id)
    detail = {"read": ", read-only", "revoked": ", revoked"}.get(state or "", "")
    return f" ({owner}{detail})"


async def remember_shares(replica: Replica, shared_with_me: list[dict[str, Any]]) -> None:
    """Record what the relay listed as shared with this user; local shared copies it no longer
    lists are marked revoked."""
    listed = {str(s.get("id")): str(s.get("access")) for s in shared_with_me}
    for doc_id, access in listed.items():
        if share_state(replica, doc_id) != access:
            await mark_share(replica, doc_id, access)
    for doc_id in replica.document_ids():
        shared = split_owner(doc_id)[0] is not None
        if shared and doc_id not in listed and share_state(replica, doc_id) != "revoked":
            await mark_share(replica, doc_id, "revoked")


def http_base(server: str) -> str:
    """``ws://host:port/ws`` → ``http://host:port`` (``wss`` → ``https``)."""
    parts = urlsplit(server)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ConfigError(f"not a relay URL: {server!r} (e.g. ws://127.0.0.1:8765/ws)")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


async def call_relay(
    server: str, token: str, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One request to the relay's HTTP API; its JSON answer, or the relay's refusal raised as
    AuthError (401), AccessDenied (403), ConfigError (other 4xx) or ConnectionLost."""
    url = http_base(server) + path
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.request(method, url, headers=headers, json=body) as response,
        ):
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ConnectionLost(f"cannot reach the relay at {url}: {exc}") from exc
    try:
        payload = json.loads(text)
    except ValueError:
        payload = {"error": text[:200]}
    if status < 400:
        return payload
    message = payload.get("error", "") if isinstance(payload, dict) else str(payload)
    if status == 401:
        raise AuthError(f"the relay refused the token: {message}")
    if status == 403:
        raise AccessDenied(message)
    if status >= 500:
        raise ConnectionLost(f"the relay failed ({status}): {message}")
    raise ConfigError(message)
