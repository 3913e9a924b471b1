"""The Yjs V1 update decoder (foliosync.sync.updates) against real updates: those pycrdt writes,
those the yjs npm package writes (V1 and V2), and bytes made to break it.

The yjs cases need node and npm, and fail (never skip) without them, as tests/test_js_client.py
does: a silently skipped proof proves nothing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from foliosync.sync.errors import BadUpdate, MissingDependencies, UpdateV2
from foliosync.sync.updates import (
    MAX_NESTING,
    UpdateInfo,
    check_update,
    decode_state_vector,
    decode_update,
    missing_dependencies,
)

ROOT = Path(__file__).resolve().parent.parent
JS_SOURCE = ROOT / "clients" / "js"
JS_HELPER = Path(__file__).resolve().parent / "yjs_updates.cjs"

# -- a small V1 writer, for updates no library writes -----------------------------------------


def uv(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def vs(text: str) -> bytes:
    raw = text.encode()
    return uv(len(raw)) + raw


def encode(
    clients: list[tuple[int, int, list[bytes]]], deletes: list[tuple[int, list[tuple[int, int]]]]
) -> bytes:
    """A V1 update of (client, first clock, encoded structs) and (client, [(clock, len)])."""
    out = uv(len(clients))
    for client, clock, structs in clients:
        out += uv(len(structs)) + uv(client) + uv(clock) + b"".join(structs)
    out += uv(len(deletes))
    for client, ranges in deletes:
        out += uv(client) + uv(len(ranges)) + b"".join(uv(c) + uv(n) for c, n in ranges)
    return out


def in_root(ref: int, root: str, key: str | None = None) -> bytes:
    """The head of an item whose parent is the root type ``root`` (no origins)."""
    return bytes([ref | (0x20 if key else 0)]) + b"\x01" + vs(root) + (vs(key) if key else b"")


def root_item(ref: int, root: str, content: bytes, key: str | None = None) -> bytes:
    return in_root(ref, root, key) + content


def after(ref: int, client: int, clock: int, content: bytes) -> bytes:
    """An item whose origin (left neighbour) is ``client:clock``."""
    return bytes([0x80 | ref]) + uv(client) + uv(clock) + content


def child_of(ref: int, client: int, clock: int, content: bytes) -> bytes:
    """An item whose parent is the type item ``client:clock`` (no origins)."""
    return bytes([ref]) + b"\x00" + uv(client) + uv(clock) + content


STRING, ANY, TYPE, GC, SKIP, DELETED = 4, 8, 7, 0, 10, 1


def text_item(text: str) -> bytes:
    return root_item(STRING, "t", vs(text))


def state(doc: Doc[Any]) -> dict[int, int]:
    return decode_state_vector(doc.get_state())


def updates_of(doc: Doc[Any]) -> tuple[list[bytes], Callable[[], None]]:
    """The updates ``doc`` emits from now on, and how to stop recording them."""
    seen: list[bytes] = []
    subscription = doc.observe(lambda event: seen.append(event.update))
    return seen, lambda: doc.unobserve(subscription)


def assert_agrees_with_pycrdt(update: bytes) -> UpdateInfo:
    """``update`` (a whole state from clock 0) decodes, and what it says it carries is what
    pycrdt says it carries and what a Doc it is applied to holds."""
    info = decode_update(update)
    carried = decode_state_vector(pycrdt.get_state(update))
    assert {client: span for client, span in info.structs.items()} == {
        client: (0, clock) for client, clock in carried.items()
    }
    doc: Doc[Any] = Doc()
    doc.apply_update(update)
    assert state(doc) == carried
    again = decode_update(doc.get_update())
    assert dict(again.structs) == dict(info.structs)
    assert dict(again.deletions) == dict(info.deletions)
    assert again.roots <= info.roots
    assert not info.dependencies, "a whole state refers to nothing outside itself"
    assert missing_dependencies(info, {}) == []
    return info


# -- updates pycrdt writes --------------------------------------------------------------------


def test_the_empty_update_is_valid_and_empty() -> None:
    info = decode_update(b"\x00\x00")
    assert info.is_empty()
    assert info == decode_update(Doc().get_update())
    assert missing_dependencies(info, {}) == []


def test_a_watchlist_edit() -> None:
    doc: Doc[Any] = Doc()
    symbols = doc.get("symbols", type=Map)
    fields = doc.get("fields", type=Map)
    seen, stop = updates_of(doc)
    symbols["AAPL\x1fdevice"] = {"t": "2026-12-01T12:00:00.000Z-0001"}
    with doc.transaction():
        symbols["MSFT\x1fdevice"] = {"t": "2026-12-01T12:00:00.000Z-0002"}
        fields["MSFT\x1fpos"] = {"v": "a1", "t": "2026-12-01T12:00:00.000Z-0002"}
    stop()
    first, second = (decode_update(u) for u in seen)
    client = doc.client_id
    assert first.structs == {client: (0, 1)} and first.roots == {"symbols"}
    assert second.structs == {client: (1, 3)} and second.roots == {"symbols", "fields"}
    assert not first.dependencies and not second.dependencies
    assert not first.deletions and not second.deletions and not second.is_empty()
    assert_agrees_with_pycrdt(doc.get_update())


def test_maps_arrays_text_and_nested_types() -> None:
    doc: Doc[Any] = Doc()
    doc.get("m", type=Map).update({"a": 1, "b": "two", "c": [1, 2], "d": {"x": None}})
    doc.get("a", type=Array).extend([1, "x", True, None, b"bytes", {"k": [1.5]}])
    text = doc.get("t", type=Text)
    text += "hello 🌍 wörld"
    text.insert(3, "日本")
    nested = doc.get("n", type=Map)
    nested["inner"] = Map({"list": Array([Text("deep"), Map({"k": "v"})])})
    nested["inner"]["list"].append(Array([1, 2]))
    info = assert_agrees_with_pycrdt(doc.get_update())
    assert info.roots == {"m", "a", "t", "n"}


def test_deletions_overwrites_and_garbage_collected_types() -> None:
    doc: Doc[Any] = Doc()
    cells = doc.get("m", type=Map)
    for value in range(5):
        cells["k"] = value  # each overwrite deletes the previous value
    items = doc.get("a", type=Array)
    items.extend(list(range(10)))
    del items[2:6]
    text = doc.get("t", type=Text)
    text += "abcdefgh"
    del text[1:3]
    cells["nested"] = Map({"deep": Array([1, 2, 3])})
    del cells["nested"]  # its content is garbage collected
    info = assert_agrees_with_pycrdt(doc.get_update())
    client = doc.client_id
    deleted = sum(length for _, length in info.deletions[client])
    assert deleted >= 4 + 4 + 2 + 1


def test_incremental_updates_start_where_the_previous_ended() -> None:
    doc: Doc[Any] = Doc()
    seen, stop = updates_of(doc)
    items = doc.get("a", type=Array)
    items.append("one")
    items.append("two")
    del items[0]
    stop()
    client = doc.client_id
    one, two, removal = (decode_update(u) for u in seen)
    assert one.structs == {client: (0, 1)} and not one.dependencies
    assert two.structs == {client: (1, 2)} and two.dependencies == {(client, 0)}
    assert removal.structs == {} and removal.deletions == {client: ((0, 1),)}
    replica: Doc[Any] = Doc()
    for update, info in zip(seen, (one, two, removal), strict=True):
        assert missing_dependencies(info, state(replica)) == []
        replica.apply_update(update)
        for c, (_, end) in info.structs.items():
            assert state(replica)[c] == end


def test_merged_updates_and_a_gap_as_a_skip() -> None:
    doc: Doc[Any] = Doc()
    seen, stop = updates_of(doc)
    items = doc.get("a", type=Array)
    for value in ("one", "two", "three"):
        items.append(value)
    stop()
    client = doc.client_id
    merged = decode_update(pycrdt.merge_updates(*seen))
    assert merged.structs == {client: (0, 3)} and not merged.has_skips
    assert not merged.dependencies
    gapped = decode_update(pycrdt.merge_updates(seen[0], seen[2]))
    assert gapped.has_skips
    assert gapped.structs == {client: (0, 3)}
    assert gapped.covered == {client: ((0, 1), (2, 3))}
    assert gapped.dependencies == {(client, 1)}  # the third's origin is in the Skip
    reasons = missing_dependencies(gapped, {})
    assert len(reasons) == 2 and "from clock 2" in reasons[0] and f"{client}:1" in reasons[1]
    assert missing_dependencies(gapped, {client: 2}) == []


def test_a_diff_against_a_state_vector() -> None:
    source: Doc[Any] = Doc()
    source.get("m", type=Map)["a"] = "x"
    peer: Doc[Any] = Doc()
    peer.apply_update(source.get_update())
    source.get("m", type=Map)["b"] = "y"
    del source.get("m", type=Map)["a"]
    diff = source.get_update(peer.get_state())
    info = decode_update(diff)
    assert info.structs == {source.client_id: (1, 2)}
    assert info.deletions == {source.client_id: ((0, 1),)}
    assert missing_dependencies(info, state(peer)) == []
    assert missing_dependencies(info, {}) != []
    peer.apply_update(diff)
    assert state(peer) == state(source)


def test_the_state_vector() -> None:
    doc: Doc[Any] = Doc()
    assert decode_state_vector(doc.get_state()) == {}
    doc.get("m", type=Map)["a"] = "x"
    other: Doc[Any] = Doc()
    other.get("m", type=Map)["b"] = "y"
    doc.apply_update(other.get_update())
    assert decode_state_vector(doc.get_state()) == {doc.client_id: 1, other.client_id: 1}
    for bad in (b"", b"\x01", b"\x01\x05", b"\x00\x00", b"\x02\x05\x01\x05\x02", b"\xff" * 9):
        with pytest.raises(BadUpdate) as caught:
            decode_state_vector(bad)
        assert caught.value.code == "bad_update" and "state vector" in str(caught.value)


# -- updates the yjs npm package writes -------------------------------------------------------


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node_modules holding clients/js' locked yjs: the checkout's, or one ``npm ci`` makes."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed for the yjs cases (node 20 or later)")
    if (JS_SOURCE / "node_modules" / "yjs").is_dir():
        return JS_SOURCE / "node_modules"
    target = tmp_path_factory.mktemp("yjs")
    for name in ("package.json", "package-lock.json"):
        shutil.copy2(JS_SOURCE / name, target / name)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if installed.returncode != 0:
        pytest.fail(f"npm ci failed:\n{installed.stdout}\n{installed.stderr}")
    return target / "node_modules"


@pytest.fixture(scope="module")
def yjs_cases(node_modules: Path) -> dict[str, dict[str, bytes]]:
    made = subprocess.run(
        ["node", str(JS_HELPER)],
        env={"NODE_PATH": str(node_modules), "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    raw: dict[str, dict[str, str]] = json.loads(made.stdout)
    return {name: {k: bytes.fromhex(v) for k, v in case.items()} for name, case in raw.items()}


WHOLE_STATES = [
    "empty",
    "string",
    "string-utf16",
    "embed",
    "format",
    "binary",
    "any",
    "type",
    "xml",
    "subdoc",
    "deleted",
    "gc",
    "no-gc",
    "two-clients",
]


@pytest.mark.parametrize("name", WHOLE_STATES)
def test_yjs_updates_of_every_content_kind(
    yjs_cases: dict[str, dict[str, bytes]], name: str
) -> None:
    info = assert_agrees_with_pycrdt(yjs_cases[name]["v1"])
    assert info.is_empty() == (name == "empty")


def test_yjs_string_lengths_count_utf16_units(yjs_cases: dict[str, dict[str, bytes]]) -> None:
    # 'café 😀 日本' with '📈' inserted: 12 UTF-16 units, fewer code points, more bytes.
    assert decode_update(yjs_cases["string-utf16"]["v1"]).structs == {1002: (0, 12)}


def test_yjs_two_clients_refer_to_each_other(yjs_cases: dict[str, dict[str, bytes]]) -> None:
    info = decode_update(yjs_cases["two-clients"]["v1"])
    assert info.structs == {10: (0, 9), 20: (0, 3)}
    assert info.deletions == {10: ((0, 1),)}
    assert not info.dependencies  # they refer to each other, all inside the update


def test_yjs_incremental_updates_and_a_skip(yjs_cases: dict[str, dict[str, bytes]]) -> None:
    first = decode_update(yjs_cases["incremental-1"]["v1"])
    third = decode_update(yjs_cases["incremental-3"]["v1"])
    removal = decode_update(yjs_cases["incremental-delete"]["v1"])
    skip = decode_update(yjs_cases["skip"]["v1"])
    merged = decode_update(yjs_cases["merged"]["v1"])
    assert first.structs == {30: (0, 1)} and third.structs == {30: (2, 3)}
    assert third.dependencies == {(30, 1)}
    assert removal.structs == {} and removal.deletions == {30: ((0, 1),)}
    assert skip.has_skips and skip.covered == {30: ((0, 1), (2, 3))}
    assert skip.dependencies == {(30, 1)}
    assert merged.structs == {30: (0, 3)} and not merged.has_skips and not merged.dependencies
    assert missing_dependencies(third, {30: 1}) != []
    assert missing_dependencies(third, {30: 2}) == []
    doc: Doc[Any] = Doc()
    doc.apply_update(yjs_cases["merged"]["v1"])
    assert state(doc) == {30: 3}


def test_yjs_xml_hook_is_refused(yjs_cases: dict[str, dict[str, bytes]]) -> None:
    """yrs does not read a hook's name, so it would read the rest of the update shifted."""
    with pytest.raises(BadUpdate, match="XmlHook"):
        decode_update(yjs_cases["xml-hook"]["v1"])


def test_yjs_v2_updates_are_update_v2(yjs_cases: dict[str, dict[str, bytes]]) -> None:
    with_v2 = [name for name, case in yjs_cases.items() if "v2" in case]
    assert {"empty", "any", "merged", "skip", "two-clients"} <= set(with_v2)
    for name in with_v2:
        with pytest.raises(UpdateV2) as caught:
            decode_update(yjs_cases[name]["v2"])
        assert caught.value.code == "update_v2", name


def test_truncations_and_trailing_bytes_of_yjs_updates(
    yjs_cases: dict[str, dict[str, bytes]],
) -> None:
    for name, case in yjs_cases.items():
        update = case["v1"]
        if name == "xml-hook":
            continue
        for cut in range(len(update)):
            with pytest.raises(BadUpdate):
                decode_update(update[:cut])
        for tail in (b"\x00", b"\x01", update):
            with pytest.raises(BadUpdate):
                decode_update(update + tail)


# -- V2 detection -----------------------------------------------------------------------------


def test_v2_is_told_from_v1() -> None:
    empty_v2 = b"\x00" * 12  # feature flag, nine empty columns, no structs, no deletions
    with pytest.raises(UpdateV2):
        decode_update(empty_v2)
    with pytest.raises(UpdateV2):  # what pycrdt would acknowledge as a no-op
        decode_update(b"\x00\x00" + b"\x00" * 10)
    # 00 00 then bytes that are no V2 layout: bad, not V2.
    with pytest.raises(BadUpdate) as caught:
        decode_update(b"\x00\x00\x05")
    assert type(caught.value) is BadUpdate
    with pytest.raises(BadUpdate) as caught:
        decode_update(b"\x00\x00" + b"\x7f" * 20)
    assert type(caught.value) is BadUpdate
    # A V1 update of deletions only starts with 00 too, and stays V1.
    deletes = encode([], [(5, [(0, 3)]), (6, [(1, 1), (4, 2)])])
    assert decode_update(deletes).deletions == {5: ((0, 3),), 6: ((1, 1), (4, 2))}


# -- bytes made to break it -------------------------------------------------------------------


def refused(update: bytes, match: str) -> None:
    with pytest.raises(BadUpdate, match=match) as caught:
        decode_update(update)
    assert type(caught.value) is BadUpdate and caught.value.code == "bad_update"


def test_a_crafted_update_decodes() -> None:
    update = encode(
        [(7, 0, [text_item("ab"), after(STRING, 7, 1, vs("cd"))]), (9, 4, [text_item("x")])],
        [(7, [(0, 1)])],
    )
    info = decode_update(update)
    assert info.structs == {7: (0, 4), 9: (4, 5)}
    assert not info.dependencies and info.roots == {"t"}
    assert missing_dependencies(info, {9: 4}) == []
    assert "clock 4" in missing_dependencies(info, {})[0]


def test_unknown_info_bits_and_content_refs_are_refused() -> None:
    refused(encode([(7, 0, [b"\x20\x01"])], []), "info bits")  # a GC with the key bit
    refused(encode([(7, 0, [b"\x8a\x01"])], []), "info bits")  # a Skip with an origin
    refused(encode([(7, 0, [in_root(11, "t") + b"\x01"])], []), "content ref 11")
    refused(encode([(7, 0, [in_root(31, "t") + b"\x01"])], []), "content ref 31")
    refused(encode([(7, 0, [root_item(TYPE, "t", b"\x07")])], []), "type ref 7")
    refused(encode([(7, 0, [b"\x04\x02" + vs("t") + vs("x")])], []), "parent info 2")


def test_legacy_json_content_is_refused() -> None:
    """yrs reads one element more than the count Yjs wrote; pycrdt cannot apply it."""
    update = encode([(7, 0, [root_item(2, "a", uv(1) + vs('"x"'))])], [])
    refused(update, "JSON content")
    with pytest.raises(ValueError, match="end of buffer"):
        Doc().apply_update(update)


def test_too_long_and_too_large_varints_are_refused() -> None:
    refused(b"\x81\x80\x80\x80\x80\x00", "longer than")  # a client count of six bytes
    refused(encode([(7, 0, [root_item(DELETED, "a", b"\xff\xff\xff\xff\x1f")])], []), "range")
    huge_client = encode([(1 << 53, 0, [text_item("a")])], [])
    refused(huge_client, "client")
    refused(encode([(7, 0xFFFF_FFFF, [text_item("ab")])], []), "2\\^32")
    refused(encode([], [(7, [(0xFFFF_FFF0, 0x20)])]), "2\\^32")
    any_int = root_item(ANY, "a", uv(1) + b"\x7d" + b"\xff" * 8 + b"\x01")
    refused(encode([(7, 0, [any_int])], []), "53 bits")


def test_lengths_past_the_end_are_refused() -> None:
    refused(encode([(7, 0, [root_item(STRING, "t", uv(50) + b"short")])], []), "past the end")
    refused(encode([(7, 0, [root_item(3, "b", uv(9) + b"ab")])], []), "past the end")
    refused(encode([(7, 0, [root_item(ANY, "a", uv(1) + b"\x7b\x00\x00")])], []), "past the end")


def test_a_client_with_no_structs_is_refused() -> None:
    """``01 00 01 02 00``, found by the fuzzer: yrs panics on it for a client the document has
    (the relay would forget its copy and reload it, for five bytes); Yjs never writes one."""
    update = encode([(1, 2, [])], [])
    assert update == bytes.fromhex("0100010200")
    refused(update, "client 1 with no structs")
    refused(encode([(7, 0, [text_item("a")]), (9, 0, [])], []), "client 9 with no structs")


def test_absurd_counts_are_refused() -> None:
    refused(uv(1 << 30) + b"\x00", "clients but only")
    refused(b"\x01" + uv(1 << 30) + b"\x07\x00\x00", "structs but only")
    refused(encode([(7, 0, [root_item(ANY, "a", uv(1 << 20) + b"\x7e")])], []), "values but")
    nested = root_item(ANY, "a", uv(1) + b"\x76" + uv(1 << 25))
    refused(encode([(7, 0, [nested])], []), "object entries")
    refused(b"\x00\x01\x07" + uv(1 << 28) + b"\x00\x01", "deleted ranges")
    many = encode([(7, 0, [text_item("a")] * 10)], [])
    assert decode_update(many, max_structs=10).structs == {7: (0, 10)}
    with pytest.raises(BadUpdate, match="more than 10 structs"):
        decode_update(encode([(7, 0, [text_item("a")] * 11)], []), max_structs=10)


def test_deep_nesting_is_refused() -> None:
    deep = b"\x75\x01" * (MAX_NESTING + 1) + b"\x7e"
    refused(encode([(7, 0, [root_item(ANY, "a", uv(1) + deep)])], []), "nested deeper")
    fine = b"\x75\x01" * MAX_NESTING + b"\x7e"
    decode_update(encode([(7, 0, [root_item(ANY, "a", uv(1) + fine)])], []))
    embed = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    refused(encode([(7, 0, [root_item(5, "t", vs(embed))])], []), "nested deeper")


def test_json_yrs_would_refuse_is_refused() -> None:
    """Each of these makes pycrdt raise "JSON parsing error" while decoding."""
    for text in ("NaN", "-Infinity", "1e400", "1" * 400, '"\\ud800"', '"a\tb"', "{", "", "[1,]"):
        update = encode([(7, 0, [root_item(5, "t", vs(text))])], [])
        refused(update, "JSON")
        with pytest.raises(ValueError, match="JSON parsing error"):
            Doc().apply_update(update)
    refused(encode([(7, 0, [root_item(6, "t", vs("bold") + vs("tru"))])], []), "JSON")


def test_strings_that_are_not_utf8_are_refused() -> None:
    for raw in (b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80"):
        refused(encode([(7, 0, [root_item(STRING, "t", uv(len(raw)) + raw)])], []), "UTF-8")
    refused(encode([(7, 0, [b"\x04\x01\x01\xff" + vs("x")])], []), "UTF-8")


def test_structural_nonsense_is_refused() -> None:
    refused(encode([(7, 0, [text_item("a")]), (7, 1, [text_item("b")])], []), "twice")
    refused(encode([], [(7, [(0, 1)]), (7, [(2, 1)])]), "twice")
    refused(encode([(7, 0, [b"\x00\x00"])], []), "length 0")
    refused(encode([(7, 0, [b"\x0a\x00"])], []), "length 0")
    refused(encode([(7, 0, [text_item("ab"), after(STRING, 7, 2, vs("c"))])], []), "itself")
    refused(encode([(7, 0, [text_item("ab"), after(STRING, 7, 5, vs("c"))])], []), "later")
    # A parent that is a string: yrs refuses it while applying, so it is refused here.
    refused(encode([(7, 0, [text_item("ab"), child_of(STRING, 7, 0, vs("c"))])], []), "type")


def test_a_parent_may_be_a_type_or_deleted() -> None:
    update = encode(
        [
            (
                7,
                0,
                [
                    root_item(TYPE, "m", b"\x01", key="inner"),
                    child_of(STRING, 7, 0, vs("in a map")),
                    b"\x00\x02",
                    child_of(STRING, 7, 9, vs("in a GC")),
                ],
            )
        ],
        [],
    )
    info = decode_update(update)
    assert info.structs == {7: (0, 18)} and not info.dependencies
    doc: Doc[Any] = Doc()
    doc.apply_update(update)


def test_empty_items_and_deletions_are_ignored_as_yrs_does() -> None:
    update = encode([(7, 0, [text_item(""), text_item("ab")])], [(7, [(0, 0)])])
    info = decode_update(update)
    assert info.structs == {7: (0, 2)} and info.deletions == {}


# -- fuzz -------------------------------------------------------------------------------------


def _pycrdt_applies(update: bytes) -> None:
    doc: Doc[Any] = Doc()
    try:
        doc.apply_update(update)
    except BaseException as exc:  # pycrdt's panics derive from BaseException
        raise AssertionError(f"decoded, but pycrdt cannot apply {update.hex()}: {exc!r}") from exc


def _real_updates() -> list[bytes]:
    doc: Doc[Any] = Doc()
    seen, stop = updates_of(doc)
    cells = doc.get("m", type=Map)
    cells["a"] = {"t": "2026-12-01", "v": [1, 2.5, None, True]}
    cells["b"] = Map({"inner": Array(["x", Text("y")])})
    cells["a"] = "overwritten"
    text = doc.get("t", type=Text)
    text += "hello wörld 🌍"
    del text[2:5]
    items = doc.get("a", type=Array)
    items.extend([b"\x00\x01", 7, "x"])
    del items[0]
    stop()
    return [*seen, doc.get_update(), pycrdt.merge_updates(seen[0], seen[2])]


REAL_UPDATES = _real_updates()
FUZZ = settings(
    max_examples=400,
    deadline=1000,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


def _decodes_or_refuses(data: bytes) -> UpdateInfo | None:
    try:
        return decode_update(data)
    except BadUpdate:
        return None


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_are_refused(data: bytes) -> None:
    if _decodes_or_refuses(data) is not None:
        _pycrdt_applies(data)
    with contextlib.suppress(BadUpdate):
        decode_state_vector(data)


def _mutate(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "cut":
            del data[at:]
    return bytes(data)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    return _mutate(draw, draw(st.sampled_from(REAL_UPDATES)))


def _mutated_decodes_or_is_refused(data: bytes) -> None:
    info = _decodes_or_refuses(data)
    if info is not None:
        _pycrdt_applies(data)
        missing_dependencies(info, {})


@FUZZ
@given(mutations())
def test_mutated_updates_decode_or_are_refused(data: bytes) -> None:
    _mutated_decodes_or_is_refused(data)


@FUZZ
@given(st.data())
def test_mutated_yjs_updates_decode_or_are_refused(
    yjs_cases: dict[str, dict[str, bytes]], data: st.DataObject
) -> None:
    names = sorted(name for name in yjs_cases if name != "xml-hook")
    original = yjs_cases[data.draw(st.sampled_from(names))]["v1"]
    _mutated_decodes_or_is_refused(data.draw(st.composite(_mutate)(original)))


ASCII = st.characters(min_codepoint=32, max_codepoint=126)


@st.composite
def edited_docs(draw: st.DrawFn) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    cells = doc.get("m", type=Map)
    items = doc.get("a", type=Array)
    text = doc.get("t", type=Text)
    values = st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31), st.text(max_size=8))
    for _ in range(draw(st.integers(0, 12))):
        op = draw(st.sampled_from(["set", "del", "push", "remove", "type", "write", "erase"]))
        if op == "set":
            cells[draw(st.sampled_from("abc"))] = draw(values)
        elif op == "del" and len(cells):
            del cells[draw(st.sampled_from(sorted(cells.keys())))]
        elif op == "push":
            items.insert(draw(st.integers(0, len(items))), draw(values))
        elif op == "remove" and len(items):
            del items[draw(st.integers(0, len(items) - 1))]
        elif op == "type":
            cells[draw(st.sampled_from("xy"))] = Map({"k": Array([draw(values)])})
        elif op == "write":
            # ASCII: pycrdt's len() of a Text counts UTF-8 bytes, its indexes characters.
            text.insert(
                draw(st.integers(0, len(text))), draw(st.text(ASCII, min_size=1, max_size=5))
            )
        elif op == "erase" and len(text):
            start = draw(st.integers(0, len(text) - 1))
            del text[start : min(len(text), start + draw(st.integers(1, 3)))]
    return doc


@settings(max_examples=150, deadline=2000, derandomize=True)
@given(edited_docs())
def test_every_pycrdt_document_decodes_and_agrees(doc: Doc[Any]) -> None:
    assert_agrees_with_pycrdt(doc.get_update())


# -- what the receiver lacks ------------------------------------------------------------------


def _synced_pair() -> tuple[Doc[Any], Doc[Any]]:
    a: Doc[Any] = Doc()
    a.get("m", type=Map)["start"] = "s"
    a.get("a", type=Array).append("first")
    b: Doc[Any] = Doc()
    b.apply_update(a.get_update())
    return a, b


def test_the_next_update_of_a_client_is_missing_where_its_previous_is() -> None:
    a, b = _synced_pair()
    seen, stop = updates_of(a)
    items = a.get("a", type=Array)
    items.append("lost")  # never reaches b
    items.append("next")
    stop()
    lost, following = seen
    info = decode_update(following)
    reasons = missing_dependencies(info, state(b))
    assert reasons and f"client {a.client_id}'s structs from clock" in reasons[0]
    assert missing_dependencies(info, state(a)) == []
    with pytest.raises(MissingDependencies) as caught:
        check_update(following, state(b))
    assert caught.value.code == "missing_dependencies"
    assert str(caught.value).startswith("the update needs what the receiver lacks: " + reasons[0])
    assert f"and {len(reasons) - 1} more" in str(caught.value)
    # With the lost update first, nothing is missing any more.
    b.apply_update(lost)
    assert check_update(following, state(b)) == info


def test_deleting_an_item_the_receiver_never_saw() -> None:
    a, b = _synced_pair()
    a.get("m", type=Map)["unseen"] = "u"
    b_state_before = state(b)
    seen, stop = updates_of(a)
    del a.get("m", type=Map)["unseen"]
    stop()
    (removal,) = seen
    info = decode_update(removal)
    assert info.structs == {} and info.deletions
    reasons = missing_dependencies(info, b_state_before)
    assert len(reasons) == 1 and "a deletion of items" in reasons[0]
    assert missing_dependencies(info, state(a)) == []


def test_an_update_that_carries_its_own_dependencies() -> None:
    a, b = _synced_pair()
    seen, stop = updates_of(a)
    items = a.get("a", type=Array)
    items.append("lost")
    items.append("next")
    del a.get("m", type=Map)["start"]
    stop()
    merged = pycrdt.merge_updates(*seen)
    info = check_update(merged, state(b))
    assert info.structs == {a.client_id: (2, 4)}
    diff = a.get_update(b.get_state())
    assert check_update(diff, state(b)).structs == {a.client_id: (2, 4)}


def test_an_origin_of_another_client_the_receiver_lacks() -> None:
    a, b = _synced_pair()
    c: Doc[Any] = Doc()
    c.apply_update(a.get_update())
    c.get("a", type=Array).append("from c")  # b has not seen this
    a.apply_update(c.get_update())
    seen, stop = updates_of(a)
    a.get("a", type=Array).append("after c's item")
    stop()
    info = decode_update(seen[0])
    assert (c.client_id, 0) in info.dependencies
    reasons = missing_dependencies(info, state(b))
    assert reasons == [f"a reference to item {c.client_id}:0, which the receiver lacks"]
    assert missing_dependencies(info, state(a)) == []


def test_garbage_in_check_update_is_bad_update_first() -> None:
    with pytest.raises(BadUpdate) as caught:
        check_update(b"\x01", {})
    assert type(caught.value) is BadUpdate
