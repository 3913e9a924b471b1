"""Hostile inputs: valid frames and updates, then every way a peer can get them wrong.

The mutator is seeded and hand-written, so that any run is reproduced by its seed without
atheris; under atheris it is the custom mutator too, guided by coverage. It knows the shape of
the wire (a msgpack array, a type code, fields of fixed types) and attacks each layer: the bytes
(flips, truncations, splices), the msgpack (random shapes, lengths claimed far past the end,
nesting deeper than any decoder's stack), and the frame (a field of the wrong type, an int past
2^63, an id one character too long, a watermark half set, one field too many).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgpack

__all__ = [
    "HUGE_HEADERS",
    "INTERESTING_INTS",
    "Mutator",
    "deep_nesting",
]

INTERESTING_INTS: tuple[int, ...] = (
    0,
    1,
    -1,
    2,
    3,
    4,
    5,
    10,
    11,
    12,
    13,
    40,
    41,
    42,
    43,
    44,
    45,
    59,
    60,
    127,
    128,
    255,
    256,
    -128,
    -129,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 53) + 1,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    -(1 << 63),
)
"""Boundaries of msgpack's int encodings and of the protocol's uint (2^63 − 1)."""

HUGE_HEADERS: tuple[bytes, ...] = (
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 G items
    b"\xdc\xff\xff",  # array16 of 65535
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xc5\xff\xff",  # bin16
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xda\xff\xff",  # str16
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xd9\xff",  # str8
    b"\xc4\xff",  # bin8
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # int64 min
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # float64 infinity
    b"\xd4\x00\x00",  # fixext1
    b"\xd6\xff\x00\x00\x00\x00",  # the timestamp ext
    b"\xc1",  # never used
)
"""msgpack headers that claim far more than the message holds, or types a frame never has."""


def deep_nesting(depth: int, inner: bytes = b"\xc0") -> bytes:
    """``depth`` one-element arrays around ``inner``: what a recursive decoder or a recursive
    walk over its result cannot survive, if nothing bounds the depth."""
    return b"\x91" * depth + inner


def _random_text(rng: random.Random, length: int) -> str:
    alphabet = rng.choice(
        (
            "abcdefghijklmnopqrstuvwxyz0123456789",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ.-",
            "\x00\x1f\x7f\u00e9\u00df\u03c2\ufb01\U0001f600\u202e/\\'\"",
            "wl-0123456789abcdef",
        )
    )
    return "".join(rng.choice(alphabet) for _ in range(length))


class Mutator:
    """Random hostile inputs from a seeded RNG and a corpus of valid ones."""

    def __init__(self, rng: random.Random, seeds: Sequence[bytes]) -> None:
        if not seeds:
            raise ValueError("a mutator needs at least one seed input")
        self.rng = rng
        self.seeds = list(seeds)

    # -- values --------------------------------------------------------------------------------

    def value(self, depth: int = 0) -> object:
        """A random msgpack value of a random shape: every type a frame field could be sent as."""
        rng = self.rng
        kinds = 9 if depth < 4 else 6
        kind = rng.randrange(kinds)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice((True, False))
        if kind == 2:
            return rng.choice(INTERESTING_INTS) if rng.random() < 0.6 else rng.randint(-999, 9999)
        if kind == 3:
            return rng.choice((0.0, -0.0, 1.5, float("nan"), float("inf"), 1e308))
        if kind == 4:
            return _random_text(rng, rng.choice((0, 1, 5, 24, 64, 65, 256, 257, 300)))
        if kind == 5:
            return rng.randbytes(rng.choice((0, 1, 2, 8, 40)))
        if kind == 6:
            return [self.value(depth + 1) for _ in range(rng.randrange(6))]
        if kind == 7:
            return {self._key(): self.value(depth + 1) for _ in range(rng.randrange(3))}
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(4)))

    def _key(self) -> object:
        return self.rng.choice((0, -1, 1 << 40, "", "kind", b"\x00", None, True, 1.5))

    def wrong(self, original: object) -> object:
        """A replacement for a field: of the wrong type, or of the right type out of bounds."""
        rng = self.rng
        if isinstance(original, bool | None) or rng.random() < 0.35:
            return self.value()
        if isinstance(original, int):
            return rng.choice((*INTERESTING_INTS, original + 1, original - 1, -original))
        if isinstance(original, str):
            return rng.choice(
                (
                    "",
                    original * 2,
                    original[: len(original) // 2],
                    "x" * 256,
                    "x" * 257,
                    "\x1f".join((original, original)),
                    original.encode("utf-8"),
                    "other/" + original,
                    _random_text(rng, rng.randrange(1, 40)),
                )
            )
        if isinstance(original, bytes):
            return rng.choice(
                (
                    b"",
                    b"\x00",
                    original[: len(original) // 2],
                    original + rng.randbytes(3),
                    self.bytes_mutation(original),
                    original.decode("latin-1"),
                )
            )
        if isinstance(original, list):
            if not original or rng.random() < 0.3:
                return rng.choice(([], [None], tuple(), "list", [self.value()] * 3000))
            copy = list(original)
            index = rng.randrange(len(copy))
            copy[index] = self.wrong(copy[index])
            return copy
        return self.value()

    # -- layers --------------------------------------------------------------------------------

    def bytes_mutation(self, data: bytes) -> bytes:
        """One to four byte-level edits: what a broken transport or a careless peer produces."""
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(9)
            size = len(out)
            if op == 0 and size:  # flip a bit
                i = rng.randrange(size)
                out[i] ^= 1 << rng.randrange(8)
            elif op == 1 and size:  # an interesting byte
                out[rng.randrange(size)] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xFF))
            elif op == 2:  # insert random bytes
                i = rng.randrange(size + 1)
                out[i:i] = rng.randbytes(rng.randint(1, 8))
            elif op == 3 and size:  # delete a run
                i = rng.randrange(size)
                del out[i : i + rng.randint(1, 8)]
            elif op == 4 and size:  # truncate
                del out[rng.randrange(size) :]
            elif op == 5 and size:  # duplicate a run
                i = rng.randrange(size)
                out[i:i] = out[i : i + rng.randint(1, 16)]
            elif op == 6:  # splice with another seed
                other = rng.choice(self.seeds)
                cut = rng.randrange(size + 1)
                out = out[:cut] + other[rng.randrange(len(other) + 1) :]
            elif op == 7:  # a huge or foreign msgpack header somewhere
                i = rng.randrange(size + 1)
                out[i:i] = rng.choice(HUGE_HEADERS)
            elif op == 8 and size >= 2:  # overwrite with a boundary int, big endian
                value = rng.choice(INTERESTING_INTS) & 0xFFFFFFFF
                i = rng.randrange(size)
                out[i : i + 4] = value.to_bytes(4, "big")
        return bytes(out)

    def frame_mutation(self, data: bytes) -> bytes:
        """A well-formed msgpack array whose frame is wrong: the structure the decoder trusts
        least is changed, and the result is packed again."""
        rng = self.rng
        try:
            items = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception:
            return self.bytes_mutation(data)
        if not isinstance(items, list) or not items:
            items = [items]
        op = rng.randrange(7)
        if op == 0:  # another type code, same fields
            items[0] = rng.choice((*INTERESTING_INTS[:20], 6, 14, 39, 46, 99, True, "1", 1.0))
        elif op == 1 and len(items) > 1:  # one field wrong
            index = rng.randrange(1, len(items))
            items[index] = self.wrong(items[index])
        elif op == 2:  # one field too many
            items.append(self.value())
        elif op == 3 and len(items) > 1:  # one field too few
            del items[rng.randrange(1, len(items))]
        elif op == 4 and len(items) > 1:  # a field nested deep
            index = rng.randrange(1, len(items))
            for _ in range(rng.choice((2, 10, 100, 400, 600))):
                items[index] = [items[index]]
        elif op == 5:  # all fields nil
            items = [items[0]] + [None] * (len(items) - 1)
        else:  # two fields swapped
            if len(items) > 2:
                a, b = rng.sample(range(1, len(items)), 2)
                items[a], items[b] = items[b], items[a]
        try:
            return msgpack.packb(items, use_bin_type=True)  # type: ignore[no-any-return]
        except Exception:  # an int past 64 bits, a value msgpack cannot pack
            return self.bytes_mutation(data)

    def random_shape(self) -> bytes:
        """msgpack of a random shape, a frame array or not."""
        rng = self.rng
        if rng.random() < 0.7:
            value: object = [rng.choice(INTERESTING_INTS[:20])] + [
                self.value() for _ in range(rng.randrange(7))
            ]
        else:
            value = self.value()
        try:
            return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
        except Exception:
            return rng.randbytes(rng.randrange(64))

    def hostile_header(self) -> bytes:
        """A frame prefix followed by a length that claims more than there is, or nesting."""
        rng = self.rng
        code = rng.choice((1, 2, 3, 10, 11, 12, 13, 40, 44))
        prefix = bytes((0x90 | rng.randrange(1, 7), code))
        if rng.random() < 0.4:
            return prefix + deep_nesting(rng.choice((100, 480, 500, 1000, 1023, 1024, 5000)))
        body = rng.choice(HUGE_HEADERS) + rng.randbytes(rng.randrange(16))
        return prefix + rng.choice((b"", b"\xa1x", b"\x01")) * rng.randrange(3) + body

    def next_input(self) -> bytes:
        """One input, of a kind chosen at random."""
        rng = self.rng
        pick = rng.random()
        seed = rng.choice(self.seeds)
        if pick < 0.08:
            return seed
        if pick < 0.38:
            return self.frame_mutation(seed)
        if pick < 0.63:
            return self.bytes_mutation(seed)
        if pick < 0.73:
            return seed[: rng.randrange(len(seed) + 1)]
        if pick < 0.88:
            return self.random_shape()
        if pick < 0.96:
            return self.hostile_header()
        return rng.randbytes(rng.choice((0, 1, 2, 3, 16, 256)))
