"""The external services some tests need: Redis and PostgreSQL on 127.0.0.1.

A test that needs one calls ``require_redis()`` / ``require_postgres()`` first: if the service
does not answer, the test is skipped, or fails when ``FOLIOSYNC_REQUIRE_REDIS=1`` /
``FOLIOSYNC_REQUIRE_POSTGRES=1`` is set (CI sets them, so a missing service cannot pass as a
green run of skips).
"""

from __future__ import annotations

import os
import socket

import pytest

__all__ = ["postgres_dsn", "redis_url", "require_postgres", "require_redis"]

_REDIS = ("127.0.0.1", 6379)
_POSTGRES = ("127.0.0.1", 5432)


def redis_url() -> str:
    return f"redis://{_REDIS[0]}:{_REDIS[1]}/0"


def postgres_dsn() -> str:
    return f"postgresql://postgres@{_POSTGRES[0]}:{_POSTGRES[1]}/postgres"


def _answers(address: tuple[str, int], probe: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0) as sock:
            sock.settimeout(1.0)
            if not probe:
                return True
            sock.sendall(probe)
            return sock.recv(64).startswith(expect)
    except OSError:
        return False


def _require(name: str, variable: str, reachable: bool) -> None:
    if reachable:
        return
    message = f"{name} is not reachable"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{message} and {variable}=1 requires it")
    pytest.skip(message)


def require_redis() -> None:
    """Skip (or fail, with FOLIOSYNC_REQUIRE_REDIS=1) unless Redis answers PING."""
    _require(
        f"Redis on {_REDIS[0]}:{_REDIS[1]}",
        "FOLIOSYNC_REQUIRE_REDIS",
        _answers(_REDIS, b"PING\r\n", b"+PONG"),
    )


def require_postgres() -> None:
    """Skip (or fail, with FOLIOSYNC_REQUIRE_POSTGRES=1) unless PostgreSQL accepts a connection."""
    _require(
        f"PostgreSQL on {_POSTGRES[0]}:{_POSTGRES[1]}",
        "FOLIOSYNC_REQUIRE_POSTGRES",
        _answers(_POSTGRES, b"", b""),
    )
