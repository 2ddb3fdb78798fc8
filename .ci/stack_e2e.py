"""The checks of `make compose-e2e` and `make swarm-e2e`, against a stack that is up.

Run by .ci/compose_e2e.sh and .ci/swarm_e2e.sh (which build, start and tear down) with the
project's venv: `python .ci/stack_e2e.py compose|swarm --project NAME`. From the host it:
waits until every service is healthy; joins a native worker to the gateway's published
port; submits a Mandelbrot job with the host's CLI; kills (SIGKILL from the host, as a crash)
the scheduler and one aggregator mid-job and waits for the restart policy to bring them
back; checks the job's counts bit for bit against the NumPy reference; checks that
Prometheus scrapes every gateway and every aggregator; fetches the outputs out of the data
volume with `docker cp`. Exits 0 only when all of that held; each step prints its time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from mandel_ref import reference_counts  # noqa: E402
from processdistro.shared import keys  # noqa: E402
from processdistro.shared.store.connection import plain_client  # noqa: E402

GATEWAY = f"http://127.0.0.1:{os.environ.get('PD_GATEWAY_PORT', '30000')}"
PROMETHEUS = f"http://127.0.0.1:{os.environ.get('PD_PROMETHEUS_PORT', '9090')}"
AGGREGATORS = 3
# Big enough to outlast the kills (the worker is throttled), small enough for CI.
JOB = {"width": 1024, "height": 1024, "max_iter": 4000, "tile": 64}
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"stack_e2e: FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def docker(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        fail(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def wait_for(what: str, ok: Callable[[], bool], timeout: float, every: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                say(f"ok: {what}")
                return
        except Exception:  # the thing waited for may not answer yet  # noqa: BLE001, S110
            pass
        time.sleep(every)
    fail(f"timed out after {timeout:.0f}s waiting for: {what}")


class Stack:
    """Containers of one service, found by the labels compose or swarm put on them."""

    def __init__(self, mode: str, project: str) -> None:
        self.mode = mode
        self.project = project

    def label(self, service: str) -> list[str]:
        if self.mode == "compose":
            return [
                "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", f"label=com.docker.compose.service={service}",
            ]  # fmt: skip
        return ["--filter", f"label=com.docker.swarm.service.name={self.project}_{service}"]

    def containers(self, service: str) -> list[str]:
        return docker("ps", "-q", "--filter", "status=running", *self.label(service)).split()

    def healthy(self, service: str, want: int) -> bool:
        ids = self.containers(service)
        states = [docker("inspect", "-f", "{{.State.Health.Status}}", c, check=False) for c in ids]
        return len(ids) == want and all(s == "healthy" for s in states)

    def crash(self, service: str) -> str:
        """SIGKILL the container's init from the host: a crash, not a `docker stop`, so the
        restart policy applies. Returns the killed container's id."""
        cid = self.containers(service)[0]
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", cid))
        os.kill(pid, 9)
        say(f"killed {service} container {cid[:12]} (pid {pid})")
        return cid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("compose", "swarm"))
    ap.add_argument("--project", required=True)
    args = ap.parse_args()
    stack = Stack(args.mode, args.project)
    redis_url = os.environ["PD_REDIS_URL"]
    want = {"redis": 1, "gateway": 1, "scheduler": 1, "aggregator": AGGREGATORS}

    for service, n in want.items():
        wait_for(f"{n} healthy {service}", lambda s=service, n=n: stack.healthy(s, n), timeout=300)
    wait_for(
        "gateway /healthz from the host",
        lambda: urllib.request.urlopen(f"{GATEWAY}/healthz", timeout=5).status == 200,
        60,
    )

    r = plain_client(redis_url)
    wait_for("a join code in Redis", lambda: r.get(keys.JOIN_CODE) is not None, 60)
    code = r.get(keys.JOIN_CODE).decode()  # type: ignore[union-attr]

    home = Path(tempfile.mkdtemp(prefix="pd-e2e-worker-"))
    venv_bin = Path(sys.executable).parent
    worker_log = open(home / "worker.log", "wb")  # noqa: SIM115
    # Throttled, so that the job is still running when the services are killed.
    worker = subprocess.Popen(
        [str(venv_bin / "processdistro"), "worker", f"{GATEWAY}/agent?code={code}", "--cores", "2", "--throttle", "3"],
        env={**os.environ, "PD_HOME": str(home)},
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        run_job(stack, r, redis_url, venv_bin, home)
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker_log.close()
        if worker.returncode not in (0, -15):
            print((home / "worker.log").read_text()[-3000:], file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)


def run_job(stack: Stack, r, redis_url: str, venv_bin: Path, home: Path) -> None:  # type: ignore[no-untyped-def]
    wait_for("the native worker connected", lambda: r.zcard(keys.NODES) >= 1, 90)
    out = subprocess.run(
        [str(venv_bin / "processdistro"), "submit", "mandelbrot", "--width", str(JOB["width"]),
         "--height", str(JOB["height"]), "--max-iter", str(JOB["max_iter"]), "--tile", str(JOB["tile"])],
        env={**os.environ, "PD_REDIS_URL": redis_url, "PD_HOME": str(home)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        fail(f"submit: {out.stdout}{out.stderr}")
    job_ids = [j.decode() for j in r.zrange(keys.JOBS, 0, -1)]
    if len(job_ids) != 1:
        fail(f"expected one job in Redis, found {job_ids}")
    job_id = job_ids[0]
    say(f"submitted job {job_id}")

    def job() -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in r.hgetall(keys.job(job_id)).items()}

    def progress() -> tuple[int, int]:
        h = job()
        return int(h.get("done", 0)), int(h.get("total", 0) or 0)

    wait_for("the job a tenth done", lambda: progress()[1] > 0 and progress()[0] >= progress()[1] // 10, 240, 0.5)
    done, total = progress()
    if done >= total:
        fail(f"the job finished before the kills ({done}/{total}): make it bigger")
    killed = {s: stack.crash(s) for s in ("scheduler", "aggregator")}
    say(f"killed scheduler and one aggregator at {done}/{total}")
    wait_for("the job done", lambda: job().get("state") == "done", 600, 1.0)
    if progress()[0] >= total and progress()[0] > done:
        say(f"job done: {progress()[0]}/{total} after the kills")

    # the restart policy brought both back
    for service, n in (("scheduler", 1), ("aggregator", AGGREGATORS)):
        wait_for(f"{n} healthy {service} again", lambda s=service, n=n: stack.healthy(s, n), 300)
    if stack.mode == "compose":
        for service, cid in killed.items():
            restarts = int(docker("inspect", "-f", "{{.RestartCount}}", cid))
            if restarts < 1:
                fail(f"{service} container {cid[:12]} was not restarted by its policy")
            say(f"{service}: restarted by its policy ({restarts}x)")

    # Prometheus scrapes every gateway and every aggregator
    def scraped() -> bool:
        with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/targets?state=active", timeout=5) as resp:
            targets = json.load(resp)["data"]["activeTargets"]
        up = {}
        for t in targets:
            up.setdefault(t["labels"]["job"], []).append(t["health"] == "up")
        gw, agg = up.get("processdistro-gateway", []), up.get("processdistro-aggregator", [])
        return len(gw) == 1 and all(gw) and len(agg) == AGGREGATORS and all(agg)

    wait_for("Prometheus scrapes 1 gateway and 3 aggregators, all up", scraped, 120, 3)

    def query(expr: str) -> list[dict[str, object]]:
        url = f"{PROMETHEUS}/api/v1/query?query={urllib.request.quote(expr)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.load(resp)["data"]["result"]  # type: ignore[no-any-return]

    wait_for(
        "Prometheus has the gateway's completed-task counter and the aggregators' result counters",
        lambda: bool(query("processdistro_tasks_completed_total"))
        and bool(query("processdistro_aggregator_results_total")),
        60, 3,
    )  # fmt: skip

    # the outputs, fetched out of the data volume from the host
    outputs = json.loads(job().get("outputs", "{}"))
    if "raw" not in outputs:
        fail(f"job outputs name no raw counts: {outputs}")
    source = stack.containers("gateway")[0]  # it mounts pd-data (read-only)
    dest = home / "fetched"
    dest.mkdir()
    for role, path in outputs.items():
        docker("cp", f"{source}:{path}", str(dest / Path(path).name))
        say(f"fetched {role}: {path} ({(dest / Path(path).name).stat().st_size} bytes)")
    counts = np.load(dest / Path(outputs["raw"]).name)
    ref = reference_counts(JOB["width"], JOB["height"], -2.0, 1.0, -1.5, 1.5, JOB["max_iter"])
    if counts.dtype != np.uint32 or counts.shape != ref.shape or not np.array_equal(counts, ref):
        fail(
            f"the counts differ from the reference ({counts.dtype} {counts.shape}, {int((counts != ref).sum())} pixels)"
        )
    say(f"counts bit-exact against the reference ({counts.shape[1]}x{counts.shape[0]}, max_iter {JOB['max_iter']})")
    say("stack_e2e: all checks held")


if __name__ == "__main__":
    main()
