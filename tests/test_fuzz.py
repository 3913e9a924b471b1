"""The fuzzer's targets, briefly: a few thousand hostile inputs each, and the relay under fire.

The full run is ``python -m fuzz`` (a million inputs); these keep every target working and catch
the gross failures (a crash, a hang, an unreadable document) on every test run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # fuzz/ is a folder of the checkout, not of the package
    sys.path.append(str(ROOT))

from foliosync.sync.errors import RemoteProtocolError  # noqa: E402
from foliosync.sync.protocol import decode_frame  # noqa: E402
from fuzz.engine import run_pure  # noqa: E402
from fuzz.mutate import deep_nesting  # noqa: E402
from fuzz.relay import run_relay  # noqa: E402
from fuzz.targets import check_frame  # noqa: E402


def test_frames_target_finds_nothing(tmp_path: Path) -> None:
    result = run_pure("frames", 3000, seed=7, crash_dir=tmp_path, hang_ms=250)
    assert result.tried == 3000
    assert (result.crashes, dict(result.signatures)) == (0, {})


def test_updates_target_runs_and_saves_what_it_finds(tmp_path: Path) -> None:
    result = run_pure("updates", 1500, seconds=6, seed=7, crash_dir=tmp_path, hang_ms=10_000)
    assert result.tried > 0
    for path in result.saved:  # each finding replays from its saved bytes
        assert path.read_bytes() is not None and path.with_suffix(".txt").exists()
    unexpected = [
        s
        for s in result.signatures
        if "refused update changed" not in s and "another state vector" not in s
    ]
    assert unexpected == [], unexpected


@pytest.mark.parametrize("depth", [100, 480, 500, 1000, 1023, 1024, 5000])
def test_deep_nesting_is_a_bad_frame(depth: int) -> None:
    data = b"\x92\x01" + deep_nesting(depth)
    with pytest.raises(RemoteProtocolError) as caught:
        decode_frame(data)
    assert caught.value.code == "bad_frame"
    check_frame(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_a_protocol_error(data: bytes) -> None:
    check_frame(data)


async def test_relay_survives_hostile_connections(tmp_path: Path) -> None:
    result = await run_relay(600, seconds=6, seed=3, crash_dir=tmp_path, connections=3)
    assert result.tried >= 100
    assert (result.crashes, result.hangs, dict(result.signatures)) == (0, 0, {}), result.notes
    assert any("acknowledged" in note for note in result.notes)
