"""The relay's one seam to the pure update checks: :mod:`foliosync.sync.updates` (is this a well-
formed Yjs V1 update whose dependencies the relay holds?) and :mod:`foliosync.sync.model.schema`
(what would the document be, and does it keep its kind's layout?).

The relay asks only through the four names here, so that the checks can grow in ``sync/``
without the relay's loop changing. Where those modules are not installed (an older ``sync``
package beside a newer ``server``), the relay falls back to what it checked before them: pycrdt
must be able to read the update, and a state vector must decode; no layout is enforced then.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc

from foliosync.sync.errors import BadUpdate
from foliosync.sync.model import DocumentKind, EditContext, Portfolio, UserIndex, Watchlist

__all__ = [
    "DEFAULT_LIMITS",
    "Candidate",
    "SchemaLimits",
    "advance_scratch",
    "candidate",
    "check_update",
    "decode_state_vector",
    "schema_checks_installed",
    "update_checks_installed",
]


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


_updates = _optional("foliosync.sync.updates")
_schema = _optional("foliosync.sync.model.schema")

update_checks_installed = _updates is not None
schema_checks_installed = _schema is not None


def _guarded(action: Callable[[], Any], message: str) -> Any:
    try:
        return action()
    except BaseException as exc:  # pycrdt's Rust panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | asyncio.CancelledError):
            raise
        raise BadUpdate(message) from exc


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise BadUpdate("the state vector is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise BadUpdate("the state vector holds a number too large")


def _decode_state_vector(data: bytes) -> dict[int, int]:
    count, pos = _read_varuint(data, 0)
    state: dict[int, int] = {}
    for _ in range(count):
        client, pos = _read_varuint(data, pos)
        clock, pos = _read_varuint(data, pos)
        state[client] = clock
    if pos != len(data):
        raise BadUpdate("the state vector has trailing bytes")
    return state


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector as ``{client: clock}``; BadUpdate if it does not decode."""
    if _updates is not None:
        decoded: dict[int, int] = dict(_updates.decode_state_vector(data))
        return decoded
    return _decode_state_vector(data)


def check_update(update: bytes, state: Mapping[int, int]) -> object:
    """Refuse (BadUpdate, UpdateV2, MissingDependencies) an update the relay must not store,
    given the state vector of the document it would go into."""
    if _updates is not None:
        return _updates.check_update(update, state)
    return None


@dataclass(frozen=True, slots=True)
class _FallbackLimits:
    """Stands in for ``SchemaLimits`` where the schema module is not installed: no limits."""


SchemaLimits: Any = _schema.SchemaLimits if _schema is not None else _FallbackLimits
DEFAULT_LIMITS: Any = _schema.DEFAULT_LIMITS if _schema is not None else _FallbackLimits()

_MODELS: dict[DocumentKind, Any] = {
    DocumentKind.WATCHLIST: Watchlist,
    DocumentKind.PORTFOLIO: Portfolio,
    DocumentKind.INDEX: UserIndex,
}


class _FallbackCandidate:
    """The document as it would be after the update (a copy of the base plus the update)."""

    def __init__(self, kind: DocumentKind, base: Doc[Any], update: bytes) -> None:
        self.kind = kind
        self.doc: Doc[Any] = Doc()
        before = base.get_state()
        self.doc.apply_update(base.get_update())
        _guarded(lambda: self.doc.apply_update(update), "the update is not a valid CRDT update")
        self.changed = self.doc.get_state() != before

    def check(self, limits: object = None) -> None:
        """No layout is known without the schema module."""

    def model(self) -> Any:
        return _MODELS[self.kind](self.doc, EditContext("relay"))


Candidate: Any = _schema.Candidate if _schema is not None else _FallbackCandidate


def candidate(kind: DocumentKind, base: Doc[Any], update: bytes) -> Any:
    """The document ``base`` would become with ``update``, without touching ``base``."""
    if _schema is not None:
        return _schema.candidate(kind, base, update)
    return _FallbackCandidate(kind, base, update)


def advance_scratch(
    kind: DocumentKind, scratch: Doc[Any], update: bytes, *, base_size: int | None = None
) -> Any:
    """The candidate built in ``scratch`` itself, a replica of the base the caller keeps (no
    copy per update); a refused update stays in it, so the caller then drops it."""
    if _schema is not None:
        return _schema.advance_scratch(kind, scratch, update, base_size=base_size)
    _guarded(lambda: scratch.apply_update(update), "the update is not a valid CRDT update")
    fallback = _FallbackCandidate.__new__(_FallbackCandidate)
    fallback.kind, fallback.doc, fallback.changed = kind, scratch, True
    return fallback
