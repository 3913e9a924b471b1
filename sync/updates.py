"""Reading a Yjs V1 update before anything of it is applied.

pycrdt applies a V2 update as a silent no-op and keeps invisible what refers to items it has
never seen, so a relay that applied
first and looked afterwards would acknowledge changes it lost. :func:`decode_update` reads the
bytes the way Yjs writes them (``readClientsStructRefs``, ``readDeleteSet`` and the content
readers of yjs 13.6, lib0's var-ints, var-strings and ``any``) and either returns what the update
carries and refers to, or refuses it with :class:`~foliosync.sync.errors.BadUpdate`;
:func:`missing_dependencies` then tells, against the receiver's state vector, whether everything
it refers to is there.

Where Yjs and yrs (the Rust library inside pycrdt) read the same bytes differently, the decoder
refuses them, so that what it accepts means the same to a JavaScript peer and to the relay:

- a var-int past the width yrs keeps (clocks and lengths are 32 bits there, clients 53 bits as
  in JavaScript), which yrs would silently wrap;
- strings that are not UTF-8, which yrs does not check;
- legacy JSON content (ref 2), which yrs reads one element longer than Yjs writes it, and
  ``Y.XmlHook`` types, whose name yrs does not read;
- JSON (embeds, format values) that yrs' parser refuses: NaN, infinities, unpaired surrogates,
  more than :data:`MAX_NESTING` levels;
- counts no update of that size could hold, so that nothing is allocated for them;
- a client listed with no structs, which yrs panics on when the receiver has that client (its
  ``BlockSet::exclude`` takes the first struct unchecked).

The decoder itself is bounded by the input: every loop consumes bytes, nesting is limited, and
no count is trusted before the bytes it promises are there.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from foliosync.sync.errors import BadUpdate, MissingDependencies, UpdateV2

__all__ = [
    "MAX_NESTING",
    "UpdateInfo",
    "check_update",
    "decode_state_vector",
    "decode_update",
    "missing_dependencies",
]

MAX_NESTING = 100
"""Deepest nesting of ``any`` values and JSON accepted: yrs' JSON parser stops at 128, and its
``any`` reader recurses on the native stack, which a deep enough value would overflow."""

_U32 = 0xFFFF_FFFF  # yrs keeps clocks and lengths in u32 and wraps larger var-ints
_MAX_CLIENT = (1 << 53) - 1  # a client id must survive a JavaScript number
_MAX_INT = (1 << 53) - 1  # lib0's readVarInt refuses more
_FLOAT_MAX = int(sys.float_info.max)
_EMPTY: Mapping[Any, Any] = MappingProxyType({})

# Content refs (the low five bits of a struct's info byte).
_GC, _DELETED, _JSON, _BINARY, _STRING, _EMBED, _FORMAT, _TYPE, _ANY, _DOC, _SKIP = range(11)
_HAS_ORIGIN, _HAS_RIGHT_ORIGIN, _HAS_PARENT_SUB = 0x80, 0x40, 0x20
_TYPE_XML_ELEMENT, _TYPE_XML_HOOK, _TYPE_REFS = 3, 5, 7
_CONTENT_NAMES = (
    "GC",
    "deleted",
    "JSON",
    "binary",
    "string",
    "embed",
    "format",
    "type",
    "any",
    "subdocument",
    "skip",
)


@dataclass(frozen=True, slots=True)
class UpdateInfo:
    """What one V1 update carries and what it needs from its receiver.

    ``structs`` gives each client's span from its first to past its last struct (Skips, which
    stand for structs the update does not carry, neither start nor end a span); ``covered`` the
    exact ranges within it, split where a Skip leaves a hole. ``dependencies`` are the IDs its
    items name as origin, right origin or parent that fall outside ``covered``.
    """

    structs: Mapping[int, tuple[int, int]]
    dependencies: frozenset[tuple[int, int]]
    deletions: Mapping[int, tuple[tuple[int, int], ...]]
    roots: frozenset[str]
    has_skips: bool
    covered: Mapping[int, tuple[tuple[int, int], ...]] = field(
        default_factory=lambda: _EMPTY, compare=False
    )

    def is_empty(self) -> bool:
        """No structs and no deletions: applying it changes nothing anywhere."""
        return not self.structs and not self.deletions

    def _ranges(self, client: int) -> tuple[tuple[int, int], ...]:
        ranges = self.covered.get(client)
        if ranges is not None:
            return ranges
        span = self.structs.get(client)
        return (span,) if span is not None else ()


def _fail(what: str, pos: int) -> BadUpdate:
    return BadUpdate(f"not a Yjs V1 update: {what} at byte {pos}")


def _uint_tail(buf: bytes, pos: int, first: int, limit: int, what: str) -> tuple[int, int]:
    """The rest of a var-uint whose first byte ``first`` had its continuation bit set.

    ``limit`` is the largest value the field may hold, and the encoding may be no longer than
    its width needs (5 bytes for 32 bits, 8 for 53): lib0 and yrs both accept zero continuation
    bytes, but past the field's width yrs wraps the value where lib0 does not.
    """
    value = first & 0x7F
    shift = 7
    max_shift = limit.bit_length()
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= max_shift:
            raise _fail(f"a var-int {what} longer than {limit.bit_length()} bits", pos)
    if value > limit:
        raise _fail(f"{what} {value} out of range", pos)
    return value, pos


def _uint(buf: bytes, pos: int, limit: int, what: str) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    return _uint_tail(buf, pos + 1, b, limit, what)


def _count(buf: bytes, pos: int, per_item: int, what: str) -> tuple[int, int]:
    """A count of things that take at least ``per_item`` bytes each, checked against what is
    left, so that no reader (ours, lib0 or yrs) reserves room for a count the bytes cannot
    hold."""
    b = buf[pos]
    if b < 0x80:
        value, pos = b, pos + 1
    else:
        value, pos = _uint_tail(buf, pos + 1, b, _U32, what)
    if value * per_item > len(buf) - pos:
        raise _fail(f"{value} {what} but only {len(buf) - pos} bytes left", pos)
    return value, pos


def _string(buf: bytes, pos: int, what: str) -> tuple[str, int]:
    b = buf[pos]
    if b < 0x80:
        size, pos = b, pos + 1
    else:
        size, pos = _uint_tail(buf, pos + 1, b, _U32, f"{what} length")
    end = pos + size
    if end > len(buf):
        raise _fail(f"{what} of {size} bytes past the end", pos)
    try:
        return buf[pos:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise _fail(f"{what} that is not UTF-8", pos) from None


def _skip_bytes(buf: bytes, pos: int, what: str) -> int:
    b = buf[pos]
    if b < 0x80:
        size, pos = b, pos + 1
    else:
        size, pos = _uint_tail(buf, pos + 1, b, _U32, f"{what} length")
    end = pos + size
    if end > len(buf):
        raise _fail(f"{what} of {size} bytes past the end", pos)
    return end


def _skip_int(buf: bytes, pos: int) -> int:
    """Skip lib0's signed var-int (sign in bit 6 of the first byte), refusing more than 53
    bits of magnitude as lib0 does."""
    b = buf[pos]
    pos += 1
    if b < 0x80:
        return pos
    shift = 6
    value = b & 0x3F
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 53:
            raise _fail("a var-int longer than 53 bits", pos)
    if value > _MAX_INT:
        raise _fail(f"integer {value} out of range", pos)
    return pos


def _skip_string(buf: bytes, pos: int, what: str) -> int:
    """Where the var-string at ``pos`` ends, once it is known to be UTF-8."""
    size = buf[pos]
    if size < 0x80:  # the short string of a key or a stamp, read inline
        pos += 1
        end = pos + size
        if end > len(buf):
            raise _fail(f"{what} of {size} bytes past the end", pos)
        try:
            buf[pos:end].decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(f"{what} that is not UTF-8", pos) from None
        return end
    return _string(buf, pos, what)[1]


def _skip_any(buf: bytes, pos: int, depth: int) -> int:
    """Skip one lib0 ``any`` value (the tags of ``readAnyLookupTable``, 127 down to 116)."""
    tag = buf[pos]
    pos += 1
    if tag == 119:  # string
        return _skip_string(buf, pos, "a string")
    if tag == 125:  # integer
        return _skip_int(buf, pos)
    if tag == 127 or tag == 126 or tag == 121 or tag == 120:  # undefined, null, false, true
        return pos
    if tag == 123 or tag == 122:  # float64, bigint64
        if pos + 8 > len(buf):
            raise _fail("a number past the end", pos)
        return pos + 8
    if tag == 124:  # float32
        if pos + 4 > len(buf):
            raise _fail("a number past the end", pos)
        return pos + 4
    if tag == 116:  # bytes
        return _skip_bytes(buf, pos, "a byte array")
    if tag == 118 or tag == 117:  # object, array
        if depth >= MAX_NESTING:
            raise _fail(f"values nested deeper than {MAX_NESTING}", pos)
        if tag == 118:
            size, pos = _count(buf, pos, 2, "object entries")
            for _ in range(size):
                pos = _skip_string(buf, pos, "an object key")
                tag = buf[pos]
                if tag == 119:
                    pos = _skip_string(buf, pos + 1, "a string")
                else:
                    pos = _skip_any(buf, pos, depth + 1)
        else:
            size, pos = _count(buf, pos, 1, "array elements")
            for _ in range(size):
                pos = _skip_any(buf, pos, depth + 1)
        return pos
    raise _fail(f"unknown value tag {tag}", pos - 1)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_limits(value: Any) -> tuple[int, bool]:
    """How deep ``value`` nests, and whether a number in it is past float64 (serde_json refuses
    such a literal where Python's parser makes it infinity or a long int). Iterative, as the
    value may be nested as deep as Python's parser allows."""
    deepest, out_of_range = 0, False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, float):
            out_of_range = out_of_range or not math.isfinite(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            out_of_range = out_of_range or not -_FLOAT_MAX <= item <= _FLOAT_MAX
    return deepest, out_of_range


def _check_json(text: str, pos: int) -> None:
    """Refuse what ``JSON.parse`` or yrs' serde_json would refuse (the stricter of the two)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise _fail("JSON content that does not parse", pos) from None
    deepest, out_of_range = _json_limits(value)
    if out_of_range:
        raise _fail("a JSON number out of range", pos)
    if deepest > MAX_NESTING:
        raise _fail(f"JSON nested deeper than {MAX_NESTING}", pos)
    if "\\u" in text:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _fail("JSON with an unpaired surrogate", pos) from None


def _string_length(buf: bytes, pos: int) -> tuple[int, int]:
    """A string item's clock length, in UTF-16 code units as Yjs (and yrs) count it."""
    b = buf[pos]
    if b < 0x80:
        size, pos = b, pos + 1
    else:
        size, pos = _uint_tail(buf, pos + 1, b, _U32, "string length")
    end = pos + size
    if end > len(buf):
        raise _fail(f"a string of {size} bytes past the end", pos)
    try:
        text = buf[pos:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("a string that is not UTF-8", pos) from None
    if len(text) == size:  # ASCII: one unit per byte
        return size, end
    return len(text.encode("utf-16-le")) >> 1, end


def _decode_v1(buf: bytes, max_structs: int) -> UpdateInfo:
    n = len(buf)
    structs: dict[int, tuple[int, int]] = {}
    covered: dict[int, tuple[tuple[int, int], ...]] = {}
    refs: list[tuple[int, int]] = []
    roots: set[str] = set()
    parents: list[tuple[int, int]] = []  # parent IDs, to check those inside the update
    types: set[tuple[int, int]] = set()  # IDs of the update's type items
    dead: list[tuple[int, int, int]] = []  # (client, start, end) of its GCs and deleted items
    has_skips = False
    total = 0

    clients, pos = _count(buf, 0, 3, "clients")
    for _ in range(clients):
        count, pos = _count(buf, pos, 2, "structs")
        total += count
        if total > max_structs:
            raise _fail(f"more than {max_structs} structs", pos)
        b = buf[pos]
        if b < 0x80:
            client, pos = b, pos + 1
        else:
            client, pos = _uint_tail(buf, pos + 1, b, _MAX_CLIENT, "client")
        if client in covered:
            raise _fail(f"client {client} twice", pos)
        if not count:  # yrs panics on one for a client the receiver has; Yjs never writes one
            raise _fail(f"client {client} with no structs", pos)
        b = buf[pos]
        if b < 0x80:
            clock, pos = b, pos + 1
        else:
            clock, pos = _uint_tail(buf, pos + 1, b, _U32, "clock")
        ranges: list[tuple[int, int]] = []
        start = -1  # start of the current run of carried structs, -1 after a Skip
        for _ in range(count):
            info = buf[pos]
            pos += 1
            ref = info & 0x1F
            if ref in (_GC, _SKIP):
                if info != ref:
                    raise _fail(f"info bits {info:#04x} on a {_CONTENT_NAMES[ref]}", pos - 1)
                b = buf[pos]
                if b < 0x80:
                    length, pos = b, pos + 1
                else:
                    length, pos = _uint_tail(buf, pos + 1, b, _U32, "length")
                if length == 0:
                    raise _fail(f"a {_CONTENT_NAMES[ref]} of length 0", pos)
                if ref == _SKIP:
                    has_skips = True
                    if start >= 0:
                        ranges.append((start, clock))
                        start = -1
                else:
                    dead.append((client, clock, clock + length))
                    if start < 0:
                        start = clock
                clock += length
                if clock > _U32:
                    raise _fail(f"client {client}'s clock past 2^32", pos)
                continue
            if ref > _DOC:
                raise _fail(f"unknown content ref {ref}", pos - 1)
            marks = len(refs), len(parents)
            root = None
            if info & 0xC0:  # an origin, a right origin or both
                for flag in (_HAS_ORIGIN, _HAS_RIGHT_ORIGIN):
                    if info & flag:
                        ref_client, pos = _uint(buf, pos, _MAX_CLIENT, "client")
                        ref_clock, pos = _uint(buf, pos, _U32, "clock")
                        if ref_client == client and ref_clock >= clock:
                            raise _fail(f"{client}:{clock} refers to itself or later", pos)
                        refs.append((ref_client, ref_clock))
            else:
                parent_info = buf[pos]
                pos += 1
                if parent_info == 1:
                    root, pos = _string(buf, pos, "a root name")
                elif parent_info == 0:
                    ref_client, pos = _uint(buf, pos, _MAX_CLIENT, "client")
                    ref_clock, pos = _uint(buf, pos, _U32, "clock")
                    if ref_client == client and ref_clock >= clock:
                        raise _fail(f"{client}:{clock} refers to itself or later", pos)
                    refs.append((ref_client, ref_clock))
                    parents.append((ref_client, ref_clock))
                else:
                    raise _fail(f"parent info {parent_info}", pos - 1)
                if info & _HAS_PARENT_SUB:
                    pos = _skip_string(buf, pos, "a map key")
            # The content (readItemContent); ``length`` is how far it moves the clock.
            if ref == _STRING:
                length, pos = _string_length(buf, pos)
            elif ref == _ANY:
                length, pos = _count(buf, pos, 1, "values")
                for _ in range(length):
                    pos = _skip_any(buf, pos, 0)
            elif ref == _DELETED:
                b = buf[pos]
                if b < 0x80:
                    length, pos = b, pos + 1
                else:
                    length, pos = _uint_tail(buf, pos + 1, b, _U32, "length")
            elif ref == _TYPE:
                type_ref = buf[pos]
                pos += 1
                if type_ref >= _TYPE_REFS:
                    raise _fail(f"unknown type ref {type_ref}", pos - 1)
                if type_ref == _TYPE_XML_HOOK:
                    raise _fail("a Y.XmlHook, which pycrdt cannot read", pos - 1)
                if type_ref == _TYPE_XML_ELEMENT:
                    pos = _string(buf, pos, "an element name")[1]
                length = 1
            elif ref == _BINARY:
                pos = _skip_bytes(buf, pos, "binary content")
                length = 1
            elif ref in (_EMBED, _FORMAT):
                if ref == _FORMAT:
                    pos = _string(buf, pos, "a format key")[1]
                text, end = _string(buf, pos, "JSON content")
                _check_json(text, pos)
                pos = end
                length = 1
            elif ref == _DOC:
                pos = _string(buf, pos, "a subdocument guid")[1]
                pos = _skip_any(buf, pos, 0)
                length = 1
            else:  # _JSON
                raise _fail("legacy JSON content, which pycrdt misreads", pos - 1)
            if length == 0:
                # yrs drops an empty item (old Yjs versions wrote some): it neither takes a
                # clock nor refers to anything.
                del refs[marks[0] :], parents[marks[1] :]
                continue
            if root is not None:
                roots.add(root)
            if ref == _TYPE:
                types.add((client, clock))
            elif ref == _DELETED:
                dead.append((client, clock, clock + length))
            if start < 0:
                start = clock
            clock += length
            if clock > _U32:
                raise _fail(f"client {client}'s clock past 2^32", pos)
        if start >= 0:
            ranges.append((start, clock))
        covered[client] = tuple(ranges)
        if ranges:
            structs[client] = (ranges[0][0], ranges[-1][1])

    deletions: dict[int, tuple[tuple[int, int], ...]] = {}
    seen: set[int] = set()
    delete_clients, pos = _count(buf, pos, 2, "delete set clients")
    for _ in range(delete_clients):
        b = buf[pos]
        if b < 0x80:
            client, pos = b, pos + 1
        else:
            client, pos = _uint_tail(buf, pos + 1, b, _MAX_CLIENT, "client")
        if client in seen:
            raise _fail(f"client {client} twice in the delete set", pos)
        seen.add(client)
        count, pos = _count(buf, pos, 2, "deleted ranges")
        found: list[tuple[int, int]] = []
        for _ in range(count):
            b = buf[pos]
            if b < 0x80:
                clock, pos = b, pos + 1
            else:
                clock, pos = _uint_tail(buf, pos + 1, b, _U32, "clock")
            b = buf[pos]
            if b < 0x80:
                length, pos = b, pos + 1
            else:
                length, pos = _uint_tail(buf, pos + 1, b, _U32, "length")
            if clock + length > _U32:
                raise _fail(f"a deleted range of client {client} past 2^32", pos)
            if length:
                found.append((clock, length))
        if found:
            deletions[client] = tuple(found)
    if pos != n:
        raise _fail(f"{n - pos} bytes after the update", pos)

    dependencies: set[tuple[int, int]] = set()
    for ref_client, ref_clock in refs:
        ranges_of = covered.get(ref_client)
        if ranges_of is not None and any(s <= ref_clock < e for s, e in ranges_of):
            continue
        dependencies.add((ref_client, ref_clock))
    for parent_id in parents:
        # yrs refuses a parent that is neither a type nor deleted; one the update carries can
        # be checked here (one the receiver has only by the receiver).
        if parent_id in dependencies or parent_id in types:
            continue
        ref_client, ref_clock = parent_id
        if not any(c == ref_client and s <= ref_clock < e for c, s, e in dead):
            raise _fail(f"a parent {ref_client}:{ref_clock} that is not a type", n)
    return UpdateInfo(
        structs=structs,
        dependencies=frozenset(dependencies),
        deletions=deletions,
        roots=frozenset(roots),
        has_skips=has_skips,
        covered=covered,
    )


def _looks_like_v2(buf: bytes) -> bool:
    """Whether ``buf`` has the layout of ``UpdateDecoderV2``: feature flag 0, nine
    length-prefixed column buffers, then the rest (struct counts and the delete set).

    Asked only of bytes that are not one V1 update, so a real V1 update is never called V2 (the
    empty V1 update ``00 00`` has nothing after its two zeros).
    """
    n = len(buf)
    if n < 12 or buf[0] != 0:
        return False
    pos = 1
    try:
        for _ in range(9):
            size, pos = _uint(buf, pos, _U32, "column length")
            pos += size
            if pos > n:
                return False
    except (BadUpdate, IndexError):
        return False
    return n - pos >= 2


def decode_update(data: bytes, *, max_structs: int = 1_000_000) -> UpdateInfo:
    """Read ``data`` as exactly one Yjs V1 update, or refuse it.

    Raises :class:`UpdateV2` for a V2 update and :class:`BadUpdate` for anything else that is
    not one complete V1 update (cut short, followed by more bytes, or holding what neither Yjs
    nor yrs could read the same way). Reads at most ``max_structs`` structs.
    """
    buf = bytes(data)
    try:
        return _decode_v1(buf, max_structs)
    except IndexError:
        error = BadUpdate(f"not a Yjs V1 update: cut short ({len(buf)} bytes)")
    except BadUpdate as exc:
        error = exc
    if _looks_like_v2(buf):
        raise UpdateV2(
            "a Yjs V2 update (encodeStateAsUpdateV2); the protocol carries V1 updates "
            "(encodeStateAsUpdate)"
        ) from error
    raise error


def decode_state_vector(data: bytes) -> dict[int, int]:
    """Read ``data`` as exactly one Yjs state vector (client -> next clock), or raise
    :class:`BadUpdate`."""
    buf = bytes(data)
    state: dict[int, int] = {}
    try:
        count, pos = _count(buf, 0, 2, "clients")
        for _ in range(count):
            client, pos = _uint(buf, pos, _MAX_CLIENT, "client")
            clock, pos = _uint(buf, pos, _U32, "clock")
            if client in state:
                raise BadUpdate(f"not a Yjs state vector: client {client} twice")
            state[client] = clock
    except IndexError:
        raise BadUpdate(f"not a Yjs state vector: cut short ({len(buf)} bytes)") from None
    except BadUpdate as exc:
        raise BadUpdate(str(exc).replace("a Yjs V1 update", "a Yjs state vector")) from None
    if pos != len(buf):
        raise BadUpdate(f"not a Yjs state vector: {len(buf) - pos} bytes after it")
    return state


def missing_dependencies(
    info: UpdateInfo, state: Mapping[int, int], *, deletions: bool = True
) -> list[str]:
    """Why a receiver at ``state`` (client -> next clock) cannot take ``info`` in full, in words;
    empty when it can.

    Three things are missing: structs of a client that start past the receiver's clock for it
    (yrs would integrate them, but its state vector would never cover them, so no state-vector
    sync would send what lies between); an origin, right origin or parent the receiver does not
    have and the update does not carry; a deletion of items the receiver does not have and the
    update does not carry (Yjs and yrs keep such a deletion pending, unseen). With
    ``deletions=False`` the last are not counted: a relay takes them, as Yjs does.
    """
    reasons: list[str] = []
    for client in sorted(info.structs):
        have = state.get(client, 0)
        for start, end in info._ranges(client):
            if start > have:
                reasons.append(
                    f"client {client}'s structs from clock {start} but the receiver has its "
                    f"clocks only up to {have}"
                )
                break
            have = max(have, end)
    for client, clock in sorted(info.dependencies):
        if clock >= state.get(client, 0):
            reasons.append(f"a reference to item {client}:{clock}, which the receiver lacks")
    for client in sorted(info.deletions) if deletions else ():
        have = state.get(client, 0)
        ranges = info._ranges(client)
        for clock, length in info.deletions[client]:
            end = clock + length
            if end <= have:
                continue
            lacking = [(max(clock, have), end)]
            for start, stop in ranges:
                lacking = [
                    piece
                    for a, b in lacking
                    for piece in ((a, min(b, start)), (max(a, stop), b))
                    if piece[0] < piece[1]
                ]
            if lacking:
                a, b = lacking[0]
                reasons.append(
                    f"a deletion of items {client}:{a}..{b - 1}, which the receiver lacks"
                )
    return reasons


def check_update(data: bytes, state: Mapping[int, int], *, deletions: bool = True) -> UpdateInfo:
    """:func:`decode_update`, then refuse with :class:`MissingDependencies` an update that
    refers to what a receiver at ``state`` lacks (see :func:`missing_dependencies`)."""
    info = decode_update(data)
    reasons = missing_dependencies(info, state, deletions=deletions)
    if reasons:
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        raise MissingDependencies(f"the update needs what the receiver lacks: {reasons[0]}{more}")
    return info
