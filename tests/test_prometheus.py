"""Issue 10.7: the compose Grafana dashboard's queries against a real Prometheus scraping a
running controller with two gateways and an aggregator, while a real job runs on two nodes;
`promtool` on the scrape output and the rules; and the cluster figures not doubled by a
second gateway under the documented aggregation (`max` of the `scope="cluster"` series).

Debian's `prometheus` package provides both binaries (`make prometheus` installs it; so does
`.ci/run`). Without them these tests fail, saying so: they are not skipped.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Controller
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.redis_server import free_port
from processdistro.shared.store.connection import Client
from test_pipeline import expected_small, submit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "services" / "prometheus"
DASHBOARD = ROOT / "services" / "grafana" / "provisioning" / "dashboards" / "processdistro.json"
SCRAPE_S = 1


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not on PATH: install Debian's prometheus package "
            "(`make prometheus`, or `apt-get install prometheus`), which brings prometheus and promtool"
        )
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the compose Grafana dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


# ------------------------------------------------------------------ promtool, no controller


def test_rules_check_and_unit_tests() -> None:
    """`promtool check rules`, and the rules' unit tests (two gateways' series: the recorded
    cluster figures are not doubled; the alerts fire when they should)."""
    promtool = binary("promtool")
    check = subprocess.run([promtool, "check", "rules", "rules.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=PROM_DIR, capture_output=True, text=True)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    config = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"], cwd=PROM_DIR, capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_cluster_query_uses_the_documented_aggregation() -> None:
    """A dashboard query that reads a cluster figure selects `scope="cluster"` and takes
    `max`; one that reads a per-process figure never does."""
    cluster = ("processdistro_nodes_connected", "processdistro_tasks_", "processdistro_jobs_active")
    for title, expr in dashboard_queries():
        if any(name in expr for name in cluster) and "latency" not in expr:
            assert 'scope="cluster"' in expr and expr.startswith("max("), (title, expr)
        else:
            assert "scope=" not in expr and "max(" not in expr, (title, expr)


# ------------------------------------------------------------------ a real Prometheus


@pytest.fixture
def aggregator_metrics_port() -> int:
    return free_port()


@pytest.fixture
def controller_env(aggregator_metrics_port: int) -> dict[str, str]:
    return {"PD_METRICS_PORT": str(aggregator_metrics_port)}


@pytest.fixture
def second_gateway(controller: Controller) -> Iterator[str]:
    """Another gateway process on the same Redis (as `--scale gateway=2` runs it)."""
    port = free_port()
    log = open(controller.home / "gateway2.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "processdistro", "gateway"],
        env={**controller.env, "PD_PORT": str(port)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    controller.procs["gateway2"] = proc  # stopped with the others
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, controller.logs()
        time.sleep(0.1)
    else:
        raise AssertionError("second gateway not healthy within 30 s\n" + controller.logs())
    yield url


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def query(self, expr: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (expr, body)
        assert body["data"]["resultType"] == "vector", (expr, body)
        return list(body["data"]["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def targets_up(self) -> int:
        return sum(
            t["health"] == "up"
            for t in httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        )


@pytest.fixture
def prometheus(
    controller: Controller, second_gateway: str, aggregator_metrics_port: int, tmp_path: Path
) -> Iterator[Prometheus]:
    """A real Prometheus scraping both gateways and the aggregator every second, with the
    repository's rules file evaluated every second."""
    exe = binary("prometheus")
    port = free_port()
    gw = [controller.url.removeprefix("http://"), second_gateway.removeprefix("http://")]
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(PROM_DIR / "rules.yml")],
        "scrape_configs": [
            {"job_name": "processdistro-gateway", "static_configs": [{"targets": gw}]},
            {
                "job_name": "processdistro-aggregator",
                "static_configs": [{"targets": [f"127.0.0.1:{aggregator_metrics_port}"]}],
            },
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    check = subprocess.run([binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200 and prom.targets_up() == 3:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("Prometheus not ready with 3 targets up within 60 s\n" + log.read_text()[-3000:])
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


def test_dashboard_queries_return_data_from_a_real_prometheus(
    controller: Controller, second_gateway: str, prometheus: Prometheus, tmp_path: Path, r: Client
) -> None:
    """A Mandelbrot job on two nodes, one on each gateway, while Prometheus scrapes both and
    the aggregator: every query of the Grafana dashboard returns finite data; the cluster
    figures under the documented `max` equal the cluster's (a `sum` would double them), and
    the per-gateway latency counts add up (a `max` would miss one gateway's); the recording
    rules hold the same figures; `promtool check metrics` accepts every scrape."""
    out = tmp_path / "job"
    out.mkdir()
    proc = submit(controller, out)
    nodes = [
        Node(controller.url, controller.join_code, delay=0.15),
        Node(second_gateway, controller.join_code, delay=0.15),
    ]
    seen: dict[str, Any] = {}

    def while_connected() -> None:
        """Runs in a thread while both nodes stay connected after the job."""
        proc.wait(timeout=240)
        time.sleep(4 * SCRAPE_S)  # the last figures scraped and the rules evaluated
        completed = int(r.hget(keys.STATS, "tasks_completed") or 0)
        seen["completed"] = completed
        seen["queries"] = {(title, expr): prometheus.query(expr) for title, expr in dashboard_queries()}
        seen["nodes_max"] = prometheus.value('max(processdistro_nodes_connected{scope="cluster"})')
        seen["nodes_sum"] = prometheus.value('sum(processdistro_nodes_connected{scope="cluster"})')
        seen["nodes_series"] = prometheus.query('processdistro_nodes_connected{scope="cluster"}')
        seen["completed_max"] = prometheus.value('max(processdistro_tasks_completed_total{scope="cluster"})')
        seen["completed_sum"] = prometheus.value('sum(processdistro_tasks_completed_total{scope="cluster"})')
        seen["latency_counts"] = prometheus.query("processdistro_task_latency_seconds_count")
        seen["recorded_nodes"] = prometheus.value("cluster:processdistro_nodes_connected:max")
        seen["metrics_json"] = httpx.get(f"{controller.url}/metrics.json").json()
        seen["scrapes"] = {
            url: httpx.get(f"{url}/metrics").text
            for url in (controller.url, second_gateway, f"http://127.0.0.1:{controller.env['PD_METRICS_PORT']}")
        }
        seen["rules"] = httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]

    async def main() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(n.run(stop=stop)) for n in nodes]
        try:
            await asyncio.to_thread(while_connected)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    run_async(main())
    assert proc.returncode == 0, (out / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(out / "m.npy"), expected_small())
    assert all(n.done > 0 for n in nodes), "each gateway served a node"

    for (title, expr), result in seen["queries"].items():
        assert result, f"panel {title!r}: {expr} returned no data\n{prometheus.log.read_text()[-2000:]}"
        assert finite_values(result), f"panel {title!r}: {expr} returned only NaN: {result}"
    completed = seen["completed"]
    assert completed > 0
    # cluster figures: two series (one per gateway) of the same value; max is the figure
    assert len(seen["nodes_series"]) == 2
    assert seen["nodes_max"] == seen["metrics_json"]["nodes_connected"] == 2
    assert seen["nodes_sum"] == 4, "the naive sum counts each node once per gateway"
    assert seen["completed_max"] == completed and seen["completed_sum"] == 2 * completed
    assert seen["recorded_nodes"] == 2
    # per-gateway figures: each gateway observed its own node's results; they add up
    counts = sorted(float(s["value"][1]) for s in seen["latency_counts"])
    assert len(counts) == 2 and counts[0] > 0, counts
    assert counts[1] < completed <= sum(counts), (counts, completed)
    # the rules Prometheus evaluated: all healthy
    rules = [rule for group in seen["rules"] for rule in group["rules"]]
    assert len(rules) >= 10 and all(rule["health"] == "ok" for rule in rules), rules
    # promtool lints every scrape (gateways and aggregator)
    promtool = binary("promtool")
    for url, text in seen["scrapes"].items():
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, f"{url}/metrics: {lint.stdout}{lint.stderr}"
