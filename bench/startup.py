"""Startup and shutdown: `processdistro up` to ready and back, and a browser's join to its
first task.

- `up`: `processdistro up` with a fresh `PD_HOME` (so an embedded Redis of its own) and a
  free port, timed from the spawn of the process to (a) its "ProcessDistro is up." line
  (the join link printed), and (b) *ready*: `/healthz` answers 200 and the scheduler's and
  the aggregator's liveness keys are in Redis (a job submitted now is taken at once). Then
  SIGINT to its exit (every service and Redis stopped). `REPS` runs, median and range.
- The browser: real Chromium (`/usr/bin/chromium` through playwright, as the browser tests
  run it), a controller of three real service processes with a Mandelbrot job queued and no
  node, so work waits. Each run opens a fresh browser context (its own localStorage and HTTP
  cache: a device's first join), loads the join link, clicks Join, and times from the click
  to the node report (the request), the socket's opening, the welcome, and the first task
  frame on the socket. `REPS` runs, median and range.

Goals (issue 11, goal 5): join -> first task under 1 s; `up` -> ready under 1.5 s. The
machine is shared: the load average is in the report.

Before and after in one run: with `PD_BENCH_BEFORE=<git revision>` the `up` runs alternate
with runs of that revision's code (exported with `git archive` into a temporary directory
and put first on `PYTHONPATH`, so `python -m processdistro` and the services it starts are
that revision's), and the report has a row for each.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from processdistro.shared import keys
from processdistro.shared.redis_server import EmbeddedRedis, free_port
from processdistro.shared.store.connection import plain_client
from rich.console import Console

from . import Report, Table
from .pipeline import _test_helpers, make_controller

REPS = {False: 5, True: 2}
UP_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 60.0
UP_GOAL_S = 1.5
JOIN_GOAL_S = 1.0
# a job with more tiles than the joins can finish: there is always a task waiting
JOB = ["--width", "2048", "--height", "2048", "--tile", "64", "--max-iter", "2000", "--replicate", "0"]


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------- up


@dataclass
class UpRun:
    printed_s: float  # spawn -> the "ProcessDistro is up." line
    ready_s: float  # spawn -> /healthz 200 and the scheduler and aggregator alive
    stop_s: float  # SIGINT -> the process exited
    cpu_s: float = 0.0  # CPU time (user + system) of `up` and its services when it was ready


def up_once(work: Path, code: Path | None = None) -> UpRun:
    """One `up`, of this checkout's code, or with `code` (`baseline_code`) of another's."""
    home = work / f"home-{time.monotonic_ns()}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PD_REDIS_URL"}
    env |= {"PD_HOME": str(home), "PD_PORT": str(port), "PD_HOST": "127.0.0.1"}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    out = work / "up.out"
    with open(out, "wb") as fh:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "processdistro", "up"], env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    printed = ready = cpu = 0.0
    client = None
    try:
        while not ready:
            now = time.perf_counter() - started
            if proc.poll() is not None or now > UP_TIMEOUT_S:
                raise RuntimeError(f"up did not become ready in {now:.0f} s:\n{out.read_text()[-3000:]}")
            if not printed and "ProcessDistro is up." in out.read_text(errors="replace"):
                printed = now
            if printed and client is None:
                client = plain_client(_redis_url(home))
            if client is not None and _ready(client, port):
                ready = time.perf_counter() - started
                cpu = cpu_seconds(proc.pid)
            time.sleep(0.01)
        stopping = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        proc.wait(UP_TIMEOUT_S)
        stop = time.perf_counter() - stopping
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"up exited {proc.returncode}:\n{out.read_text()[-3000:]}")
    return UpRun(printed, ready, stop, cpu)


def cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` and its Python children (not redis-server, the same program
    before and after), from /proc: what starting cost whatever else the machine ran. A forked
    child counts from its fork, its parent's work before it in the parent's figure."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for each in [pid, *map(int, children)]:
        try:
            if "redis-server" in Path(f"/proc/{each}/cmdline").read_text():
                continue
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def baseline_code(revision: str, work: Path) -> Path:
    """The package as of git `revision`, laid out as it installs (`processdistro` is cli/,
    with shared/, gateway/, ... inside it): a directory to put first on `PYTHONPATH`. The
    editable install's finder comes after the path entries, so this code is what runs."""
    tree = work / "baseline"
    tree.mkdir()
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for package in ("shared", "gateway", "scheduler", "aggregator", "worker"):
        (tree / "cli" / package).symlink_to(tree / package, target_is_directory=True)
    path = work / "baseline-path"
    path.mkdir()
    (path / "processdistro").symlink_to(tree / "cli", target_is_directory=True)
    return path


def _redis_url(home: Path) -> str:
    import json

    return str(json.loads((home / "controller.json").read_text())["redis_url"])


def _ready(client: Any, port: int) -> bool:
    try:
        if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code != 200:
            return False
    except httpx.HTTPError:
        return False
    services = {k.decode().split(":")[2] for k in client.scan_iter(match="pd:service:*")}
    return {"scheduler", "aggregator"} <= services


# ---------------------------------------------------------------------------- the browser


@dataclass
class JoinRun:
    marks: dict[str, float] = field(default_factory=dict)  # phase -> seconds after the click


def join_once(browser: Any, join_url: str) -> JoinRun:
    run = JoinRun()
    context = browser.new_context()
    try:
        page = context.new_page()
        clicked = [0.0]

        def mark(name: str) -> None:
            if clicked[0] and name not in run.marks:
                run.marks[name] = time.perf_counter() - clicked[0]

        def on_request(request: Any) -> None:
            if request.url.endswith("/node-report"):
                mark("node report sent")

        def on_socket(ws: Any) -> None:
            mark("socket opened")

            def on_frame(payload: str | bytes) -> None:
                text = payload if isinstance(payload, str) else payload.decode(errors="replace")
                if '"type":"welcome"' in text.replace(" ", ""):
                    mark("welcome")
                elif '"type":"task"' in text.replace(" ", ""):
                    mark("first task")

            ws.on("framereceived", on_frame)

        page.on("request", on_request)
        page.on("websocket", on_socket)
        page.goto(join_url)
        page.wait_for_selector("#join")
        clicked[0] = time.perf_counter()
        page.click("#join")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while "first task" not in run.marks:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no task {JOIN_TIMEOUT_S:.0f} s after Join: {run.marks}")
            page.wait_for_timeout(5)  # lets playwright deliver the page's events
    finally:
        context.close()
    return run


def browser_runs(reps: int, console: Console) -> list[JoinRun]:
    from playwright.sync_api import sync_playwright

    controller_cls, _node = _test_helpers()
    from conftest import CHROMIUM, CHROMIUM_ARGS

    runs: list[JoinRun] = []
    with tempfile.TemporaryDirectory(prefix="pd-bench-startup-") as tmp:
        work = Path(tmp)
        server = EmbeddedRedis(directory=work / "redis", persist=False)
        url = server.start()
        home = work / "pd-home"
        home.mkdir()
        ctl = make_controller(controller_cls, url, home, None)
        try:
            ctl.wait_ready()
            subprocess.run(
                [sys.executable, "-m", "processdistro", "submit", "mandelbrot", *JOB, "-q"],
                env=ctl.env,
                check=True,
                capture_output=True,
            )
            r = plain_client(url)
            try:
                deadline = time.monotonic() + 30
                while not r.xlen(keys.TASKS):  # the scheduler has fed the first tasks
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no task queued\n{ctl.logs()}")
                    time.sleep(0.05)
            finally:
                r.close()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                try:
                    for rep in range(reps):
                        console.print(f"browser join {rep + 1}/{reps}")
                        runs.append(join_once(browser, ctl.join_url))
                finally:
                    browser.close()
        finally:
            ctl.stop()
            server.stop()
    return runs


# ---------------------------------------------------------------------------- the report


def run(*, quick: bool, console: Console) -> Report:
    reps = REPS[quick]
    revision = os.environ.get("PD_BENCH_BEFORE")
    before = load()
    ups: list[UpRun] = []
    olds: list[UpRun] = []
    with tempfile.TemporaryDirectory(prefix="pd-bench-up-") as tmp:
        old_code = baseline_code(revision, Path(tmp)) if revision else None
        for rep in range(reps):
            console.print(f"processdistro up {rep + 1}/{reps}")
            if old_code is None:
                ups.append(up_once(Path(tmp)))
                continue
            # alternate which goes first, so neither always meets the other's leftovers
            for which in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                (olds if which == "old" else ups).append(up_once(Path(tmp), old_code if which == "old" else None))
    joins = browser_runs(reps, console)
    after = load()

    def stats(values: list[float]) -> list[Any]:
        return [statistics.median(values), min(values), max(values)]

    up_table = Table(
        f"processdistro up (fresh home, embedded Redis): {reps} runs",
        ["from -> to", "median s", "min s", "max s", "goal s"],
    )
    up_table.rows.append(["spawn -> 'ProcessDistro is up.'", *stats([u.printed_s for u in ups]), ""])
    up_table.rows.append(
        ["spawn -> ready (healthz, scheduler, aggregator)", *stats([u.ready_s for u in ups]), UP_GOAL_S]
    )
    up_table.rows.append(["SIGINT -> exited", *stats([u.stop_s for u in ups]), ""])
    up_table.rows.append(["CPU s of up and its services, to ready", *stats([u.cpu_s for u in ups]), ""])
    if olds:
        up_table.title += f", alternating with {len(olds)} runs of {revision} (before)"
        up_table.rows.append(
            [f"before ({revision}): spawn -> 'ProcessDistro is up.'", *stats([u.printed_s for u in olds]), ""]
        )
        up_table.rows.append([f"before ({revision}): spawn -> ready", *stats([u.ready_s for u in olds]), UP_GOAL_S])
        up_table.rows.append([f"before ({revision}): SIGINT -> exited", *stats([u.stop_s for u in olds]), ""])
        up_table.rows.append([f"before ({revision}): CPU s to ready", *stats([u.cpu_s for u in olds]), ""])
    phases = ["node report sent", "socket opened", "welcome", "first task"]
    join_table = Table(
        f"a browser's first join (Chromium, fresh context), a job queued: {reps} runs",
        ["Join clicked -> ", "median s", "min s", "max s", "goal s"],
    )
    for phase in phases:
        values = [j.marks[phase] for j in joins if phase in j.marks]
        if values:
            join_table.rows.append([phase, *stats(values), JOIN_GOAL_S if phase == "first task" else ""])
    up_ready = statistics.median(u.ready_s for u in ups)
    compared = []
    if olds:
        old_ready = statistics.median(u.ready_s for u in olds)
        old_cpu = statistics.median(u.cpu_s for u in olds)
        new_cpu = statistics.median(u.cpu_s for u in ups)
        compared = [
            f"up -> ready before ({revision}): {old_ready:.2f} s; after / before: {up_ready / old_ready:.2f}",
            f"CPU to ready: {new_cpu:.2f} s, before {old_cpu:.2f} s; after / before: {new_cpu / old_cpu:.2f}",
        ]
    first = statistics.median(j.marks["first task"] for j in joins)
    return Report(
        name="startup",
        title="Startup and shutdown",
        tables=[up_table, join_table],
        notes=[
            f"up -> ready: {up_ready:.2f} s (goal {UP_GOAL_S} s: {'met' if up_ready < UP_GOAL_S else 'MISSED'})",
            *compared,
            f"join -> first task: {first:.2f} s (goal {JOIN_GOAL_S} s: {'met' if first < JOIN_GOAL_S else 'MISSED'})",
            f"load average (1/5/15 min) before: {before}; after: {after}",
        ],
        data={
            "up": [vars(u) for u in ups],
            "up_before": {"revision": revision, "runs": [vars(u) for u in olds]} if olds else None,
            "joins": [j.marks for j in joins],
            "load_before": before,
            "load_after": after,
        },
    )
