"""The layout of each document kind (``PROTOCOL.md``, section 6), checked on every change.

A relay that stores whatever pycrdt can decode lets one faulty writer hide data from everyone:
readers skip entries they cannot read, so a trade whose quantity is a number instead of decimal
text vanishes from every device without an error anywhere. The relay therefore builds the
document an update would produce (a :class:`Candidate`) and refuses the update, before storing
or forwarding it, if that document breaks its kind's layout.

Only what the update changed is checked entry by entry: an entry written before these checks
existed must not block every later edit of its document. Deletions always pass (removing a bad
entry is how it gets repaired). Counts are checked for the roots the update added keys to, and
the encoded size whenever the document grows.

The update is applied to a copy of the base, so a refusal leaves the base untouched. Copying is
linear in the document's size; :func:`advance_scratch` builds the candidate in a second replica
the caller keeps instead (see its docstring for the trade-off).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from pycrdt import (
    Array,
    Doc,
    Map,
    MapEvent,
    Text,
    XmlElement,
    XmlFragment,
    XmlText,
    get_update,
)

from foliosync.sync.errors import (
    BadUpdate,
    ConfigError,
    MissingDependencies,
    SchemaViolation,
    ValidationError,
)
from foliosync.sync.model.document import DocumentKind, DocumentModel, EditContext, kind_of
from foliosync.sync.model.portfolio import CORRECTABLE_FIELDS, Portfolio
from foliosync.sync.model.user_index import UserIndex
from foliosync.sync.model.watchlist import Watchlist
from foliosync.sync.ordering import is_valid_key
from foliosync.sync.validation import MAX_NAME_LENGTH, MAX_NOTE_LENGTH, is_symbol, normalize_name

__all__ = [
    "DEFAULT_LIMITS",
    "ROOTS",
    "Candidate",
    "SchemaLimits",
    "ScratchObservers",
    "advance_scratch",
    "candidate",
    "check_document",
]

_SEP = "\x1f"
_MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z (PROTOCOL.md, "Numbers")
_MAX_TRADE_ID = 64
_STAMP = re.compile(r"[0-9a-f]{17}")
# The one text of each decimal (PROTOCOL.md, "Decimals as text"): no leading zeros, no trailing
# zeros after the point, no trailing point, at most 18 + 12 digits; "-0" is excluded separately.
_CANONICAL_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]{0,11}[1-9])?")
_SHARED_TYPES = (Map, Array, Text, XmlElement, XmlFragment, XmlText, Doc)
_SHOWN_KEY = 40
# Each item or delete range of an update can split at most two blocks of the document, and a
# split costs one block header (under 32 bytes): past this bound the exact size is computed.
_SPLIT_FACTOR = 32
_SPLIT_SLACK = 1024


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """Bounds on a document's content, so that one user cannot grow a document without end.

    ``max_slots`` bounds the entries of a ``fields`` map. A watchlist at ``max_symbols`` with a
    position and a note written by each of 25 devices holds 250,000 slots, as does a portfolio
    at ``max_trades`` with two or three corrected fields per trade: more than real use makes,
    and about what ``max_document_bytes`` holds anyway (a slot encodes to some 60 bytes), so
    for genuine documents the byte limit, not this count, is the one that binds.
    """

    max_symbols: int = 5_000
    max_trades: int = 100_000
    max_index_entries: int = 10_000
    max_slots: int = 250_000
    max_text: int = MAX_NOTE_LENGTH
    max_document_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if type(value) is not int or value <= 0:
                raise ConfigError(f"{item.name} must be a positive integer, not {value!r}")


DEFAULT_LIMITS = SchemaLimits()

ROOTS: Mapping[DocumentKind, tuple[str, ...]] = {
    DocumentKind.WATCHLIST: ("meta", "symbols", "fields"),
    DocumentKind.PORTFOLIO: ("meta", "trades", "fields"),
    DocumentKind.INDEX: ("meta", "documents"),
}
"""The root maps of each kind: any other root, and any sequence use of these, is refused."""

_MODELS: Mapping[DocumentKind, type[DocumentModel]] = {
    DocumentKind.WATCHLIST: Watchlist,
    DocumentKind.PORTFOLIO: Portfolio,
    DocumentKind.INDEX: UserIndex,
}


# -- value forms: each returns None when the value is in form, else what is wrong ------------


def _is_stamp(value: object) -> bool:
    return type(value) is str and _STAMP.fullmatch(value) is not None


def _is_device(value: object) -> bool:
    return type(value) is str and value != "" and _SEP not in value


def _is_time(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    number = float(value)
    return math.isfinite(number) and number.is_integer() and 0 <= number <= _MAX_TIME_MS


def _decimal_problem(name: str, value: object, *, nonzero: bool, signed: bool) -> str | None:
    if type(value) in (int, float):
        return f"{name} must be decimal text, not a number"
    if type(value) is not str or _CANONICAL_DECIMAL.fullmatch(value) is None or value == "-0":
        return f"{name} must be a decimal in canonical text form (such as 187.25)"
    if nonzero and value == "0":
        return f"{name} must not be zero"
    if not signed and value.startswith("-"):
        return f"{name} must not be negative"
    return None


def _note_problem(name: str, value: object, limits: SchemaLimits) -> str | None:
    if value is None or (type(value) is str and len(value) <= limits.max_text):
        return None
    return f"{name} must be text of at most {limits.max_text} characters, or nil"


def _symbol_problem(name: str, value: object) -> str | None:
    if type(value) is str and is_symbol(value):
        return None
    return f"{name} must be a canonical symbol (upper case, such as AAPL or BRK.B)"


def _time_problem(name: str, value: object) -> str | None:
    if _is_time(value):
        return None
    return f"{name} must be a whole number of ms from 0 to {_MAX_TIME_MS}"


def _name_problem(value: object) -> str | None:
    if type(value) is str:
        try:
            if normalize_name(value) == value:
                return None
        except ValidationError:
            pass
    return (
        f"name must be text of 1 to {MAX_NAME_LENGTH} characters, without control characters"
        " and with single spaces only between words"
    )


def _plain_problem(value: object) -> str | None:
    if isinstance(value, _SHARED_TYPES):
        return f"value must be plain content, not a nested {type(value).__name__}"
    return None


_Check = Callable[[str, Any, SchemaLimits], str | None]


def _meta_check(kind: DocumentKind) -> _Check:
    def check(key: str, value: Any, _limits: SchemaLimits) -> str | None:
        if key == "kind":
            return None if value == kind.value else f'kind must be "{kind.value}"'
        if key == "name":
            return _name_problem(value)
        return "meta holds only kind and name"

    return check


def _watchlist_symbol(key: str, value: Any, _limits: SchemaLimits) -> str | None:
    parts = key.split(_SEP)
    if len(parts) != 2 or not _is_device(parts[1]):
        return 'key must be "SYMBOL\\x1fDEVICE"'
    if not is_symbol(parts[0]):
        return "the key's symbol must be canonical (upper case, such as AAPL or BRK.B)"
    if type(value) is not dict or value.keys() != {"t"} or not _is_stamp(value["t"]):
        return 'value must be {"t": STAMP}'
    return None


_SlotValueCheck = Callable[[str, Any, SchemaLimits], str | None]


def _watchlist_slot_value(field: str, value: Any, limits: SchemaLimits) -> str | None:
    if field == "pos":
        return None if is_valid_key(value) else "pos must be an order key (such as a0)"
    return _note_problem("note", value, limits)


def _portfolio_slot_value(field: str, value: Any, limits: SchemaLimits) -> str | None:
    if field == "symbol":
        return _symbol_problem("symbol", value)
    if field == "quantity":
        return _decimal_problem("quantity", value, nonzero=True, signed=True)
    if field == "price":
        return _decimal_problem("price", value, nonzero=False, signed=False)
    if field == "time":
        return _time_problem("time", value)
    return _note_problem("note", value, limits)


def _trade_id_problem(trade_id: str) -> str | None:
    if 0 < len(trade_id) <= _MAX_TRADE_ID and all(ord(c) >= 32 for c in trade_id):
        return None
    return f"a trade id must be 1 to {_MAX_TRADE_ID} characters, without control characters"


def _slot_check(
    entity: Callable[[str], str | None], names: tuple[str, ...], value_check: _SlotValueCheck
) -> _Check:
    shown = ", ".join(names)

    def check(key: str, value: Any, limits: SchemaLimits) -> str | None:
        parts = key.split(_SEP)
        if len(parts) != 3 or not _is_device(parts[2]):
            return 'key must be "ENTITY\\x1fFIELD\\x1fDEVICE"'
        problem = entity(parts[0])
        if problem is not None:
            return problem
        if parts[1] not in names:
            return f"the key's field must be one of {shown}"
        if type(value) is not list or len(value) != 2 or not _is_stamp(value[0]):
            return "value must be [STAMP, VALUE]"
        return value_check(parts[1], value[1], limits)

    return check


def _symbol_entity(text: str) -> str | None:
    if is_symbol(text):
        return None
    return "the key's symbol must be canonical (upper case, such as AAPL or BRK.B)"


_TRADE_REQUIRED = ("symbol", "qty", "price", "at", "t", "by")
_TRADE_KEYS = frozenset((*_TRADE_REQUIRED, "note"))


def _trade(key: str, value: Any, limits: SchemaLimits) -> str | None:
    problem = _trade_id_problem(key)
    if problem is not None:
        return problem
    if type(value) is not dict:
        return "value must be a trade record {symbol, qty, price, at, note, t, by}"
    unknown = sorted(k for k in value if k not in _TRADE_KEYS)
    if unknown:
        return f"a trade record has no key {_show(unknown[0])}"
    missing = [k for k in _TRADE_REQUIRED if k not in value]
    if missing:
        return f"a trade record needs {missing[0]}"
    return (
        _symbol_problem("symbol", value["symbol"])
        or _decimal_problem("qty", value["qty"], nonzero=True, signed=True)
        or _decimal_problem("price", value["price"], nonzero=False, signed=False)
        or _time_problem("at", value["at"])
        or (None if _is_stamp(value["t"]) else "t must be a STAMP")
        or (None if _is_device(value["by"]) else "by must be a device id")
        or _note_problem("note", value.get("note"), limits)
    )


def _index_entry(key: str, value: Any, _limits: SchemaLimits) -> str | None:
    try:
        kind = kind_of(key)
    except ValidationError:
        kind = DocumentKind.INDEX
    if kind is DocumentKind.INDEX:
        return "key must be a watchlist or portfolio id (wl-... or pf-...)"
    if type(value) is not dict or value.keys() != {"kind", "name", "t"}:
        return "value must be {kind, name, t}"
    if value["kind"] != kind.value:
        return f'kind must be "{kind.value}", as the id says'
    return _name_problem(value["name"]) or (None if _is_stamp(value["t"]) else "t must be a STAMP")


_CHECKS: Mapping[DocumentKind, Mapping[str, _Check]] = {
    DocumentKind.WATCHLIST: {
        "meta": _meta_check(DocumentKind.WATCHLIST),
        "symbols": _watchlist_symbol,
        "fields": _slot_check(_symbol_entity, ("pos", "note"), _watchlist_slot_value),
    },
    DocumentKind.PORTFOLIO: {
        "meta": _meta_check(DocumentKind.PORTFOLIO),
        "trades": _trade,
        "fields": _slot_check(_trade_id_problem, CORRECTABLE_FIELDS, _portfolio_slot_value),
    },
    DocumentKind.INDEX: {
        "meta": _meta_check(DocumentKind.INDEX),
        "documents": _index_entry,
    },
}


def _show(key: str) -> str:
    """A key quoted for a message: control characters escaped, long keys cut."""
    cut = key if len(key) <= _SHOWN_KEY else key[:_SHOWN_KEY]
    out = []
    for c in cut:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 32 or 0x7F <= ord(c) < 0xA0:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return '"' + "".join(out) + ('…"' if len(key) > _SHOWN_KEY else '"')


# -- the candidate ---------------------------------------------------------------------------


def _sequence(doc: Doc[Any], root: str) -> list[tuple[str, str]]:
    """The root's sequence items (Y.Array / Y.Text / Y.Xml use), comparable across two reads."""
    return [(type(item).__name__, str(item)) for item in doc.get(root, type=Array)]


def _is_subsequence(part: list[tuple[str, str]], whole: list[tuple[str, str]]) -> bool:
    remaining = iter(whole)
    return all(item in remaining for item in part)


def _legacy_view(doc: Doc[Any], root: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    return (
        {k: str(v) for k, v in doc.get(root, type=Map).items()},
        _sequence(doc, root),
    )


class Candidate:
    """A document as it would be after one update: base copied, update applied, what changed.

    Built by :func:`candidate` (or :func:`advance_scratch`); :meth:`check` decides.
    """

    __slots__ = ("_added", "_base_size", "_problems", "_size_bound", "changed", "doc", "kind")

    kind: DocumentKind
    doc: Doc[Any]
    changed: Mapping[str, frozenset[str]]

    def __init__(
        self,
        kind: DocumentKind,
        doc: Doc[Any],
        changed: Mapping[str, frozenset[str]],
        *,
        added: Mapping[str, int],
        problems: list[str],
        base_size: int | None,
        size_bound: int | None,
    ) -> None:
        self.kind = kind
        self.doc = doc
        self.changed = changed
        self._added = added  # root -> keys the update added (not present before)
        self._problems = problems  # root-level faults found while applying
        self._base_size = base_size  # the exact encoded size before, when known
        self._size_bound = size_bound  # an upper bound of the encoded size after, when known

    def check(self, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
        """Raise SchemaViolation if the change breaks the kind's layout (the first fault found).

        Invariants: the document is only read; a deleted key always passes; a key the update
        did not change is not looked at; a count is checked only for a root the update added
        keys to; the size only when the document grew past the limit.
        """
        if self._problems:
            raise SchemaViolation(self._problems[0])
        with self.doc.transaction():  # one for all the reads, not one per read
            self._check_entries(limits)
            self._check_counts(limits)
            self._check_size(limits)

    def _check_entries(self, limits: SchemaLimits) -> None:
        checks = _CHECKS[self.kind]
        for root, keys in self.changed.items():
            if not keys:
                continue
            check = checks[root]
            values = self.doc.get(root, type=Map)
            for key in sorted(keys):
                if key not in values:
                    continue  # deleted: always allowed
                value = values[key]
                problem = _plain_problem(value) or check(key, value, limits)
                if problem is not None:
                    raise SchemaViolation(f"{root}[{_show(key)}]: {problem}")

    def _check_counts(self, limits: SchemaLimits) -> None:
        for root, limit, what in self._counted(limits):
            if not self._added.get(root):
                continue
            values = self.doc.get(root, type=Map)
            if len(values) <= limit:
                continue
            if root == "symbols":
                count = len({key.partition(_SEP)[0] for key in values.keys()})  # noqa: SIM118
            else:
                count = len(values)
            if count > limit:
                raise SchemaViolation(f"{root}: more than {limit} {what} ({count})")

    def _counted(self, limits: SchemaLimits) -> Iterable[tuple[str, int, str]]:
        if self.kind is DocumentKind.WATCHLIST:
            yield ("symbols", limits.max_symbols, "distinct symbols")
            yield ("fields", limits.max_slots, "slots")
        elif self.kind is DocumentKind.PORTFOLIO:
            yield ("trades", limits.max_trades, "trades")
            yield ("fields", limits.max_slots, "slots")
        else:
            yield ("documents", limits.max_index_entries, "documents")

    def _check_size(self, limits: SchemaLimits) -> None:
        limit = limits.max_document_bytes
        if self._size_bound is not None and self._size_bound <= limit:
            return
        size = len(self.doc.get_update())
        self._size_bound = size
        if size > limit and (self._base_size is None or size > self._base_size):
            raise SchemaViolation(f"the document would take {size} bytes, over {limit}")

    @property
    def size_bound(self) -> int | None:
        """An upper bound of the encoded size after the change, exact whenever :meth:`check`
        found the bound past the limit; None when unknown. Read after :meth:`check` passed, it
        is a sound ``base_size`` for the next :func:`advance_scratch`."""
        return self._size_bound

    def model(self) -> DocumentModel:
        """A Watchlist / Portfolio / UserIndex over :attr:`doc`, for extensions that count or
        read (close it when done: it observes the document)."""
        return _MODELS[self.kind](self.doc, EditContext(device="schema"))


class _Recorder:
    """Collects the keys one root's events name: its own keys set or deleted, and the key
    holding any nested type edited inside it.

    A callable with a ready ``__signature__``: pycrdt inspects every observer's signature when
    it subscribes, which for a plain function costs more than the rest of a small check.
    """

    __slots__ = ("added", "changed")
    __signature__ = inspect.signature(lambda events: None)

    def __init__(self) -> None:
        self.changed: set[str] = set()
        self.added = 0  # keys the update added (not present before)

    def __call__(self, events: list[Any]) -> None:
        for event in events:
            path = event.path
            if path:
                self.changed.add(str(path[0]))  # inside a nested type: that key changed
            elif isinstance(event, MapEvent):
                keys: dict[str, dict[str, Any]] = getattr(event, "keys", {})  # an untyped slot
                for key, change in keys.items():
                    self.changed.add(key)
                    if change["action"] == "add":
                        self.added += 1


class ScratchObservers:
    """The root maps of a scratch replica and their observers, kept from one checked update to
    the next (:func:`advance_scratch`): subscribing and unsubscribing three deep observers per
    update was a third of the check. Between checks the observers see whatever else the
    scratch takes (a peer's update); each check starts them afresh."""

    __slots__ = ("_doc", "_subscriptions", "recorders")

    def __init__(self, kind: DocumentKind, doc: Doc[Any]) -> None:
        self._doc = doc
        with doc.transaction():
            # Declared as maps first: a root's first declaration fixes its type (see _apply).
            maps = {name: doc.get(name, type=Map) for name in ROOTS[kind]}
        self.recorders = {name: _Recorder() for name in maps}
        # Kept: a subscription that is collected stops observing.
        self._subscriptions = [
            (root, root.observe_deep(self.recorders[name])) for name, root in maps.items()
        ]

    def observes(self, doc: Doc[Any]) -> bool:
        return self._doc is doc

    def restart(self) -> dict[str, _Recorder]:
        for recorder in self.recorders.values():
            recorder.changed = set()
            recorder.added = 0
        return self.recorders


def _apply(
    kind: DocumentKind,
    doc: Doc[Any],
    update: bytes,
    *,
    base_size: int | None,
    size_known: bool,
    observers: ScratchObservers | None = None,
) -> Candidate:
    """Apply ``update`` to ``doc`` (the caller's copy), recording what it changed."""
    roots = ROOTS[kind]
    with doc.transaction():  # one for all the reads, not one per read
        before_roots = set(doc.keys())
        # Declared as maps first: a root's first declaration fixes its type, and with it the
        # kind of events its observers get (reading it as an Array below must not make it one).
        maps = {} if observers is not None else {name: doc.get(name, type=Map) for name in roots}
        legacy = {name: _legacy_view(doc, name) for name in before_roots if name not in roots}
        sequence_before = {name: len(doc.get(name, type=Array)) for name in roots}
        sequences = {name: _sequence(doc, name) for name, n in sequence_before.items() if n}
    if observers is not None:
        recorders = observers.restart()
        _guarded_apply(doc, update)
    else:
        recorders = {name: _Recorder() for name in roots}
        subscriptions = [(m, m.observe_deep(recorders[name])) for name, m in maps.items()]
        try:
            _guarded_apply(doc, update)
        finally:
            for m, subscription in subscriptions:
                m.unobserve(subscription)
    _refuse_pending(doc, update)

    problems: list[str] = []
    with doc.transaction():
        foreign = f"not a root of {'an' if kind is DocumentKind.INDEX else 'a'} {kind.value}"
        foreign += f" ({', '.join(roots)})"
        for name in sorted(set(doc.keys()) - before_roots - set(roots)):
            problems.append(f"{_show(name)}: {foreign}")
        for name, (entries, items) in legacy.items():
            entries_after, items_after = _legacy_view(doc, name)
            deleted_only = all(entries.get(k) == v for k, v in entries_after.items())
            if not deleted_only or not _is_subsequence(items_after, items):
                problems.append(f"{_show(name)}: {foreign}")
        for name in roots:
            after = len(doc.get(name, type=Array))
            if after > sequence_before[name] or (
                after and not _is_subsequence(_sequence(doc, name), sequences.get(name, []))
            ):
                problems.append(
                    f"{name}: a root map, not a sequence (Y.Array, Y.Text or Y.Xml use)"
                )
    size_bound = None
    if size_known and base_size is not None:
        size_bound = base_size + _SPLIT_FACTOR * len(update) + _SPLIT_SLACK
    return Candidate(
        kind,
        doc,
        {name: frozenset(r.changed) for name, r in recorders.items()},
        added={name: r.added for name, r in recorders.items()},
        problems=problems,
        base_size=base_size if size_known else None,
        size_bound=size_bound,
    )


def _refuse_pending(doc: Doc[Any], update: bytes) -> None:
    """MissingDependencies if items of ``update`` wait, unintegrated, for items the document
    lacks: they are invisible now and would appear, never checked, with a later update that
    supplies what they wait for (a copy of the base does not even hold them: pycrdt encodes no
    pending items). The relay refuses such updates before this, from the state vector."""
    try:
        rest = get_update(update, doc.get_state())
    except BaseException as exc:  # pycrdt's Rust panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise BadUpdate("the update is not a valid CRDT update") from exc
    if rest[:1] != b"\x00":  # any client with structs the document did not integrate
        raise MissingDependencies("the update refers to items the document does not hold")


def _guarded_apply(doc: Doc[Any], update: bytes) -> None:
    try:
        doc.apply_update(update)
    except BaseException as exc:  # pycrdt's Rust panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise BadUpdate("the update is not a valid CRDT update") from exc


def candidate(kind: DocumentKind, base: Doc[Any], update: bytes) -> Candidate:
    """The document ``base`` would become with ``update``, in a copy (``base`` is not touched).

    BadUpdate if pycrdt cannot apply the bytes. The copy costs about as much as encoding and
    decoding the whole base (1.6 ms for a watchlist of 1,000 symbols); see
    :func:`advance_scratch` for a way around it.
    """
    state = base.get_update()
    copy: Doc[Any] = Doc()
    copy.apply_update(state)
    return _apply(kind, copy, update, base_size=len(state), size_known=True)


def advance_scratch(
    kind: DocumentKind,
    scratch: Doc[Any],
    update: bytes,
    *,
    base_size: int | None = None,
    observers: ScratchObservers | None = None,
) -> Candidate:
    """Apply ``update`` to ``scratch`` itself, a replica of the base the caller keeps, and
    return it as the candidate: no copy per update.

    The trade-off: the caller holds every document twice in memory, and must advance the
    scratch with every update the base takes (else the check judges a stale document). A
    refused update stays in the scratch, which CRDT updates cannot take back: after a
    refusal (or a BadUpdate) the caller must drop the scratch and rebuild it from the base,
    which costs one copy, as :func:`candidate` pays on every update. ``base_size`` is the
    scratch's encoded size before (the previous candidate's :attr:`Candidate.size_bound` is
    good enough); without it the size is computed exactly, by encoding the document.
    ``observers`` (made once per scratch, :class:`ScratchObservers`) spares subscribing to its
    roots at every update.
    """
    if observers is not None and not observers.observes(scratch):
        raise ValueError("these observers watch another scratch replica")
    return _apply(
        kind,
        scratch,
        update,
        base_size=base_size,
        size_known=base_size is not None,
        observers=observers,
    )


def check_document(
    kind: DocumentKind, doc: Doc[Any], limits: SchemaLimits = DEFAULT_LIMITS
) -> None:
    """Check every entry of ``doc`` (not only a change), for tools and tests; SchemaViolation
    for the first fault. ``doc`` is not touched."""
    _apply(kind, Doc(), doc.get_update(), base_size=0, size_known=False).check(limits)
