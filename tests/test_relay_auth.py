"""Connection tokens: issue and verify, every way a token can be wrong, durations, the secret."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import jwt
import pytest

from foliosync.server.auth import (
    Identity,
    issue_token,
    load_or_create_secret,
    parse_duration,
    verify_token,
)
from foliosync.sync.errors import AuthError, ConfigError

SECRET = b"s" * 64
OTHER_SECRET = b"o" * 64


def test_issue_and_verify_round_trip() -> None:
    token = issue_token(SECRET, "alice", device="d1", scopes=frozenset({"sync", "publish"}))
    assert verify_token(SECRET, token) == Identity(
        user="alice", device="d1", scopes=frozenset({"sync", "publish"})
    )


def test_defaults_are_sync_scope_and_no_device() -> None:
    identity = verify_token(SECRET, issue_token(SECRET, "bob.smith@example.com"))
    assert identity == Identity("bob.smith@example.com", "", frozenset({"sync"}))


def test_a_token_signed_with_another_secret_is_refused() -> None:
    forged = issue_token(OTHER_SECRET, "alice", device="d1")
    with pytest.raises(AuthError, match="signature"):
        verify_token(SECRET, forged)


def test_a_token_with_a_forged_payload_is_refused() -> None:
    header, _payload, signature = issue_token(SECRET, "alice").split(".")
    _, other_payload, _ = issue_token(SECRET, "mallory").split(".")
    with pytest.raises(AuthError):
        verify_token(SECRET, f"{header}.{other_payload}.{signature}")


def test_an_unsigned_token_is_refused() -> None:
    claims = {"iss": "foliosync", "sub": "alice", "iat": int(time.time()), "exp": 2**40}
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(AuthError):
        verify_token(SECRET, unsigned)


def test_expiry() -> None:
    issued = 1_700_000_000.0
    token = issue_token(SECRET, "alice", ttl_seconds=60, now=issued)
    assert verify_token(SECRET, token, now=issued + 59).user == "alice"
    with pytest.raises(AuthError, match="expired"):
        verify_token(SECRET, token, now=issued + 60)
    with pytest.raises(AuthError, match="expired"):
        verify_token(SECRET, token, now=issued + 3600)
    # and against the real clock: issued long ago, so expired now
    with pytest.raises(AuthError, match="expired"):
        verify_token(SECRET, token)


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "a.b", "....", None, 42, b"bytes-token", "x" * 5000],
    ids=["empty", "garbage", "three-parts", "two-parts", "dots", "none", "int", "bytes", "long"],
)
def test_malformed_tokens_are_refused(token: object) -> None:
    with pytest.raises(AuthError):
        verify_token(SECRET, token)


def test_a_too_long_token_is_refused_before_decoding() -> None:
    padded = issue_token(SECRET, "alice") + "A" * 5000
    with pytest.raises(AuthError, match="too long"):
        verify_token(SECRET, padded)


def test_a_token_of_another_issuer_is_refused() -> None:
    now = int(time.time())
    claims = {"iss": "someone-else", "sub": "alice", "iat": now, "exp": now + 60}
    with pytest.raises(AuthError):
        verify_token(SECRET, jwt.encode(claims, SECRET, algorithm="HS256"))


def test_a_token_without_required_claims_is_refused() -> None:
    now = int(time.time())
    claims = {"iss": "foliosync", "sub": "alice", "iat": now}  # no exp
    with pytest.raises(AuthError):
        verify_token(SECRET, jwt.encode(claims, SECRET, algorithm="HS256"))


@pytest.mark.parametrize(
    "user",
    ["", "has space", "slash/user", "x" * 129, "tab\tname", "üser", "new\nline", "alice\n"],
)
def test_invalid_user_names_are_refused(user: str) -> None:
    with pytest.raises(ConfigError):
        issue_token(SECRET, user)


@pytest.mark.parametrize("device", ["", "bad device", "d/1", "d1\n"])
def test_invalid_device_names_are_refused(device: str) -> None:
    with pytest.raises(ConfigError):
        issue_token(SECRET, "alice", device=device)


def test_a_signed_token_naming_an_invalid_user_is_refused() -> None:
    now = int(time.time())
    for user in ("alice\n", "has space", ""):
        claims = {"iss": "foliosync", "sub": user, "iat": now, "exp": now + 60}
        with pytest.raises(AuthError):
            verify_token(SECRET, jwt.encode(claims, SECRET, algorithm="HS256"))


def test_a_signed_token_naming_an_invalid_device_names_no_device() -> None:
    now = int(time.time())
    claims = {"iss": "foliosync", "sub": "alice", "dev": "d1\n", "iat": now, "exp": now + 60}
    assert verify_token(SECRET, jwt.encode(claims, SECRET, algorithm="HS256")).device == ""


def test_invalid_scopes_and_lifetimes_are_refused() -> None:
    with pytest.raises(ConfigError, match="scope"):
        issue_token(SECRET, "alice", scopes=frozenset({"root"}))
    with pytest.raises(ConfigError):
        issue_token(SECRET, "alice", ttl_seconds=0)
    with pytest.raises(ConfigError):
        issue_token(SECRET, "alice", ttl_seconds=-5)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 2_592_000),
        ("2w", 1_209_600),
        (" 5M ", 300),
        ("1 h", 3600),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5m", "1.5h", "10y", "h", "abc", "5mm"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_secret_is_created_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "relay" / "data"
    first = load_or_create_secret(data_dir)
    path = data_dir / "secret.key"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 32
    second = load_or_create_secret(data_dir)
    assert second == first
    # tokens issued with the first stay valid with the reloaded secret
    assert verify_token(second, issue_token(first, "alice")).user == "alice"
    # another data directory gets another secret
    assert load_or_create_secret(tmp_path / "other") != first


def test_an_unusable_secret_file_is_not_silently_replaced(tmp_path: Path) -> None:
    (tmp_path / "secret.key").write_text("short\n")
    with pytest.raises(ConfigError):
        load_or_create_secret(tmp_path)
    assert (tmp_path / "secret.key").read_text() == "short\n"
