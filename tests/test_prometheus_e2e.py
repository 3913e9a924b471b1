"""A real Prometheus scrapes a real relay on 127.0.0.1 and evaluates the alerting rules on it.

Two scrape jobs, as an operator would configure either: the main port with an admin token
(``authorization: credentials:``), and the token-less metrics port on loopback. The test waits
for both targets to be up, for a foliosync_ metric to be queryable through Prometheus's HTTP API,
and for every rule of deploy/prometheus/foliosync-rules.yml to be loaded and evaluated without an
error against the real series (a matching error, say, only shows there). Every dashboard
expression is then queried through the same API. Waits are bounded; Prometheus is stopped at the
end whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "foliosync-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "foliosync.json"
TIMEOUT = 40.0  # seconds for Prometheus to start, scrape and evaluate; it takes a few


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prometheus_config(main: str, metrics_port: int, token: str) -> str:
    """prometheus.yml as JSON (YAML's subset): scrape every second, evaluate every second."""
    return json.dumps(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "foliosync-relay",
                    "authorization": {"type": "Bearer", "credentials": token},
                    "static_configs": [{"targets": [main]}],
                },
                {
                    "job_name": "foliosync-relay-local",
                    "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                },
            ],
        },
        indent=2,
    )


@contextlib.asynccontextmanager
async def running_prometheus(tmp_path: Path, config: str) -> AsyncIterator[str]:
    """Prometheus on 127.0.0.1 with ``config``, its data in tmp_path; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the prometheus binary is not installed, so the relay cannot be scraped: install "
            "Prometheus (Debian/Ubuntu: apt-get install prometheus; tools/system-deps does it)"
        )
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(config)
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def api(http: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with http.get(url, params=params) as response:
        body = await response.json()
        assert body.get("status") == "success", body
        return body["data"]


async def wait_for(what: str, check: Any, prometheus_log: Path) -> Any:
    """Poll ``check()`` (a coroutine function returning a truthy result) for TIMEOUT seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    last: object = None
    while loop.time() < deadline:
        try:
            result = await check()
        except (aiohttp.ClientError, AssertionError) as exc:
            result, last = None, exc
        if result:
            return result
        await asyncio.sleep(0.25)
    log = prometheus_log.read_text(errors="replace")[-3000:] if prometheus_log.exists() else ""
    pytest.fail(f"{what} within {TIMEOUT} s (last: {last!r})\nprometheus log:\n{log}")


def evaluated_at(rule: dict[str, Any]) -> float:
    """A rule's lastEvaluation (RFC 3339 in nanoseconds) as a unix time; 0 if never."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", rule["lastEvaluation"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert:\s*(\w+)\s*$", RULES.read_text(), re.MULTILINE))


def dashboard_expressions() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    panels = [p for p in data["panels"] if p["type"] != "row"]
    panels += [inner for p in data["panels"] if p["type"] == "row" for inner in p["panels"]]
    return [target["expr"] for panel in panels for target in panel["targets"]]


async def test_prometheus_scrapes_the_relay_and_evaluates_every_rule(
    tmp_path: Path, relay_server: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    async with relay_server(tmp_path / "relay", metrics_port=0) as relay:
        metrics_port = relay.relay.metrics_port
        assert metrics_port
        replica = await open_replica("device")
        await (await replica.create_watchlist("Tech")).add(["AAPL"])
        client = sync_clients(replica, relay.url, relay.token("alice", "laptop"))
        client.start()
        await helpers.eventually(lambda: relay.relay.counters.updates_acknowledged > 0)

        admin = relay.token("prometheus", scopes=frozenset({"admin"}))
        config = prometheus_config(f"127.0.0.1:{relay.port}", metrics_port, admin)
        log = tmp_path / "prometheus.log"
        async with (
            running_prometheus(tmp_path, config) as prometheus,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        ):

            async def targets_up() -> bool:
                data = await api(http, f"{prometheus}/api/v1/targets")
                health = {t["labels"]["job"]: t["health"] for t in data["activeTargets"]}
                return health == {"foliosync-relay": "up", "foliosync-relay-local": "up"}

            await wait_for("both scrape targets up", targets_up, log)

            async def acknowledged() -> list[Any]:
                data = await api(
                    http, f"{prometheus}/api/v1/query", query="foliosync_updates_acknowledged_total"
                )
                jobs = {r["metric"]["job"] for r in data["result"] if float(r["value"][1]) >= 1}
                return (
                    data["result"] if jobs == {"foliosync-relay", "foliosync-relay-local"} else []
                )

            await wait_for("foliosync_updates_acknowledged_total >= 1 from both", acknowledged, log)

            async def rated() -> list[Any]:  # two samples each: rate() has something to say
                query = "rate(foliosync_connections_opened_total[1m])"
                data = await api(http, f"{prometheus}/api/v1/query", query=query)
                return data["result"] if len(data["result"]) == 2 else []

            await wait_for("two samples of each target", rated, log)
            since = time.time()

            async def rules_evaluated() -> list[dict[str, Any]]:
                """Every rule, once each has been evaluated on those samples."""
                data = await api(http, f"{prometheus}/api/v1/rules")
                rules = [rule for group in data["groups"] for rule in group["rules"]]
                evaluated = all(evaluated_at(rule) > since for rule in rules)
                return rules if rules and evaluated else []

            rules = await wait_for("every rule loaded and evaluated", rules_evaluated, log)
            assert {r["name"] for r in rules if r["type"] == "alerting"} == alert_names()
            failing = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
            assert not failing, f"rules that failed to evaluate on the relay's series: {failing}"
            # A healthy relay with a device and nothing wrong: nothing fires.
            firing = [r["name"] for r in rules if r.get("state") == "firing"]
            assert not firing, firing

            for expr in dashboard_expressions():
                concrete = expr.replace("$__rate_interval", "10s").replace("$instance", ".+")
                await api(http, f"{prometheus}/api/v1/query", query=concrete)
            connections = await api(
                http, f"{prometheus}/api/v1/query", query="sum(foliosync_connections)"
            )
            assert connections["result"], "no foliosync_connections through Prometheus"
