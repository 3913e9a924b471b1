"""The relay's logs: text or one JSON object per line, with context, and never a credential.

Context: the relay's connection code binds the connection id, and once authenticated the user and
device, with :func:`bind_log_context`; per-document work runs inside :func:`log_context` with the
document id. Both live in a :class:`contextvars.ContextVar`, so every line logged while handling
that connection (by the relay, the document cache or the store) carries them, and a line of
another connection never does: each WebSocket is served by its own task. What one task does on
behalf of another connection (a fan-out delivering to each receiver, the close of a reader that
fell behind) runs in that connection's saved context, and the price flush timer in an empty one,
not in the context of whichever publisher armed it.

Secrets: a token must never reach a log file, where whoever reads logs could replay it. The
:class:`RedactingFilter` sits on the one handler :func:`configure_logging` leaves on the root
logger, so every line from every library passes it, and replaces, in the message, the traceback
and every context field, anything shaped like a JWT (three base64url parts separated by dots) and
the relay's secret itself. It works on the finished text, so a token cannot slip through
a ``%s`` argument, an exception's message or a URL that some library logs.

aiohttp's access log stays off (the relay's runner is built with ``access_log=None``): it would
log request lines, and the price stream takes ``?token=`` in its query string.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Literal, TextIO

__all__ = [
    "CONTEXT_FIELDS",
    "LOG_FORMATS",
    "REDACTED",
    "JsonFormatter",
    "LogFormat",
    "RedactingFilter",
    "bind_log_context",
    "configure_logging",
    "current_log_context",
    "log_context",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

CONTEXT_FIELDS = ("connection", "user", "device", "doc")
"""The context a line may carry, in the order a JSON line shows them."""

REDACTED = "[REDACTED]"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_JWT = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")

# Two variables: what a connection binds for its lifetime, and what a block adds for its own
# duration. A block's end restores only its own variable, so a binding made inside one (the user,
# learnt while handling the Hello frame) outlives it.
_bound: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "foliosync_log_bound", default=MappingProxyType({})
)
_scoped: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "foliosync_log_scoped", default=MappingProxyType({})
)


def _present(fields: Mapping[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if v is not None}


def current_log_context() -> Mapping[str, str]:
    return {**_bound.get(), **_scoped.get()}


def bind_log_context(**fields: str | None) -> None:
    """Add ``fields`` to this task's context from now on (None values are left out)."""
    _bound.set({**_bound.get(), **_present(fields)})


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """``fields`` in the context for the block only."""
    token = _scoped.set({**_scoped.get(), **_present(fields)})
    try:
        yield
    finally:
        _scoped.reset(token)


class RedactingFilter(logging.Filter):
    """Replaces JWT-shaped strings and the given secrets in a record, and attaches the context.

    As a handler filter it runs for every record the handler writes, from any logger."""

    def __init__(self, secrets: Iterable[str | bytes] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str | bytes]) -> None:
        for secret in secrets:
            text = secret.decode(errors="replace") if isinstance(secret, bytes) else secret
            text = text.strip()
            if text and text not in self._secrets:
                self._secrets.append(text)
        self._secrets.sort(key=len, reverse=True)  # a secret containing another goes first

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return _JWT.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current_log_context().items():
            if not hasattr(record, name):  # an explicit extra= wins
                setattr(record, name, value)
        if not getattr(record, "_foliosync_redacted", False):
            record.msg = self.redact(record.getMessage())
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            if record.stack_info:
                record.stack_info = self.redact(record.stack_info)
            for name in CONTEXT_FIELDS:
                field = getattr(record, name, None)
                if field is not None:
                    setattr(record, name, self.redact(str(field)))
            record._foliosync_redacted = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601 with milliseconds), level, logger,
    message, the context fields the record has, and the traceback as ``exc`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=UTC)
        line: dict[str, object] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(
    level: int,
    log_format: LogFormat = "text",
    *,
    secrets: Iterable[str | bytes] = (),
    stream: TextIO | None = None,
) -> RedactingFilter:
    """Log to ``stream`` (stderr) in ``log_format``, every line redacted; replaces the root
    logger's handlers. Returns the filter, to which later secrets can be added."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    redacting = RedactingFilter(secrets)
    handler.addFilter(redacting)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return redacting
