"""A watchlist: a name and an ordered set of symbols, each with an optional note.

Layout in the pycrdt document:

- ``meta``: kind and name.
- ``symbols``: ``symbol/device`` -> ``{"t": stamp}``: one key per device that added the symbol, and
  the symbol is in the list while any of its keys is. The same symbol added on two devices is one
  entry. Removing deletes the keys the remover sees, so an add it has not seen (a concurrent one,
  or one made after it offline) survives, while a removal with no concurrent add is final. Keys
  are per device because pycrdt resolves concurrent writes of one key by client id, deleting the
  loser: a shared key would let a removal of one device's add also take another's unseen add.
- ``fields``: later-wins slots (see :mod:`.lww`) for each symbol's ``pos`` (a fractional order key)
  and ``note``. Order and notes are separate from membership, so a reorder on one device and an
  addition or a note on another never overwrite each other. Slots stamped before a symbol was
  (re-)added are ignored, so a removed symbol that comes back starts clean. Every write is stamped
  after the slots it has seen, so an edit made after seeing another wins even on a slow clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pycrdt import Doc, Map

from foliosync.sync.errors import DocumentNotFound, ValidationError
from foliosync.sync.model.document import DocumentKind, DocumentModel, EditContext
from foliosync.sync.model.lww import LwwSlots, LwwValue, newest_stamp
from foliosync.sync.ordering import is_valid_key, key_between
from foliosync.sync.validation import normalize_note, normalize_symbol

__all__ = ["Watchlist", "WatchlistEntry"]

_KEY_SEP = "\x1f"


@dataclass(frozen=True, slots=True)
class WatchlistEntry:
    symbol: str
    note: str | None
    position: str  # fractional order key; entries sort by (position, symbol)
    added: str  # stamp of the addition


class Watchlist(DocumentModel):
    KIND = DocumentKind.WATCHLIST

    def __init__(self, doc: Doc[Any], context: EditContext) -> None:
        super().__init__(doc, context)
        self._symbols: Map[Any] = doc.get("symbols", type=Map)
        self._fields = LwwSlots(doc.get("fields", type=Map))
        self._cache: dict[str, WatchlistEntry] | None = None
        self._cache_version = -1
        self._ordered: list[WatchlistEntry] | None = None

    # -- reads -----------------------------------------------------------------------------

    def _entries(self) -> dict[str, WatchlistEntry]:
        if self._cache is None or self._cache_version != self.version:
            self._cache = self._read_entries()
            self._cache_version = self.version
            self._ordered = None
        return self._cache

    def _read_entries(self) -> dict[str, WatchlistEntry]:
        fields = self._fields.resolve()
        # symbol -> its earliest surviving addition (one key per device that added it)
        additions: dict[str, str] = {}
        for key, raw in self._symbols.items():
            symbol = key.partition(_KEY_SEP)[0]
            stamp = raw.get("t", "") if isinstance(raw, dict) else ""
            stamp = stamp if isinstance(stamp, str) else ""
            if symbol not in additions or stamp < additions[symbol]:
                additions[symbol] = stamp
        # What this device writes next must sort after every stamp it has seen (the HLC rule),
        # leftover slots of removed symbols included, so none of them comes back on a re-add.
        self.context.clock.observe(max([newest_stamp(fields), *additions.values()], default=""))
        entries: dict[str, WatchlistEntry] = {}
        for symbol, added in additions.items():
            slots = fields.get(symbol, {})
            pos = _newer(slots.get("pos"), added)
            note = _newer(slots.get("note"), added)
            entries[symbol] = WatchlistEntry(
                symbol=symbol,
                note=note if isinstance(note, str) and note else None,
                position=pos if is_valid_key(pos) else "~",  # unknown order sorts last
                added=added,
            )
        return entries

    def entries(self) -> list[WatchlistEntry]:
        """The entries in display order."""
        entries = self._entries()
        if self._ordered is None:
            self._ordered = sorted(entries.values(), key=lambda e: (e.position, e.symbol))
        return list(self._ordered)

    @property
    def symbols(self) -> list[str]:
        return [e.symbol for e in self.entries()]

    def __contains__(self, symbol: object) -> bool:
        return isinstance(symbol, str) and symbol.upper() in self._entries()

    def __len__(self) -> int:
        return len(self._entries())

    # -- edits -----------------------------------------------------------------------------

    def add(self, symbols: Iterable[str], note: str | None = None) -> list[str]:
        """Append the symbols not yet present; set the note on all given ones if ``note``.

        Returns the symbols newly added. Validates everything first: one bad symbol and nothing
        changes.
        """
        wanted = _normalize_all(symbols)
        note = normalize_note(note)
        entries = self._entries()  # patched in place below; read first, so the clock has seen it
        ordered = self.entries()
        last = next((e.position for e in reversed(ordered) if is_valid_key(e.position)), None)
        clock, device = self.context.clock, self.context.device
        added: list[str] = []
        with self.doc.transaction():
            for symbol in wanted:
                current = entries.get(symbol)
                if current is None:
                    stamp = clock.now()
                    last = key_between(last, None)
                    self._symbols[_member_key(symbol, device)] = {"t": stamp}
                    self._fields.write(symbol, "pos", device, stamp, last)
                    if note is not None:
                        self._fields.write(symbol, "note", device, stamp, note)
                    entries[symbol] = WatchlistEntry(symbol, note, last, stamp)
                    added.append(symbol)
                elif note is not None and note != current.note:
                    self._fields.write(symbol, "note", device, clock.now(), note)
                    entries[symbol] = WatchlistEntry(symbol, note, current.position, current.added)
        # New keys sort after every valid key, so the order is the old one plus the additions
        # (unless an unreadable key, which sorts last, is in the way: then sort once again).
        order = None
        if all(e.position != "~" for e in ordered):
            order = [entries[e.symbol] for e in ordered] + [entries[s] for s in added]
        self._patch(entries, order)
        return added

    def remove(self, symbols: Iterable[str]) -> list[str]:
        """Remove the symbols that are present; returns those removed."""
        wanted = _normalize_all(symbols)
        entries = self._entries()
        removed = [s for s in wanted if s in entries]
        if removed:
            gone = set(removed)
            keys = [k for k, _ in self._symbols.items() if k.partition(_KEY_SEP)[0] in gone]
            ordered = self._ordered
            with self.doc.transaction():
                for key in keys:
                    del self._symbols[key]
                for symbol in removed:
                    self._fields.clear(symbol)
                    del entries[symbol]
            order = None if ordered is None else [e for e in ordered if e.symbol not in gone]
            self._patch(entries, order)
        return removed

    def set_note(self, symbol: str, note: str | None) -> None:
        symbol = normalize_symbol(symbol)
        note = normalize_note(note)
        entries = self._entries()
        current = entries.get(symbol)
        if current is None:
            raise DocumentNotFound(f"{symbol} is not in watchlist {self.name!r}")
        stamp = self.context.clock.now()
        ordered = self._ordered
        with self.doc.transaction():
            self._fields.write(symbol, "note", self.context.device, stamp, note)
        noted = WatchlistEntry(symbol, note, current.position, current.added)
        entries[symbol] = noted
        order = None if ordered is None else [noted if e is current else e for e in ordered]
        self._patch(entries, order)

    def move(self, symbol: str, index: int) -> None:
        """Move ``symbol`` to ``index`` in the display order (negative counts from the end)."""
        symbol = normalize_symbol(symbol)
        ordered = self.entries()
        current = next((e for e in ordered if e.symbol == symbol), None)
        if current is None:
            raise DocumentNotFound(f"{symbol} is not in watchlist {self.name!r}")
        others = [e for e in ordered if e.symbol != symbol]
        if index < 0:
            index += len(others) + 1
        if not 0 <= index <= len(others):
            raise ValidationError(f"position {index} is outside 0..{len(others)}")
        before = others[index - 1].position if index > 0 else None
        after = others[index].position if index < len(others) else None
        position = _key_between_lenient(before, after)
        entries = self._entries()  # before the write, which makes the cache stale
        stamp = self.context.clock.now()
        with self.doc.transaction():
            self._fields.write(symbol, "pos", self.context.device, stamp, position)
        moved = WatchlistEntry(symbol, current.note, position, current.added)
        entries[symbol] = moved
        order = None
        if (before is None or before < position) and (after is None or position < after):
            # The new key sorts strictly between its neighbours: the order is known, no re-sort.
            order = [*others[:index], moved, *others[index:]]
        self._patch(entries, order)

    def _patch(
        self, entries: dict[str, WatchlistEntry], order: list[WatchlistEntry] | None = None
    ) -> None:
        """Adopt ``entries`` (the cache, patched in place by a local edit) as current, with
        ``order`` as the display order when the edit knows it (None: sort on the next read)."""
        self._cache = entries
        self._cache_version = self.version
        self._ordered = order


def _member_key(symbol: str, device: str) -> str:
    return f"{symbol}{_KEY_SEP}{device}"


def _newer(slot: LwwValue | None, added: str) -> Any:
    return slot.value if slot is not None and slot.stamp >= added else None


def _normalize_all(symbols: Iterable[str]) -> list[str]:
    if isinstance(symbols, str):
        symbols = [symbols]
    seen: dict[str, None] = {}
    for symbol in symbols:
        seen.setdefault(normalize_symbol(symbol), None)
    if not seen:
        raise ValidationError("no symbol given")
    return list(seen)


def _key_between_lenient(before: str | None, after: str | None) -> str:
    """key_between, tolerating neighbours with equal or unreadable keys from concurrent edits."""
    before = before if before is not None and is_valid_key(before) else None
    after = after if after is not None and is_valid_key(after) else None
    if before is not None and after is not None and before >= after:
        after = None  # equal keys (a tie broken by symbol): place just after ``before``
    return key_between(before, after)
