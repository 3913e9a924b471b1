"""Rebuilding a document without one refused change: the pure part of ``Replica.refuse``.

The relay never stored the refused row, so an undo (an update that deletes its items) could not
reach it, and would leave the device's document holding items no other replica knows. Instead the
document is rebuilt in a fresh ``Doc`` (a new client id, so the refused row's clocks are never
reused): the confirmed state (settled rows, see the store), then the pending rows in seq order.

A pending row after the refused one is kept as it is (same seq, same bytes) when it stands without
it: it integrates fully (its clocks follow on what the rebuilt document has, nothing it refers to
is missing) and changes the same keys to the same values as it did on the document it was made
on. Otherwise (the same client continuing its clocks, an overwrite of a refused value, a deletion
of a refused entry) its *effect* is re-made: every root of every kind is a map of plain JSON
values, so the effect is the set of (root, key) -> value or deletion it made, applied in one new
transaction on the rebuilt document. That becomes a new pending row with a new seq.

A refusal of the document as a whole (``whole``: the relay takes no change of it, whatever it
holds) takes every pending row of it at once: re-making them one by one would only have each
refused in turn. And when nothing is left of a document, neither on the relay (nothing confirmed)
nor pending, its creation was refused with the rest: the plan says to drop it
(:attr:`RefusalPlan.drop`), as a document the relay will never hold.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from pycrdt import Doc, Map, MapEvent, TransactionEvent, merge_updates

from foliosync.client.store import DocumentLog, PendingUpdate, RefusalPlan

__all__ = ["Effect", "decode_state_vector", "plan_rollback", "summarize"]

_DELETED = object()

Effect = dict[str, dict[str, Any]]
"""root -> key -> the value written, or :data:`_DELETED`."""

_ROOTS = {
    "watchlist": ("meta", "symbols", "fields"),
    "portfolio": ("meta", "trades", "fields"),
    "index": ("meta", "documents"),
}
_SEP = "\x1f"


def decode_state_vector(data: bytes) -> dict[int, int]:
    """client -> clock of a Yjs V1 state vector (varuint count, then varuint pairs)."""
    values: list[int] = []
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value = shift = 0
    count = values[0] if values else 0
    pairs = values[1 : 1 + 2 * count]
    return {pairs[i]: pairs[i + 1] for i in range(0, len(pairs) - 1, 2)}


def _missing_dependencies() -> Callable[[bytes, Mapping[int, int]], list[str]] | None:
    """The protocol layer's dependency check, once it exists (``foliosync.sync.updates``)."""
    try:
        module: Any = importlib.import_module("foliosync.sync.updates")
        decode, missing = module.decode_update, module.missing_dependencies
    except (ImportError, AttributeError):
        return None

    def check(update: bytes, state: Mapping[int, int]) -> list[str]:
        try:
            return list(missing(decode(update), state))
        except Exception as exc:  # an update it cannot read cannot be kept as it is
            return [str(exc)]

    return check


class _Tracked:
    """A document whose root maps report, per applied update or transaction, what changed."""

    def __init__(self, kind: str, doc: Doc[Any]) -> None:
        self.doc = doc
        self.effect: Effect = {}
        names = set(_ROOTS.get(kind, ())) | set(doc.keys())
        self.roots: dict[str, Map[Any]] = {name: doc.get(name, type=Map) for name in names}
        self._subscriptions = [
            (root, root.observe(self._recorder(name))) for name, root in self.roots.items()
        ]

    def _recorder(self, name: str) -> Callable[[MapEvent], None]:
        def record(event: MapEvent) -> None:
            changes = self.effect.setdefault(name, {})
            keys: dict[str, dict[str, Any]] = getattr(event, "keys", {})  # a slot, untyped
            for key, change in keys.items():
                deleted = change.get("action") == "delete"
                changes[key] = _DELETED if deleted else change.get("newValue")

        return record

    def apply(self, update: bytes) -> Effect:
        self.effect = {}
        self.doc.apply_update(update)
        return self.effect

    def state(self) -> dict[int, int]:
        return decode_state_vector(self.doc.get_state())

    def close(self) -> None:
        for root, subscription in self._subscriptions:
            root.unobserve(subscription)


def _advanced(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {c: k for c, k in after.items() if k > before.get(c, 0)}


def _holds(tracked: _Tracked, effect: Effect) -> bool:
    """Whether the document shows every key of ``effect`` as it says."""
    for name, keys in effect.items():
        root = tracked.roots.get(name)
        for key, value in keys.items():
            present = root is not None and key in root
            if value is _DELETED:
                if present:
                    return False
            elif not present or root is None or root.get(key) != value:
                return False
    return True


def _remake(doc: Doc[Any], tracked: _Tracked, effect: Effect) -> bytes:
    """Apply ``effect`` to ``doc`` as one transaction; the update it made (b"" if none)."""
    captured: list[bytes] = []

    def capture(event: TransactionEvent) -> None:
        captured.append(event.update)

    subscription = doc.observe(capture)
    try:
        with doc.transaction():
            for name, keys in effect.items():
                root = tracked.roots.get(name) or doc.get(name, type=Map)
                for key, value in keys.items():
                    if value is _DELETED:
                        if key in root:
                            del root[key]
                    else:  # written even if equal: a later rollback reads the effect again
                        root[key] = value
    finally:
        doc.unobserve(subscription)
    if len(captured) <= 1:
        return b"".join(captured)
    return merge_updates(*captured)


def _holds_nothing(doc: Doc[Any]) -> bool:
    """Whether ``doc`` has no item of anyone (an empty state vector)."""
    return not decode_state_vector(doc.get_state())


def plan_rollback(
    log: DocumentLog, seq: int, *, whole: bool = False
) -> tuple[RefusalPlan, Doc[Any]]:
    """The document of ``log`` without pending row ``seq`` (``whole``: without any pending row),
    and the ``Doc`` that holds it (to become the replica's copy). ValueError if ``seq`` is not
    one of the log's pending rows."""
    index = next((i for i, p in enumerate(log.pending) if p.seq == seq), None)
    if index is None:
        raise ValueError(f"no pending row {seq}")
    if whole:
        return _plan_without_pending(log, seq)
    refused = log.pending[index]
    if log.confirmed is not None:
        base, known = log.confirmed, True
    elif seq > log.base_seq:  # the snapshot folded no refused content: it stands in for it
        base, known = log.state, False
    else:  # folded into a snapshot of an older schema: settled rows only (module store)
        base, known = b"", True
    new_doc: Doc[Any] = Doc()
    if base:
        new_doc.apply_update(base)
    for settled in log.settled:
        new_doc.apply_update(settled)
    confirmed = new_doc.get_update() if known else None
    original: Doc[Any] = Doc()
    original.apply_update(new_doc.get_update() if known else log.state)
    old = _Tracked(log.kind, original)
    new = _Tracked(log.kind, new_doc)
    missing = _missing_dependencies()
    try:
        for row in log.pending[:index]:
            old.apply(row.data)
            new.apply(row.data)
        before = old.state()
        refused_effect = old.apply(refused.data)
        removed = set(_advanced(before, old.state()))
        replaced: list[int] = []
        rebased: list[tuple[bytes, int]] = []
        for row in log.pending[index + 1 :]:
            before = old.state()
            effect = old.apply(row.data)
            touched = _advanced(before, old.state())
            if not set(touched) & removed:
                kept, restored = _keeps(new, row, effect, touched, missing)
                if kept:
                    continue
                if restored is not None:  # the trial changed it: start again from before it
                    new.close()
                    new_doc = restored
                    new = _Tracked(log.kind, new_doc)
            replaced.append(row.seq)
            removed |= set(touched)
            update = _remake(new_doc, new, effect)
            if update:
                rebased.append((update, row.changes))
        left = len(log.pending) - 1 - len(replaced) + len(rebased)
        plan = RefusalPlan(
            state=new_doc.get_update(),
            confirmed=confirmed,
            replaced=replaced,
            rebased=rebased,
            summary=summarize(log.kind, log.name, refused_effect),
            changes=refused.changes,
            drop=_droppable(log, new_doc, left),
        )
    finally:
        old.close()
        new.close()
    return plan, new_doc


def _droppable(log: DocumentLog, rebuilt: Doc[Any], left: int) -> bool:
    """Nothing of the document on the relay (its confirmed state known, and empty) and nothing
    pending. Never the index, which every device keeps."""
    return (
        log.kind != "index" and log.confirmed is not None and left == 0 and _holds_nothing(rebuilt)
    )


def _plan_without_pending(log: DocumentLog, seq: int) -> tuple[RefusalPlan, Doc[Any]]:
    """Every pending row of ``log`` rolled back (``seq`` the one refused): the document is what
    the relay confirmed."""
    new_doc: Doc[Any] = Doc()
    if log.confirmed:
        new_doc.apply_update(log.confirmed)
    elif log.confirmed is None and log.base_seq < min(p.seq for p in log.pending):
        new_doc.apply_update(log.state)  # a snapshot that folded no pending row: settled
    for settled in log.settled:
        new_doc.apply_update(settled)
    original: Doc[Any] = Doc()
    original.apply_update(new_doc.get_update())
    old = _Tracked(log.kind, original)
    try:
        summaries = [summarize(log.kind, log.name, old.apply(row.data)) for row in log.pending]
    finally:
        old.close()
    unique = _unique(summaries)
    summary = "; ".join(unique[:3]) + (f"; and {len(unique) - 3} more" if len(unique) > 3 else "")
    confirmed = new_doc.get_update()
    plan = RefusalPlan(
        state=confirmed,
        confirmed=confirmed,
        replaced=[p.seq for p in log.pending if p.seq != seq],
        rebased=[],
        summary=summary,
        changes=sum(p.changes for p in log.pending),
        drop=_droppable(log, new_doc, 0),
    )
    return plan, new_doc


def _keeps(
    new: _Tracked,
    row: PendingUpdate,
    effect: Effect,
    touched: dict[int, int],
    missing: Callable[[bytes, Mapping[int, int]], list[str]] | None,
) -> tuple[bool, Doc[Any] | None]:
    """Apply ``row`` to the rebuilt document if it stands there as it is: (True, None). Else
    (False, the document as it was before the trial, or None if the trial did not touch it)."""
    if missing is not None and missing(row.data, new.state()):
        return False, None
    saved = new.doc.get_update()
    got = new.apply(row.data)
    state = new.state()
    if all(state.get(c, 0) >= k for c, k in touched.items()) and _holds(new, effect):
        changed = {(r, k) for r, keys in got.items() for k in keys}
        if changed <= {(r, k) for r, keys in effect.items() for k in keys}:
            return True, None
    fresh: Doc[Any] = Doc()
    fresh.apply_update(saved)
    return False, fresh


def summarize(kind: str, name: str, effect: Effect) -> str:
    """What a change did, in words: "add NVDA, MSFT to Tech", "record a trade of 10 AAPL in
    Main"; read from the keys it changed (the layouts of section 6 of PROTOCOL.md)."""
    parts: list[str] = []
    meta = effect.get("meta", {})
    if kind == "watchlist":
        symbols = effect.get("symbols", {})
        additions = sorted(  # in the order they were made: by the stamp of each
            (str(v.get("t", "")) if isinstance(v, dict) else "", k.partition(_SEP)[0])
            for k, v in symbols.items()
            if v is not _DELETED
        )
        added = _unique(symbol for _, symbol in additions)
        removed = _unique(k.partition(_SEP)[0] for k, v in symbols.items() if v is _DELETED)
        removed = [s for s in removed if s not in added]
        fields = effect.get("fields", {})
        noted = _unique(
            k.split(_SEP)[0]
            for k, v in fields.items()
            if k.count(_SEP) == 2 and k.split(_SEP)[1] == "note" and v is not _DELETED
        )
        moved = _unique(
            k.split(_SEP)[0]
            for k, v in fields.items()
            if k.count(_SEP) == 2 and k.split(_SEP)[1] == "pos" and v is not _DELETED
        )
        if "name" in meta and not symbols and not fields:
            return f"create watchlist {name}"
        if added:
            parts.append(f"add {_list(added)} to {name}")
        if removed:
            parts.append(f"remove {_list(removed)} from {name}")
        noted = [s for s in noted if s not in added]
        if noted:
            parts.append(f"change the note of {_list(noted)} in {name}")
        moved = [s for s in moved if s not in added]
        if moved and not added:
            parts.append(f"move {_list(moved)} in {name}")
    elif kind == "portfolio":
        trades = effect.get("trades", {})
        for value in trades.values():
            if isinstance(value, dict):
                qty, symbol = value.get("qty", "?"), value.get("symbol", "?")
                parts.append(f"record a trade of {qty} {symbol} in {name}")
        deleted = sum(1 for v in trades.values() if v is _DELETED)
        if deleted:
            parts.append(f"delete {deleted} trade{'s' if deleted > 1 else ''} of {name}")
        corrected = _unique(
            k.split(_SEP)[0] for k in effect.get("fields", {}) if k.split(_SEP)[0] not in trades
        )
        if corrected:
            parts.append(
                f"correct {len(corrected)} trade{'s' if len(corrected) > 1 else ''} in {name}"
            )
        if "name" in meta and not parts:
            return f"create portfolio {name}"
    else:
        for value in effect.get("documents", {}).values():
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                parts.append(f"list {value.get('kind', 'document')} {value['name']}")
            elif value is _DELETED:
                parts.append("remove a document from the list")
    if "name" in meta and meta["name"] is not _DELETED and meta["name"] != name:
        parts.append(f"rename {name} to {meta['name']}")
    if not parts:
        return f"a change to {name or kind}"
    text = "; ".join(_unique(parts)[:3])
    return text if len(parts) <= 3 else f"{text}; and {len(parts) - 3} more"


def _unique(items: Any) -> list[str]:
    return list(dict.fromkeys(items))


def _list(symbols: list[str]) -> str:
    shown = ", ".join(symbols[:5])
    return shown if len(symbols) <= 5 else f"{shown} and {len(symbols) - 5} more"
