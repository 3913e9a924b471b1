"""The relay's Prometheus alerting rules are valid and behave as their unit tests say.

promtool is Prometheus's own checker: it parses the rules the way Prometheus will, and
``promtool test rules`` evaluates them on synthetic series. Without it these checks cannot run,
and a missing tool must not pass for green: the test fails and says how to install it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "foliosync-rules.yml"
RULE_TESTS = sorted(RULES_DIR.glob("*.test.yml"))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed, so the alerting rules cannot be checked: install "
            "Prometheus (Debian/Ubuntu: apt-get install prometheus; tools/system-deps does it)"
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )


def test_rules_are_valid() -> None:
    result = run("check", "rules", RULES.name)
    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}{result.stderr}"
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout), result.stdout


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, f"no *.test.yml next to {RULES.name}"
    result = run("test", "rules", *(path.name for path in RULE_TESTS))
    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}{result.stderr}"


def test_example_prometheus_config_is_valid_and_loads_the_rules() -> None:
    result = run("check", "config", "prometheus.yml")
    assert result.returncode == 0, f"promtool check config failed:\n{result.stdout}{result.stderr}"
    assert RULES.name in result.stdout, result.stdout


def _alert_names(text: str) -> set[str]:
    return set(re.findall(r"^\s*- alert:\s*(\w+)\s*$", text, re.MULTILINE))


def _tested(text: str) -> tuple[set[str], set[str]]:
    """Alert names with a case where they fire, and with one where they must not.

    The test files are written in one layout (``alertname:`` followed by ``exp_alerts: []`` or
    by ``exp_alerts:`` and a list), which this reads without a YAML parser.
    """
    firing: set[str] = set()
    silent: set[str] = set()
    for name, empty in re.findall(
        r"^\s*alertname:\s*(\w+)\s*\n\s*exp_alerts:\s*(\[\])?", text, re.MULTILINE
    ):
        (silent if empty else firing).add(name)
    return firing, silent


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = _alert_names(RULES.read_text())
    assert len(alerts) >= 4, "the rules file lists no alerts"
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        fire, quiet = _tested(path.read_text())
        firing |= fire
        silent |= quiet
    assert not alerts - firing, f"alerts never shown firing: {sorted(alerts - firing)}"
    assert not alerts - silent, f"alerts without a near miss: {sorted(alerts - silent)}"
    assert not (firing | silent) - alerts, f"tests of unknown alerts: {(firing | silent) - alerts}"


def test_every_alert_has_a_severity_and_explains_itself() -> None:
    text = RULES.read_text()
    blocks = re.split(r"^\s*- alert:", text, flags=re.MULTILINE)[1:]
    assert blocks
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"severity: (critical|warning|info)\b", block), f"{name}: no severity"
        for annotation in ("summary", "description", "runbook"):
            assert re.search(rf"^\s*{annotation}:", block, re.MULTILINE), f"{name}: no {annotation}"
