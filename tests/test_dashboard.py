"""The Grafana dashboard and the alerting rules query only metrics a real relay exports.

The metric names are a contract between the relay's /metrics and deploy/: a renamed metric
would leave a panel empty or an alert silent without any error, so the test runs a real relay,
makes it sync a device and take a published price, and looks up every name that a dashboard
expression or a rule expression uses in what the relay's /metrics serves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "foliosync.json"
RULES = ROOT / "deploy" / "prometheus" / "foliosync-rules.yml"

# Series Prometheus makes itself for every target; a rule may use them, the relay never has them.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# PromQL's functions and aggregations are followed by "(", so they never look like a metric; its
# keywords and operators that are words are not.
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_OFFSET = re.compile(r"\boffset\s+-?(\d+(ms|[smhdwy]))+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w:])(0x[0-9a-f]+|\d+(\.\d*)?(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?)", re.I)
_IDENTIFIER = re.compile(r"(?<![\w:$])[A-Za-z_:][\w:]*(?!\w)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's ``$variables`` allowed).

    Strings (label values, and selectors' regexes), label matchers in braces, ranges, offsets
    and the label lists of ``by``/``on``/... go first; what is left is functions (an identifier
    followed by "("), keywords, numbers, and metric names.
    """
    text = _STRING.sub(" ", expr)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables outside strings ($__rate_interval)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_names_are_read_carefully_out_of_promql() -> None:
    assert metric_names(
        "histogram_quantile(0.99, sum by (job, instance, le) "
        '(rate(foo_seconds_bucket{code=~"1006|x"}[$__rate_interval])))'
    ) == {"foo_seconds_bucket"}
    assert metric_names(
        "sum by (instance, reason) (rate(a_total[5m])) / on (job, instance) group_left "
        "sum by (job, instance) (rate(b_total[5m])) > 0.2 and c offset 5m == 1e3"
    ) == {"a_total", "b_total", "c"}
    assert metric_names('time() - start_time{instance=~"$instance"} or vector(0)') == {"start_time"}
    assert metric_names("min_over_time(open[5m]) == 1 and on(job) (open offset 5m) == 1") == {
        "open"
    }
    assert metric_names('absent(up{job=~"foliosync.*"})') == {"up"}
    assert metric_names("sum(x) without (le) > bool 2") == {"x"}


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    """Every panel but rows (rows only group panels; collapsed ones hold theirs)."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_expressions() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels() for target in panel["targets"]]


def rule_expressions() -> list[tuple[str, str]]:
    """``(rule name, expr)`` of every rule, read from the file's one layout: ``expr:`` either
    on its line or as a ``>-`` block of more-indented lines."""
    lines = RULES.read_text().splitlines()
    found: list[tuple[str, str]] = []
    name = ""
    for i, line in enumerate(lines):
        if head := re.match(r"\s*- (?:alert|record):\s*(\S+)", line):
            name = head.group(1)
        if not (expr := re.match(r"(\s*)expr:\s*(.*)$", line)):
            continue
        indent, rest = len(expr.group(1)), expr.group(2).strip()
        if rest not in (">-", ">", "|", "|-"):
            found.append((name, rest))
            continue
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        found.append((name, " ".join(block).strip()))
    return found


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable() -> None:
    data = dashboard()
    assert data["title"] and data["uid"] and isinstance(data["schemaVersion"], int)
    assert data["schemaVersion"] >= 36  # Grafana 9.x and later; 39 is Grafana 10.4/11
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_every_panel_has_the_datasource_and_a_target() -> None:
    found = panels()
    assert len(found) >= 20
    for panel in found:
        title = panel.get("title") or panel["id"]
        assert panel.get("datasource") == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel.get("targets"), f"{title}: no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{title}: a target without an expression"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{title}: wider than the grid"


def test_the_panels_cover_what_an_operator_watches() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))
    for name in (
        "foliosync_connections",
        "foliosync_connections_closed_total",
        "foliosync_frames_received_total",
        "foliosync_sent_bytes_total",
        "foliosync_update_store_seconds_bucket",
        "foliosync_updates_refused_total",
        "foliosync_updates_merged_concurrent_total",
        "foliosync_followed_price_age_max_seconds",
        "foliosync_followed_symbols_stale",
        "foliosync_price_delivery_seconds_bucket",
        "foliosync_market_open",
        "foliosync_document_cache_hits_total",
        "foliosync_store_seconds_bucket",
        "foliosync_store_errors_total",
        "foliosync_fanout_lag_seconds_bucket",
        "foliosync_fanout_errors_total",
        "foliosync_initial_syncs_waiting",
        "foliosync_prices_conflated_total",
        "foliosync_prices_dropped_total",
    ):
        assert name in used, f"no panel shows {name}"


def test_every_dashboard_expression_is_promql_prometheus_accepts(tmp_path: Path) -> None:
    """Grafana's variables are replaced by what Grafana would send; promtool parses the rest as
    recording rules would be parsed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (apt-get install prometheus; tools/system-deps)")
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_expressions()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".+")
        rules += [f"      - record: dashboard:expr_{i}", f"        expr: {json.dumps(concrete)}"]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


def exported_names(exposition: str) -> set[str]:
    """The sample names of a Prometheus text exposition, and those its ``# TYPE`` lines
    declare (a labelled counter that has not counted yet has no sample, but is exported)."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
    }
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names.add(family)
            names.update(family.removesuffix("_total") + s for s in suffixes.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


async def relay_metrics_after_traffic(
    relay: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> str:
    """A device syncs a watchlist, a publisher posts a tick the device follows, and /metrics
    is read with an admin token."""
    replica = await open_replica("device")
    watchlist = await replica.create_watchlist("Tech")
    await watchlist.add(["AAPL", "MSFT"])
    client = sync_clients(replica, relay.url, relay.token("alice", "laptop"))
    client.start()
    await helpers.eventually(lambda: "AAPL" in relay.relay.prices.subscribed_symbols())
    await helpers.eventually(lambda: relay.relay.counters.updates_acknowledged > 0)
    async with aiohttp.ClientSession() as http:
        publish = relay.token("feed", scopes=frozenset({"publish"}))
        tick = {"symbol": "AAPL", "price": "187.25", "timestamp": int(time.time() * 1000)}
        async with http.post(
            f"{relay.http}/v1/ticks",
            json={"ticks": [tick]},
            headers={"Authorization": f"Bearer {publish}"},
        ) as response:
            assert response.status == 200, await response.text()
        await helpers.eventually(lambda: replica.quotes.get("AAPL") is not None)
        await client.stop()  # a close, counted by its code
        await helpers.eventually(lambda: not relay.relay.connections)
        admin = relay.token("prometheus", scopes=frozenset({"admin"}))
        async with http.get(
            f"{relay.http}/metrics", headers={"Authorization": f"Bearer {admin}"}
        ) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "text/plain"
            return await response.text()


async def test_every_metric_the_dashboard_and_rules_use_is_exported(
    relay: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    exposition = await relay_metrics_after_traffic(relay, open_replica, sync_clients, helpers)
    exported = exported_names(exposition)
    # The traffic shows in the samples themselves, not only in declarations.
    assert re.search(r"^foliosync_updates_acknowledged_total [1-9]", exposition, re.M), exposition
    assert re.search(r'^foliosync_connections_closed_total\{code="1000"\} 1', exposition, re.M)
    assert re.search(r"^foliosync_ticks_received_total [1-9]", exposition, re.M)

    missing = {
        f"{name} (panel {title!r})"
        for title, expr in dashboard_expressions()
        for name in metric_names(expr)
        if name not in exported
    }
    assert not missing, f"the dashboard queries metrics the relay does not export: {missing}"

    rules = rule_expressions()
    assert len(rules) >= 10, "the rules file's expressions were not found"
    recorded = {name for name, _ in rules if ":" in name}
    missing = {
        f"{name} (rule {rule})"
        for rule, expr in rules
        for name in metric_names(expr)
        if name not in exported and name not in recorded and name not in PROMETHEUS_SERIES
    }
    assert not missing, f"the rules use metrics the relay does not export: {missing}"
