"""Static checks of docker-compose.yml that need no Docker engine (the stack itself runs in
`make compose-e2e` and `make swarm-e2e`)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def grafana_entrypoint(data_dir: Path) -> str:
    """The grafana service's entrypoint script as the container's shell would get it
    (compose turns `$$` into `$`), writing into `data_dir` and printing the password Grafana
    would be started with instead of starting it."""
    entry = compose()["services"]["grafana"]["entrypoint"]
    assert entry[:2] == ["/bin/sh", "-c"]
    script = entry[2].replace("$$", "$")
    assert "/var/lib/grafana/" in script and script.endswith("exec /run.sh")
    script = script.replace("/var/lib/grafana/", f"{data_dir}/")
    return script.removesuffix("exec /run.sh") + 'printf %s "$GF_SECURITY_ADMIN_PASSWORD"'


def run_entrypoint(data_dir: Path, password: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PD_", "GF_"))}
    if password is not None:
        env["PD_GRAFANA_ADMIN_PASSWORD"] = password
    out = subprocess.run(["/bin/sh", "-c", grafana_entrypoint(data_dir)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_grafana_admin_password_is_generated_not_admin(tmp_path: Path) -> None:
    """Issue 9.10: compose published Grafana with admin/admin. Now, with no
    PD_GRAFANA_ADMIN_PASSWORD, the first start generates a random password, kept (mode 0600)
    in the grafana-data volume and the same on every later start."""
    env = compose()["services"]["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert env["PD_GRAFANA_ADMIN_PASSWORD"] == "${PD_GRAFANA_ADMIN_PASSWORD:-}"
    first = run_entrypoint(tmp_path, None)
    assert first != "admin" and len(first) >= 24 and first.isalnum()
    kept = tmp_path / "pd-admin-password"
    assert kept.read_text() == first
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert run_entrypoint(tmp_path, None) == first
    other = tmp_path / "other"
    other.mkdir()
    assert run_entrypoint(other, None) != first


def test_grafana_admin_password_from_the_environment(tmp_path: Path) -> None:
    """Issue 9.10: an operator's PD_GRAFANA_ADMIN_PASSWORD is the one Grafana gets."""
    assert run_entrypoint(tmp_path, "s3cret pass") == "s3cret pass"
    assert (tmp_path / "pd-admin-password").read_text() == "s3cret pass"


@pytest.mark.parametrize("service", ["gateway", "scheduler", "aggregator"])
def test_services_share_one_buildable_image(service: str) -> None:
    """BASE_IMAGE and WHEELHOUSE reach the build (services/local-images.sh sets them); the
    defaults are the registry's python:3.11-slim and plain pip."""
    svc = compose()["services"][service]
    assert svc["image"] == "${PD_IMAGE:-processdistro:local}"
    assert svc["build"]["args"] == {
        "BASE_IMAGE": "${PD_BASE_IMAGE:-python:3.11-slim}",
        "WHEELHOUSE": "${PD_WHEELHOUSE:-}",
    }
    dockerfile = (ROOT / "services/Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in dockerfile


def test_aggregators_are_scraped() -> None:
    """Every aggregator replica serves /metrics on PD_METRICS_PORT and Prometheus finds them
    all by DNS (on a swarm, endpoint_mode dnsrr makes the name resolve to every replica)."""
    agg = compose()["services"]["aggregator"]
    port = int(agg["environment"]["PD_METRICS_PORT"])
    assert agg["deploy"]["endpoint_mode"] == "dnsrr"
    prom = yaml.safe_load((ROOT / "services/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    sd = jobs["processdistro-aggregator"]["dns_sd_configs"]
    assert sd == [{"names": ["aggregator"], "type": "A", "port": port, "refresh_interval": "15s"}]


def test_compose_check_passes() -> None:
    """.ci/compose_check.sh (the structural rules, and `docker compose config` when a compose
    CLI is installed) accepts the file."""
    out = subprocess.run(["bash", str(ROOT / ".ci/compose_check.sh")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
