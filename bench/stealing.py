"""Stealing and reassignment: makespan next to a slow node, and how fast dead nodes' tasks move.

1. Makespan. One Mandelbrot job (1024x768, tile 64 = 192 subtasks, max_iter 40000: about
   28 s of one-core wasmtime work here) on two native workers (`processdistro worker
   --cores 1`), one of them `--throttle 4` (a device 4x slower). The ideal makespan is the
   job's total work divided by the two workers' summed throughput. The fast worker's
   throughput on this job is measured by running the job on it alone (so each tile's fixed
   cost, dispatch, encoding and verification, counts as work, as it does in the real run);
   the slow worker's is that times the slow/fast ratio of iteration rates measured with each
   worker alone on a calibration job whose every pixel costs `max_iter` iterations (a view
   inside the main cardioid, 16 tiles of the same size), as the steady rate from its first to
   its last merged subtask, before and after the makespan jobs; the median of
   the two is used. Makespan is the job record's `created` -> `finished`, so it includes the
   controller's own latency (feed, dispatch, finalize). With stealing and straggler backups
   ON (`PD_STEALING=true PD_BACKUPS=true` for the scheduler) and OFF, three times each,
   interleaved; median.
   Target (the issue): makespan <= 1.15 x ideal with stealing and backups on (no replication;
   one more run with the default 5 % replication shows its cost).

2. Dead node -> reassignment, median of 3 each, while a long job runs:
   (a) a native worker SIGKILLed (its socket closes): kill -> none of its stream consumers
       (`<node_id>~<connection>`) has a pending entry left (XPENDING on `pd:tasks`/`nodes`);
       target < 1 s;
   (b) a silent node: a WebSocket client that joins, says `hello` and `ready`, receives tasks
       and then sends nothing with the socket open: its last frame -> its tasks requeued;
       target < 5 s (`node_timeout_s` is 4 s by default).
"""

from __future__ import annotations

import json
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
import numpy as np
from processdistro.shared import keys
from processdistro.shared.redis_server import EmbeddedRedis
from processdistro.shared.store.connection import Client, plain_client
from rich.console import Console
from websockets.sync.client import connect as ws_connect

from . import Report, Table
from .pipeline import _test_helpers, make_controller, notable_log_lines

THROTTLE = 4.0
TILE = 64
# (width, height, max_iter) of the main job; the calibration job is 16 tiles inside the set
MAIN = {False: (1024, 768, 40000), True: (512, 384, 20000)}
CALIBRATION = {False: (256, 256, 8000), True: (256, 256, 3000)}
CAL_VIEW = ("-0.3", "-0.1", "-0.1", "0.1")  # inside the main cardioid: every pixel runs max_iter
REPS = {False: 3, True: 1}
DEAD_REPS = {False: 3, True: 2}
JOB_TIMEOUT_S = 300
SAMPLE_EVERY_S = 0.02
TARGET_MAKESPAN = 1.15
REPLICATED = "on, --replicate 0.05"
# mode -> (stealing and backups, share of subtasks replicated): stealing is measured without
# replication; one run with the default replication shows what confirmations cost
MODES = {"on": (True, 0.0), "off": (False, 0.0), REPLICATED: (True, 0.05)}
TARGET_KILL_S = 1.0
TARGET_SILENT_S = 5.0


# ---------------------------------------------------------------------------- native workers


class Worker:
    """`processdistro worker URL --cores 1 [--throttle F]` with a home of its own."""

    def __init__(self, ctl: Any, home: Path, throttle: float = 1.0) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.throttle = throttle
        self.log = home / "worker.log"
        args = ["--cores", "1"] + (["--throttle", str(throttle)] if throttle != 1 else [])
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "processdistro", "worker", ctl.join_url, *args],
                env={**ctl.env, "PD_HOME": str(home)},
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while "connected (" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker in {home} did not connect\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        self.node_id = (home / "worker-default.id").read_text().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def restart_scheduler(ctl: Any, r: Client, backups: bool) -> None:
    proc = ctl.procs.pop("scheduler", None)
    if proc is not None:
        proc.terminate()
        proc.wait(15)
    ctl.env["PD_BACKUPS"] = "true" if backups else "false"
    ctl.env["PD_STEALING"] = "true" if backups else "false"
    proc = ctl.start("scheduler")
    deadline = time.monotonic() + 20
    while not any(
        k.decode().endswith(f"-{proc.pid}") for k in r.scan_iter(match=keys.service_heartbeat_pattern("scheduler"))
    ):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"scheduler did not start\n{ctl.logs()}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- one job


@dataclass
class JobRun:
    job_id: str
    makespan_s: float  # job record created -> finished
    iterations: int  # sum of the result's counts: the job's work
    steady_s: float  # first merged subtask -> last merged subtask
    total: int
    completed: dict[str, int] = field(default_factory=dict)  # per node id
    stats: dict[str, int] = field(default_factory=dict)  # counter deltas
    tail_s: float = 0.0  # 90 % merged -> finished


def _stats(r: Client) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}


def _completed(r: Client, node_ids: list[str]) -> dict[str, int]:
    return {n: int(r.hget(keys.node(n), "completed") or 0) for n in node_ids}


def submit_args(width: int, height: int, max_iter: int, view: tuple[str, ...] | None = None) -> list[str]:
    args = ["--width", str(width), "--height", str(height), "--tile", str(TILE), "--max-iter", str(max_iter)]
    if view:
        args += ["--xmin", view[0], "--xmax", view[1], "--ymin", view[2], "--ymax", view[3]]
    return args


def _new_job(r: Client, known: set[bytes], proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        new = [j for j in r.zrange(keys.JOBS, 0, -1) if j not in known]
        if new:
            return str(new[0].decode())
        if (proc.poll() not in (None, 0)) or time.monotonic() > deadline:
            raise RuntimeError(f"no job appeared: {log.read_text()}")
        time.sleep(0.02)


def run_job(ctl: Any, r: Client, work: Path, tag: str, args: list[str], node_ids: list[str]) -> JobRun:
    raw = work / f"{tag}.npy"
    log = work / f"{tag}.log"
    known = set(r.zrange(keys.JOBS, 0, -1))
    stats0, done0 = _stats(r), _completed(r, node_ids)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "processdistro", "submit", "mandelbrot", *args, "--wait", "-q"]
            + ["--timeout", str(JOB_TIMEOUT_S), "--raw", str(raw)],
            env=ctl.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        job_id = _new_job(r, known, proc, log)
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        while proc.poll() is None:
            if time.monotonic() - started > JOB_TIMEOUT_S + 15:
                raise RuntimeError(f"job {job_id} did not finish\n{ctl.logs()}")
            samples.append((time.time(), int(r.hget(keys.job(job_id), "done") or 0)))
            time.sleep(SAMPLE_EVERY_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"submit exited {proc.returncode}: {log.read_text()}\n{ctl.logs()}")
    job = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(job_id)).items()}
    total = int(job["total"])
    if job["state"] != "done" or int(job["done"]) != total:
        raise RuntimeError(f"job {job_id} ended {job['state']} with {job['done']}/{total}")
    created, finished = float(job["created"]), float(job["finished"])

    def first(at_least: float) -> float:
        return next(t for t, d in samples if d >= at_least)

    counts = np.load(raw)
    stats1, done1 = _stats(r), _completed(r, node_ids)
    return JobRun(
        job_id=job_id,
        makespan_s=finished - created,
        iterations=int(counts.astype(np.int64).sum()),
        steady_s=first(total) - first(1),
        total=total,
        completed={n: done1[n] - done0[n] for n in node_ids},
        stats={k: v - stats0.get(k, 0) for k, v in stats1.items() if v != stats0.get(k, 0)},
        tail_s=finished - first(0.9 * total),
    )


def solo_rate(run: JobRun) -> float:
    """Iterations/s of one worker alone: uniform tiles, first -> last merge (n - 1 tiles)."""
    return run.iterations * (run.total - 1) / run.total / run.steady_s


# ---------------------------------------------------------------------------- dead nodes


def consumers_of(r: Client, node_id: str) -> dict[str, int]:
    out = {}
    for info in r.xinfo_consumers(keys.TASKS, keys.NODES_GROUP):
        name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
        if name.split("~", 1)[0] == node_id:
            out[name] = int(info["pending"])
    return out


def wait_holding(r: Client, node_id: str, timeout: float = 30) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = consumers_of(r, node_id)
        if sum(held.values()) > 0:
            return held
        time.sleep(0.01)
    raise RuntimeError(f"node {node_id} never held a task")


def released_after(r: Client, consumers: list[str], t0: float, timeout: float = 30) -> float:
    """Seconds from `t0` (perf_counter) until none of `consumers` has a pending entry."""
    while time.perf_counter() - t0 < timeout:
        if not any(r.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", 1, consumername=c) for c in consumers):
            return time.perf_counter() - t0
        time.sleep(0.005)
    raise RuntimeError(f"tasks of {consumers} still pending after {timeout}s")


def killed_worker(ctl: Any, r: Client, home: Path) -> tuple[float, int]:
    victim = Worker(ctl, home)
    try:
        held = wait_holding(r, victim.node_id)
        time.sleep(0.3)  # let it settle into running one task with one prefetched
        held = consumers_of(r, victim.node_id)
        t0 = time.perf_counter()
        os.kill(victim.proc.pid, signal.SIGKILL)
        seconds = released_after(r, list(held), t0)
    finally:
        victim.proc.kill()
        victim.proc.wait()
    return seconds, sum(held.values())


def silent_node(ctl: Any, r: Client, device_id: str) -> tuple[float, int]:
    resp = httpx.post(
        f"{ctl.url}/node-report",
        json={"join_code": ctl.join_code, "device_id": device_id, "cores": 1, "kind": "native", "benchmark_score": 1e6},
    )
    resp.raise_for_status()
    accepted = resp.json()
    url = ctl.url.replace("http", "ws", 1) + f"/ws?token={accepted['token']}"
    with ws_connect(url, max_size=None, ping_interval=None) as ws:
        ws.send(json.dumps({"type": "hello", "running": []}))
        ws.send(json.dumps({"type": "ready", "free": accepted["slots"] + accepted.get("prefetch", 0)}))
        t0 = time.perf_counter()  # its last frame: from now on it says nothing
        tasks = 0
        while tasks == 0:
            msg = json.loads(ws.recv(timeout=20))
            tasks += msg["type"] == "task"
        node_id = accepted["node_id"]
        held = wait_holding(r, node_id)
        seconds = released_after(r, list(held), t0)
    return seconds, sum(held.values())


# ---------------------------------------------------------------------------- run


def run(*, quick: bool, console: Console) -> Report:
    controller_cls, _py_node = _test_helpers()
    width, height, max_iter = MAIN[quick]
    cw, ch, cm = CALIBRATION[quick]
    main_args = submit_args(width, height, max_iter)
    cal_args = [*submit_args(cw, ch, cm, CAL_VIEW), "--replicate", "0"]
    cal: dict[str, list[JobRun]] = {"fast": [], "slow": []}
    runs: dict[str, list[JobRun]] = {mode: [] for mode in MODES}
    kills: list[tuple[float, int]] = []
    silents: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="pd-bench-steal-") as tmp:
        work = Path(tmp)
        server = EmbeddedRedis(directory=work / "redis", persist=False)
        url = server.start()
        r = plain_client(url)
        home = work / "pd-home"
        home.mkdir()
        ctl = make_controller(controller_cls, url, home, None)
        workers: list[Worker] = []
        try:
            ctl.wait_ready()
            restart_scheduler(ctl, r, backups=True)

            def calibrate(label: str) -> None:
                for kind, throttle in (("fast", 1.0), ("slow", THROTTLE)):
                    w = Worker(ctl, work / kind, throttle)
                    try:
                        console.print(f"calibration ({label}): {kind} worker alone, {cw}x{ch} max_iter {cm}")
                        cal[kind].append(run_job(ctl, r, work, f"cal-{kind}-{label}", cal_args, [w.node_id]))
                    finally:
                        w.stop()

            calibrate("before")
            workers = [Worker(ctl, work / "fast")]
            restart_scheduler(ctl, r, True)
            console.print(f"the main job on the fast worker alone: {width}x{height} max_iter {max_iter}")
            alone = run_job(ctl, r, work, "main-fast-alone", [*main_args, "--replicate", "0"], [workers[0].node_id])
            workers.append(Worker(ctl, work / "slow", THROTTLE))
            ids = [w.node_id for w in workers]
            for rep in range(REPS[quick]):
                for mode, (backups, replicate) in MODES.items():
                    if replicate and rep:
                        continue  # the cost of replication: one run
                    restart_scheduler(ctl, r, backups)
                    console.print(f"makespan {rep + 1}: {width}x{height} max_iter {max_iter}, {mode}")
                    args = [*main_args, "--replicate", str(replicate)]
                    runs[mode].append(run_job(ctl, r, work, f"main-{len(runs[mode])}-{rep}", args, ids))
            for w in workers:
                w.stop()
            workers = []
            calibrate("after")

            # dead nodes, while a long job runs with nobody else to take its tasks
            restart_scheduler(ctl, r, backups=False)
            known = set(r.zrange(keys.JOBS, 0, -1))
            log = work / "long.log"
            with open(log, "wb") as fh:
                sub = subprocess.Popen(
                    [sys.executable, "-m", "processdistro", "submit", "mandelbrot", *main_args],
                    env=ctl.env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                )
            long_job = _new_job(r, known, sub, log)
            sub.wait(30)
            for i in range(DEAD_REPS[quick]):
                console.print(f"dead node {i + 1}: SIGKILLed worker, then a silent node")
                kills.append(killed_worker(ctl, r, work / f"victim-{i}"))
                silents.append(silent_node(ctl, r, f"silent-bench-node-{i}"))
            ctl.cli("cancel", long_job, timeout=30)
            log_lines = notable_log_lines(home, limit=20)
        finally:
            for w in workers:
                w.stop()
            r.close()
            ctl.stop()
            server.stop()
    return _report(quick, cal, alone, runs, kills, silents, log_lines, (width, height, max_iter), (cw, ch, cm))


def _report(
    quick: bool,
    cal: dict[str, list[JobRun]],
    alone: JobRun,
    runs: dict[str, list[JobRun]],
    kills: list[tuple[float, int]],
    silents: list[tuple[float, int]],
    log_lines: list[str],
    main: tuple[int, int, int],
    calp: tuple[int, int, int],
) -> Report:
    rates = {k: [solo_rate(x) for x in v] for k, v in cal.items()}
    rate = {k: statistics.median(v) for k, v in rates.items()}
    work_iters = {x.iterations for v in runs.values() for x in v}
    if len(work_iters) != 1:
        raise RuntimeError(f"the main job's results differ between runs: {work_iters}")
    iterations = work_iters.pop()
    ideal = iterations / (rate["fast"] + rate["slow"])
    fast_alone = iterations / rate["fast"]
    # the same sum with the job's own cost: the fast worker's measured time on this very job
    # (per-tile overheads included), and the slow one's throughput at the calibrated ratio
    job_ideal = alone.makespan_s * rate["fast"] / (rate["fast"] + rate["slow"])
    width, height, max_iter = main
    makespan = Table(
        f"{width}x{height} Mandelbrot, tile {TILE}, max_iter {max_iter} on 2 native workers (1 core each, "
        f"one --throttle "
        f"{THROTTLE:g}); ideal {job_ideal:.1f} s (job-measured), {ideal:.1f} s (iteration rates)",
        [
            "stealing + backups",
            "makespan s",
            "x ideal",
            "runs x ideal",
            "x iteration ideal",
            "tail s",
            "tasks fast/slow",
            "stolen",
            "backups",
            "copies stopped",
            "duplicates",
        ],
    )
    data_runs = []
    for mode, rs in runs.items():
        med = statistics.median(x.makespan_s for x in rs)
        makespan.rows.append(
            [
                mode,
                med,
                med / job_ideal,
                ", ".join(f"{x.makespan_s / job_ideal:.2f}" for x in rs),
                med / ideal,
                ", ".join(f"{x.tail_s:.1f}" for x in rs),
                ", ".join("/".join(map(str, x.completed.values())) for x in rs),
                ", ".join(str(x.stats.get("tasks_stolen", 0)) for x in rs),
                ", ".join(str(x.stats.get("tasks_backup", 0)) for x in rs),
                ", ".join(str(x.stats.get("copies_cancelled", 0)) for x in rs),
                ", ".join(str(x.stats.get("tasks_duplicate", 0)) for x in rs),
            ]
        )
        for x in rs:
            data_runs.append(
                {
                    "mode": mode,
                    "job_id": x.job_id,
                    "makespan_s": x.makespan_s,
                    "ratio_to_ideal": x.makespan_s / job_ideal,
                    "ratio_to_iteration_ideal": x.makespan_s / ideal,
                    "tail_90pct_to_finished_s": x.tail_s,
                    "completed_fast_slow": list(x.completed.values()),
                    "counters": x.stats,
                }
            )
    dead = Table(
        "dead node -> its tasks requeued",
        ["case", "median s", "runs s", "tasks held", "target s"],
    )
    dead.rows.append(
        [
            "worker SIGKILLed",
            statistics.median(k[0] for k in kills),
            ", ".join(f"{k[0]:.3f}" for k in kills),
            ", ".join(str(k[1]) for k in kills),
            TARGET_KILL_S,
        ]
    )
    dead.rows.append(
        [
            "silent node (socket open)",
            statistics.median(s[0] for s in silents),
            ", ".join(f"{s[0]:.2f}" for s in silents),
            ", ".join(str(s[1]) for s in silents),
            TARGET_SILENT_S,
        ]
    )
    on = statistics.median(x.makespan_s for x in runs["on"]) / job_ideal
    notes = [
        f"work: {iterations / 1e9:.2f} G iterations (sum of the result's counts); solo rates (G iter/s, calibration "
        f"{calp[0]}x{calp[1]} inside the set, max_iter {calp[2]}, first -> last merge, before and after): fast "
        + ", ".join(f"{x / 1e9:.3f}" for x in rates["fast"])
        + "; slow "
        + ", ".join(f"{x / 1e9:.3f}" for x in rates["slow"])
        + f"; slow/fast {rate['slow'] / rate['fast']:.2f}",
        f"iteration ideal = work / (fast + slow rate) = {ideal:.1f} s (the fast worker alone: {fast_alone:.1f} s); "
        f"it leaves out each tile's fixed cost (dispatch, encode, verify), which the calibration tiles, all "
        f"max_iter deep, hardly have",
        f"ideal (job-measured) = the fast worker alone on this job, {alone.makespan_s:.1f} s, x fast / (fast + slow "
        f"rate) = {job_ideal:.1f} s: total work / summed throughput with the job's own per-tile cost",
        "makespan: job record created -> finished (includes feed, dispatch and finalize); per-run columns in run "
        "order; tail s: 90 % merged -> finished; tasks: subtasks merged from the fast / the throttled worker; "
        "stolen: queued, unstarted tasks a slower node gave back for an idle one; backups: straggler copies the "
        "scheduler made; copies stopped: the losing copies cancelled when the first result came in; duplicates: "
        "results that arrived second anyway; on/off without replication (--replicate 0); the last row keeps "
        "the default 5 % replication: a replicated tile's second copy must come from the other worker",
        f"target makespan <= {TARGET_MAKESPAN} x ideal with stealing and backups on: "
        f"{'met' if on <= TARGET_MAKESPAN else 'MISSED'} ({on:.2f})",
        "SIGKILL: kill -> no pending entry left for the worker's consumers (gateway requeues on socket close); "
        "silent: the node's last frame -> same (gateway watchdog, node_timeout_s 4 s)",
    ]
    if log_lines:
        notes.append("service log lines worth a look:\n    " + "\n    ".join(log_lines))
    data = {
        "main_job": {"width": width, "height": height, "tile": TILE, "max_iter": max_iter, "iterations": iterations},
        "throttle": THROTTLE,
        "solo_rate_iter_per_s": rates,
        "ideal_s": job_ideal,
        "iteration_ideal_s": ideal,
        "fast_alone_on_job_s": alone.makespan_s,
        "fast_alone_s": fast_alone,
        "makespan_ratio_on": on,
        "makespan_ratio_off": statistics.median(x.makespan_s for x in runs["off"]) / job_ideal,
        "makespan_ratio_on_replicated": statistics.median(x.makespan_s for x in runs[REPLICATED]) / job_ideal,
        "runs": data_runs,
        "kill_to_requeued_s": [k[0] for k in kills],
        "silent_to_requeued_s": [s[0] for s in silents],
        "tasks_held": {"killed": [k[1] for k in kills], "silent": [s[1] for s in silents]},
    }
    return Report("stealing", "Stealing and reassignment", [makespan, dead], notes, data)
