"""Which edits a Yjs update (v1 encoding, as pycrdt writes it) carries: the items of each client.

The fan-out benchmarks count edits as they arrive and match each to its send time by (client,
clock). With one editor, a merged update is one client's block and its header says how many
edits it holds. With several editors the relay merges their changes into one update of several
client blocks, and reaching the second block means walking the first one's structs, whose
contents have variable lengths. This walks them (Yjs' ``readClientsStructRefs``: items, GC and
skip structs, every content type) without building anything; the delete set after the blocks is
not needed. pycrdt has no call for it: ``get_state`` of an update that does not start at clock 0
says nothing about it.
"""

from __future__ import annotations

import functools

__all__ = ["read_varuint", "update_items", "walk_structs"]


def read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    """A lib0 varuint at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _skip_varint(data: bytes, pos: int) -> int:
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = read_varuint(data, pos)
    return data[pos : pos + size], pos + size


def _skip_any(data: bytes, pos: int) -> int:
    """One lib0 ``writeAny`` value."""
    tag = data[pos]
    pos += 1
    if tag in (127, 126, 121, 120):  # undefined, null, false, true
        return pos
    if tag == 125:  # integer (lib0 varint)
        return _skip_varint(data, pos)
    if tag == 124:  # float32
        return pos + 4
    if tag in (123, 122):  # float64, bigint64
        return pos + 8
    if tag in (119, 116):  # string, Uint8Array
        size, pos = read_varuint(data, pos)
        return pos + size
    if tag == 118:  # object
        count, pos = read_varuint(data, pos)
        for _ in range(count):
            _, pos = _string(data, pos)
            pos = _skip_any(data, pos)
        return pos
    if tag == 117:  # array
        count, pos = read_varuint(data, pos)
        for _ in range(count):
            pos = _skip_any(data, pos)
        return pos
    raise ValueError(f"unknown lib0 any tag {tag}")


def _skip_content(data: bytes, pos: int, ref: int) -> tuple[int, int]:
    """(length in clock units, position after) of an item's content of type ``ref``."""
    if ref == 1:  # deleted
        size, pos = read_varuint(data, pos)
        return size, pos
    if ref == 2:  # JSON: strings
        count, pos = read_varuint(data, pos)
        for _ in range(count):
            _, pos = _string(data, pos)
        return count, pos
    if ref in (3, 5):  # binary, embed
        _, pos = _string(data, pos)
        return 1, pos
    if ref == 4:  # string: its length in UTF-16 code units
        text, pos = _string(data, pos)
        return len(text.decode("utf-8").encode("utf-16-le")) // 2, pos
    if ref == 6:  # format: key and value
        _, pos = _string(data, pos)
        _, pos = _string(data, pos)
        return 1, pos
    if ref == 7:  # a type; XML elements and hooks have a name
        type_ref, pos = read_varuint(data, pos)
        if type_ref in (3, 5):
            _, pos = _string(data, pos)
        return 1, pos
    if ref == 8:  # any: values
        count, pos = read_varuint(data, pos)
        for _ in range(count):
            pos = _skip_any(data, pos)
        return count, pos
    if ref == 9:  # a subdocument: guid and options
        _, pos = _string(data, pos)
        return 1, _skip_any(data, pos)
    raise ValueError(f"unknown content type {ref}")


@functools.lru_cache(maxsize=512)
def update_items(update: bytes) -> tuple[tuple[int, int], ...]:
    """(client, clock) of every item in ``update``, block by block. Cached: the relay sends the
    same merged update to every receiver, and a load process holds hundreds of them."""
    return walk_structs(update)[0]


def walk_structs(update: bytes) -> tuple[tuple[tuple[int, int], ...], int]:
    """The items of ``update`` and where its delete set begins."""
    items: list[tuple[int, int]] = []
    blocks, pos = read_varuint(update, 0)
    for _ in range(blocks):
        structs, pos = read_varuint(update, pos)
        client, pos = read_varuint(update, pos)
        clock, pos = read_varuint(update, pos)
        for _ in range(structs):
            info = update[pos]
            pos += 1
            ref = info & 0x1F
            if ref in (0, 10):  # GC, skip
                size, pos = read_varuint(update, pos)
                clock += size
                continue
            if info & 0x80:  # origin
                pos = _skip_varint(update, _skip_varint(update, pos))
            if info & 0x40:  # right origin
                pos = _skip_varint(update, _skip_varint(update, pos))
            if not info & 0xC0:  # no origin: the parent is written
                named, pos = read_varuint(update, pos)
                if named:
                    _, pos = _string(update, pos)
                else:
                    pos = _skip_varint(update, _skip_varint(update, pos))
                if info & 0x20:
                    _, pos = _string(update, pos)
            size, pos = _skip_content(update, pos, ref)
            items.append((client, clock))
            clock += size
    return tuple(items), pos
