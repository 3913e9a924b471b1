"""The fuzzer's targets, briefly: a few thousand hostile inputs each, and the relay under fire.

The full run is ``python -m fuzz`` (a million inputs); these keep every target working and catch
the gross failures (a crash, a hang, an unreadable document) on every test run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # fuzz/ is a folder of the checkout, not of the package
    sys.path.append(str(ROOT))

from foliosync.server.documents import diff_against  # noqa: E402
from foliosync.sync.errors import BadUpdate, RemoteProtocolError  # noqa: E402
from foliosync.sync.protocol import decode_frame  # noqa: E402
from fuzz.engine import Recorder, Result, run_pure  # noqa: E402
from fuzz.mutate import deep_nesting  # noqa: E402
from fuzz.relay import run_relay  # noqa: E402
from fuzz.targets import UpdateTarget, check_frame  # noqa: E402


def test_frames_target_finds_nothing(tmp_path: Path) -> None:
    result = run_pure("frames", 3000, seed=7, crash_dir=tmp_path, hang_ms=250)
    assert result.tried == 3000
    assert (result.crashes, dict(result.signatures)) == (0, {})


def test_updates_target_finds_nothing(tmp_path: Path) -> None:
    result = run_pure("updates", 3000, seconds=6, seed=7, crash_dir=tmp_path, hang_ms=250)
    assert result.tried > 500
    assert (result.crashes, dict(result.signatures)) == (0, {}), result.saved


def test_a_state_vector_encoded_in_another_order_is_no_finding(tmp_path: Path) -> None:
    """A second client's concurrent writes of the watchlist's meta keys: the document and its
    copy hold the same state, which yrs encodes with the clients in hash-map order."""
    data = bytes.fromhex(
        "010209002801046d657461046b696e6401770977617463686c697374"
        "2801046d657461046e616d650177045465636800"
    )
    result = Result("updates")
    Recorder(result, UpdateTarget(), tmp_path).run_one(data)
    assert (result.crashes, dict(result.signatures)) == (0, {})


def test_an_item_whose_parent_is_no_type_is_refused_as_the_relay_refuses_it(
    tmp_path: Path,
) -> None:
    """Client 2's item under the watchlist's item 1#0, a plain value: the check, which sees the
    state vector only, passes it, and yrs refuses it. The relay answers bad_update and forgets
    its copy (yrs may have changed part of it); so does the target: no finding, and the next
    input (a state vector) finds the document as it was, not the half-applied one."""
    update = bytes.fromhex("010102002800010001780177016100")
    target = UpdateTarget()
    result = Result("updates")
    recorder = Recorder(result, target, tmp_path)
    recorder.run_one(update)
    recorder.run_one(b"t\n\n")
    assert (result.crashes, dict(result.signatures)) == (0, {})
    assert target.notes() == [
        "passed the check, refused by yrs (as the relay refuses them): 1 x Cannot apply "
        "update: block parent"
    ]


def test_an_xml_fragment_in_a_map_is_read_without_to_py(tmp_path: Path) -> None:
    """pycrdt's ``to_py`` has no value for an XML fragment; the document is sound all the same,
    and its reader reaches every value."""
    update = bytes.fromhex("010102002701046d65746101780400")  # meta.x = a Y.XmlFragment
    result = Result("updates")
    Recorder(result, UpdateTarget(), tmp_path).run_one(update)
    assert (result.crashes, dict(result.signatures)) == (0, {})


def test_a_hang_is_the_inputs_own_time_not_the_wait_for_a_core(tmp_path: Path) -> None:
    """An input that waits 30 ms off the CPU (as one does on a machine whose cores are busy
    elsewhere) is no hang; one that computes for 30 ms, every time, is."""

    def waits(data: bytes) -> None:
        time.sleep(0.03)

    def computes(data: bytes) -> None:
        until = time.thread_time() + 0.03
        while time.thread_time() < until:
            pass

    waited, computed = Result("frames"), Result("frames")
    Recorder(waited, waits, tmp_path, hang_ms=10).run_one(b"x")
    Recorder(computed, computes, tmp_path, hang_ms=10).run_one(b"y")
    assert (waited.hangs, waited.slowest_ms < 10) == (0, True)
    assert computed.hangs == 1 and computed.slowest_ms >= 30


def test_a_finding_is_saved_with_its_input(tmp_path: Path) -> None:
    """A check that fails on every input stands in for a real finding."""

    def failing(data: bytes) -> None:
        raise AssertionError("an invariant broke")

    result = Result("updates")
    Recorder(result, failing, tmp_path).run_one(b"\x01\x02")
    (saved,) = result.saved
    assert saved.read_bytes() == b"\x01\x02" and result.crashes == 1
    assert "an invariant broke" in saved.with_suffix(".txt").read_text()


@pytest.mark.parametrize("depth", [100, 480, 500, 1000, 1023, 1024, 5000])
def test_deep_nesting_is_a_bad_frame(depth: int) -> None:
    data = b"\x92\x01" + deep_nesting(depth)
    with pytest.raises(RemoteProtocolError) as caught:
        decode_frame(data)
    assert caught.value.code == "bad_frame"
    check_frame(data)


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("e3d9a92a0515dc38"),  # 88,763,619 clients, 4 bytes left
        bytes.fromhex("90819758c0c9ffffbfffc9ffffffff0101f433"),
        bytes.fromhex("ffffffff01e8a390ea45b2040102"),  # 536,870,911 clients
    ],
    ids=["88M-clients", "184M-clients", "536M-clients"],
)
def test_a_state_vector_claiming_millions_of_clients_is_refused_before_yrs_reads_it(
    data: bytes, tmp_path: Path
) -> None:
    """yrs reserves memory for the count first (a fifth of a second to seconds for these):
    the relay's path refuses them from the bytes alone, and the updates target takes that path,
    so they are neither a stall of the relay nor a hang of the fuzzer."""
    with pytest.raises(BadUpdate, match="clients but only"):
        diff_against(Doc(), data)
    result = Result("updates")
    Recorder(result, UpdateTarget(), tmp_path).run_one(data)
    assert (result.crashes, result.hangs) == (0, 0), dict(result.signatures)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_a_protocol_error(data: bytes) -> None:
    check_frame(data)


async def test_relay_survives_hostile_connections(tmp_path: Path) -> None:
    result = await run_relay(600, seconds=6, seed=3, crash_dir=tmp_path, connections=3)
    assert result.tried >= 100
    assert (result.crashes, result.hangs, dict(result.signatures)) == (0, 0, {}), result.notes
    assert any("acknowledged" in note for note in result.notes)
