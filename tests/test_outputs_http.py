"""Issue 10.3: outputs from anywhere. `GET /jobs/<id>/outputs/<name>` serves a finished job's
output to the operator (token required, recorded outputs under the data directory only), and
`processdistro result` fetches it over HTTP when the output is not on the CLI's machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import Controller
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_pipeline import SMALL, run_nodes_until

TOKEN = "operator-token-for-the-outputs-test-0123456789"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


@pytest.fixture
def controller_env() -> dict[str, str]:
    return {"PD_OPERATOR_TOKEN": TOKEN}


@pytest.fixture
def finished(controller: Controller, tmp_path: Path, r: Client) -> tuple[str, Path]:
    """A mandelbrot job computed to the end: (its id, the raw output in the data dir)."""
    out = tmp_path / "local"
    out.mkdir()
    proc = controller.submit_mandelbrot(out, *SMALL)
    run_async(run_nodes_until(proc, Node(controller.url, controller.join_code)))
    assert proc.returncode == 0, (out / "submit.log").read_text() + controller.logs()
    job_id = r.zrange(keys.JOBS, 0, 0)[0].decode()
    outputs = json.loads(r.hget(keys.job(job_id), "outputs") or b"{}")
    raw = Path(outputs["raw"])
    assert raw.is_relative_to(controller.home / "data") and raw.read_bytes() == (out / "m.npy").read_bytes()
    return job_id, raw


def elsewhere(controller: Controller, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI on another machine: its own home, the controller's Redis and,
    as given, the gateway URL and the token; nothing of the controller's home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PD_")}
    env.update({"PD_HOME": str(tmp_path / "other-home"), "PD_REDIS_URL": controller.redis_url, **extra})
    return env


def cli_without_data(controller: Controller, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`processdistro ARGS` in a mount namespace where the controller's data directory is an
    empty tmpfs: the outputs' recorded paths do not exist for it, as on another machine."""
    data = controller.home / "data"
    script = f'mount -t tmpfs none "{data}" && exec "$@"'
    return subprocess.run(
        [UNSHARE, "-r", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "processdistro", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_result_fetches_an_output_over_http_bit_exact(
    controller: Controller, finished: tuple[str, Path], tmp_path: Path, r: Client
) -> None:
    job_id, raw = finished
    target = tmp_path / "fetched" / "m.npy"
    env = elsewhere(controller, tmp_path, PD_GATEWAY_URL=controller.url, PD_OPERATOR_TOKEN=TOKEN)
    done = cli_without_data(controller, env, "result", job_id, "--role", "raw", "-o", str(target))
    assert done.returncode == 0, done.stdout + done.stderr + controller.logs()
    assert target.read_bytes() == raw.read_bytes()
    assert not list(target.parent.glob(".*.part")), "the temporary download file was left behind"
    # --gateway and --token on the command line do the same
    flags = tmp_path / "flags.png"
    env = elsewhere(controller, tmp_path)
    done = cli_without_data(
        controller, env, "result", job_id, "-o", str(flags), "--gateway", controller.url, "--token", TOKEN
    )
    assert done.returncode == 0, done.stdout + done.stderr
    outputs = json.loads(r.hget(keys.job(job_id), "outputs") or b"{}")
    assert flags.read_bytes() == Path(outputs["image"]).read_bytes()


def test_result_without_the_token_is_refused(
    controller: Controller, finished: tuple[str, Path], tmp_path: Path
) -> None:
    job_id, _ = finished
    target = tmp_path / "m.npy"
    env = elsewhere(controller, tmp_path, PD_GATEWAY_URL=controller.url)
    done = cli_without_data(controller, env, "result", job_id, "--role", "raw", "-o", str(target))
    assert done.returncode != 0 and "operator's token" in done.stderr, done.stdout + done.stderr
    env = elsewhere(controller, tmp_path, PD_GATEWAY_URL=controller.url, PD_OPERATOR_TOKEN="not-the-token")
    done = cli_without_data(controller, env, "result", job_id, "--role", "raw", "-o", str(target))
    assert done.returncode != 0, done.stdout + done.stderr
    assert "refused" in done.stderr and "HTTP 403" in done.stderr and "operator's token" in done.stderr, done.stderr
    assert not target.exists()
    # no gateway known at all: says how to name one
    done = cli_without_data(controller, elsewhere(controller, tmp_path), "result", job_id, "-o", str(target))
    assert done.returncode != 0 and "--gateway" in done.stderr, done.stderr


def test_output_route_serves_recorded_outputs_only(
    controller: Controller, finished: tuple[str, Path], r: Client
) -> None:
    job_id, raw = finished
    url = f"{controller.url}/jobs/{job_id}/outputs"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ok = httpx.get(f"{url}/raw", headers=auth)
    assert ok.status_code == 200 and ok.content == raw.read_bytes()
    assert ok.headers["content-length"] == str(raw.stat().st_size)
    assert ok.headers["content-type"] == "application/x-npy"
    image = httpx.get(f"{url}/image", params={"token": TOKEN})  # a download link: the token in the query
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert httpx.get(f"{url}/raw").status_code == 401
    assert httpx.get(f"{url}/raw", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert httpx.get(f"{url}/nothing", headers=auth).status_code == 404
    assert httpx.get(f"{controller.url}/jobs/no-such-job/outputs/raw", headers=auth).status_code == 404
    # a name is a role, never a path
    for name in ("..%2F..%2Fetc%2Fpasswd", raw.name, "%2Fetc%2Fpasswd"):
        assert httpx.get(f"{url}/{name}", headers=auth).status_code == 404, name
    # a record naming a file outside the data directory (directly or by a symlink inside it) is not served
    link = raw.parent / "escape.npy"
    link.symlink_to("/etc/passwd")
    for path in ("/etc/passwd", str(raw.parent / ".." / ".." / ".." / "etc" / "passwd"), str(link)):
        r.hset(keys.job(job_id), "outputs", json.dumps({"raw": path}))
        assert httpx.get(f"{url}/raw", headers=auth).status_code == 404, path


def test_a_big_output_streams_with_a_progress_bar(
    controller: Controller, finished: tuple[str, Path], tmp_path: Path, r: Client
) -> None:
    """24 MiB (the job's record pointed at a file in its directory): streamed to disk in
    chunks, with the progress bar the CLI shows from 4 MiB, bit for bit."""
    job_id, raw = finished
    big = raw.parent / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    r.hset(keys.job(job_id), "outputs", json.dumps({"raw": str(big)}))
    target = tmp_path / "big.bin"
    env = elsewhere(controller, tmp_path, PD_GATEWAY_URL=controller.url, PD_OPERATOR_TOKEN=TOKEN)
    done = cli_without_data(controller, env, "result", job_id, "-o", str(target))
    assert done.returncode == 0, done.stdout + done.stderr
    assert target.read_bytes() == big.read_bytes()
    assert "MB" in done.stdout, done.stdout  # rich's DownloadColumn
