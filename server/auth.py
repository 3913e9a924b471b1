"""Signed connection tokens: who is connecting, from which device, allowed to do what.

Tokens are JWTs (HS256, via PyJWT) signed with the relay's secret, which the relay generates in
its data directory on first start. A token names its user (``sub``), optionally its device
(``dev``), its scopes (``scope``: "sync" for devices, "publish" for price publishers, "admin"
for operators: ``GET /metrics`` and revocations) and its id (``jti``, derived from the other
claims), by which one token can be revoked. The relay checks a token before it touches any
document, and asks its revocations (``foliosync.server.sharing``) whether the token still
counts; every failure is an :class:`AuthError` with a message that says what was wrong, never
which part of the secret was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from foliosync.sync.errors import AuthError, ConfigError

__all__ = [
    "DEFAULT_TTL_SECONDS",
    "SECRET_FILE",
    "Identity",
    "issue_token",
    "load_or_create_secret",
    "parse_duration",
    "verify_token",
]

ISSUER = "foliosync"
DEFAULT_TTL_SECONDS = 30 * 24 * 3600
SCOPES = frozenset({"sync", "publish", "admin"})
_ALGORITHM = "HS256"
_USER = re.compile(r"\A[A-Za-z0-9_.@+\-]{1,128}\Z")  # \Z: "$" would let a final "\n" in
SECRET_FILE = "secret.key"
"""The signing secret's file in the data directory."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    device: str
    scopes: frozenset[str]
    # Not compared: two tokens of one user and device are the same principal.
    token_id: str = field(default="", compare=False)
    """The token's ``jti`` ("" for tokens issued before tokens had one, and for identities
    that come from no token)."""
    issued_at: int = field(default=0, compare=False)
    """The token's ``iat``: a device revoked at time T refuses its tokens issued until T."""


def load_or_create_secret(data_dir: Path) -> bytes:
    """The relay's signing secret, created (mode 0600) on first start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRET_FILE
    if path.exists():
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise ConfigError(f"{path} holds no usable secret; remove it to generate a new one")
        return secret.encode()
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
        file.flush()
        os.fsync(file.fileno())
    return secret.encode()


def issue_token(
    secret: bytes,
    user: str,
    *,
    device: str | None = None,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    scopes: frozenset[str] = frozenset({"sync"}),
    now: float | None = None,
) -> str:
    if not _USER.match(user):
        raise ConfigError(f"invalid user name {user!r}: letters, digits and _.@+- only")
    if device is not None and not _USER.match(device):
        raise ConfigError(f"invalid device name {device!r}: letters, digits and _.@+- only")
    if ttl_seconds <= 0:
        raise ConfigError("a token's lifetime must be positive")
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ConfigError(f"unknown scope(s): {', '.join(sorted(unknown))}")
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "sub": user,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "scope": sorted(scopes),
    }
    if device:
        claims["dev"] = device
    claims["jti"] = _token_id(claims)
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def _token_id(claims: dict[str, object]) -> str:
    """The ``jti``: derived from the other claims, so that a token is one string whatever
    issues it (two tokens of the same claims are the same token, and revoked together)."""
    text = json.dumps(claims, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def verify_token(secret: bytes, token: object, *, now: float | None = None) -> Identity:
    if not isinstance(token, str) or not token:
        raise AuthError("no token given")
    if len(token) > 4096:
        raise AuthError("token too long")
    options: Any = {"require": ["exp", "iat", "sub", "iss"]}
    try:
        claims = (
            jwt.decode(
                token,
                secret,
                algorithms=[_ALGORITHM],
                issuer=ISSUER,
                options=options,
                leeway=0,
            )
            if now is None
            else _decode_at(token, secret, now)
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("token signature is invalid") from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"token rejected: {exc}") from None
    user = claims.get("sub")
    if not isinstance(user, str) or not _USER.match(user):
        raise AuthError("token names no valid user")
    device = claims.get("dev")
    scope = claims.get("scope", ["sync"])
    if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
        raise AuthError("token scopes are malformed")
    jti = claims.get("jti", "")
    issued = claims.get("iat")
    return Identity(
        user=user,
        device=device if isinstance(device, str) and _USER.match(device) else "",
        scopes=_scope_set(scope),
        token_id=jti if isinstance(jti, str) and _USER.match(jti) else "",
        issued_at=issued if isinstance(issued, int) and not isinstance(issued, bool) else 0,
    )


_SCOPE_SETS: dict[frozenset[str], frozenset[str]] = {}


def _scope_set(scope: list[str]) -> frozenset[str]:
    """The known scopes among ``scope``, as one shared set per combination (at most eight): a
    relay keeps an identity per connection, and a set of its own was 216 bytes of each."""
    known = frozenset(scope) & SCOPES
    return _SCOPE_SETS.setdefault(known, known)


def _decode_at(token: str, secret: bytes, now: float) -> dict[str, object]:
    """Decode as if the time were ``now`` (tests of expiry without waiting)."""
    claims: dict[str, object] = jwt.decode(
        token,
        secret,
        algorithms=[_ALGORITHM],
        issuer=ISSUER,
        options={"require": ["exp", "iat", "sub", "iss"], "verify_exp": False},
    )
    exp = claims.get("exp")
    if not isinstance(exp, int) or exp <= now:
        raise jwt.ExpiredSignatureError("expired")
    return claims


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """Seconds in '90', '90s', '15m', '12h', '30d' or '2w'."""
    match = _DURATION.match(text.lower())
    if not match or int(match.group(1)) == 0:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 90s, 15m, 12h, 30d")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
