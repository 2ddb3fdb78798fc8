"""Pipeline overhead: subtasks/s through the whole controller when node compute is trivial.

One subtask travels: CLI submit -> scheduler -> tasks stream -> gateway -> WebSocket -> node
-> result -> gateway -> results stream -> aggregator (verify, merge, commit) -> finalize.
The job is a Mandelbrot render with `max_iter=1` and 4x4-pixel tiles, so a node spends
microseconds per tile and everything measured is the controller's own cost.

Setup: a fresh embedded Redis, the three services as real processes (`tests/conftest.py`'s
`Controller`), 1, 2 and 4 Python nodes (`tests/nodes.py`'s `Node`: `WorkerNode` with a
Python executor, 2 cores each) sharing one asyncio loop thread in this process, and once
more 4 nodes with a second aggregator (is the aggregator the limit?). The job is submitted
with the real CLI (`processdistro submit ... --wait`). Each configuration runs 3 times,
interleaved; the median by throughput is reported.

Baselines, same Redis server, same run, one Python client, entries shaped like task entries:
- naive: per entry one XADD, one XREADGROUP COUNT 1, one XACK+XDEL (pipelined together);
- batched: XADD in pipelines of 100, XREADGROUP COUNT 100, one XACK+XDEL per 100 ids.
They run before and after the pipeline runs; the median is the reference.

Then the aggregator alone (`bench/_aggregator_alone.py`): a whole job's results queued in
the results stream of a fresh Redis, merged by an in-process `Aggregator` (results/s, its
CPU and Redis's per result, Redis commands per result).

Reported per node count: steady throughput (10 % -> 90 % of subtasks merged), ms per
subtask (its inverse), wall time submit -> done (the job record's `created` -> `finished`)
and as the CLI sees it (process start -> exit), the ratio to both baselines; and, to say
where the time goes, the CPU each process burned per subtask (/proc), the Redis commands
sent per subtask (INFO commandstats), and how often the tasks stream ran dry (nodes waiting
on the scheduler) and how long the results stream was (results waiting on the aggregator).

`BENCH_PROFILE=DIR` runs the services under cProfile and leaves `DIR/<service>.prof`.

`BENCH_BASELINE_PYTHON=PATH` runs every job a second time, interleaved, with the services
and the CLI of another install (a checkout of the code before a change, installed in a
virtualenv of its own; the nodes stay this checkout's), and adds a table of ratios (this
code / baseline): before and after a change, in one run. `BENCH_CONFIGS=2,4x2` runs only
those configurations (nodes, `x` aggregators); `BENCH_REPS=N` runs each N times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from processdistro.shared import keys
from processdistro.shared.queue import TaskFields
from processdistro.shared.redis_server import free_port
from processdistro.shared.store.connection import Client, plain_client
from processdistro.shared.tasks.mandelbrot import MandelbrotParams, MandelbrotPlugin
from rich.console import Console

from . import Report, Table
from ._scratch import scratch_redis

REPO = Path(__file__).resolve().parent.parent
TILE = 4
SIZES = {False: (200, 160), True: (100, 80)}  # 50 x 40 = 2000 tiles; 25 x 20 = 500
ALONE_SIZES = {False: (400, 320), True: (200, 160)}  # 8000 and 2000 results for the aggregator alone
Config = tuple[int, int]  # (nodes, aggregators)
CONFIGS: tuple[Config, ...] = ((1, 1), (2, 1), (4, 1), (4, 2))
NODE_CORES = 2
BATCH = 100
JOB_TIMEOUT_S = 300  # generous: a loaded shared machine runs the baseline code slowly
SAMPLE_EVERY_S = 0.02
BASELINE_DB = 15  # the baselines' stream lives in another database: db 0 holds only pd: keys
BASELINE_STREAM = "bench:stream"
BASELINE_GROUP = "bench"
SERVICES = ("gateway", "scheduler", "aggregator")


def _test_helpers() -> tuple[type, type]:
    """The test suite's Controller and Node, imported, not copied."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from conftest import Controller
    from nodes import Node

    return Controller, Node


# ---------------------------------------------------------------------------- baselines


def task_entry() -> dict[str, Any]:
    """A task entry exactly as the scheduler writes one for this job."""
    params = MandelbrotParams(width=SIZES[False][0], height=SIZES[False][1], tile=TILE, max_iter=1)
    payload = MandelbrotPlugin().encode(params, 0)
    return TaskFields("20250101-000000-abcdef", 0, "mandelbrot", "0" * 64, payload).to_redis()


def stream_round_trip(client: Client, n: int, batch: int) -> float:
    """Entries per second through XADD -> XREADGROUP -> XACK+XDEL from one client."""
    fields = task_entry()
    client.delete(BASELINE_STREAM)
    client.xgroup_create(BASELINE_STREAM, BASELINE_GROUP, id="0", mkstream=True)
    started = time.perf_counter()
    moved = 0
    while moved < n:
        k = min(batch, n - moved)
        if k == 1:
            client.xadd(BASELINE_STREAM, fields)
        else:
            pipe = client.pipeline(transaction=False)
            for _ in range(k):
                pipe.xadd(BASELINE_STREAM, fields)
            pipe.execute()
        resp = client.xreadgroup(BASELINE_GROUP, "c", {BASELINE_STREAM: ">"}, count=k)
        ids = [eid for _stream, entries in resp for eid, _f in entries]
        pipe = client.pipeline(transaction=False)
        pipe.xack(BASELINE_STREAM, BASELINE_GROUP, *ids)
        pipe.xdel(BASELINE_STREAM, *ids)
        pipe.execute()
        moved += len(ids)
    elapsed = time.perf_counter() - started
    left = client.xlen(BASELINE_STREAM)
    client.delete(BASELINE_STREAM)
    if left:
        raise RuntimeError(f"baseline left {left} entries in its stream")
    return n / elapsed


def baselines(url: str, n: int, reps: int) -> dict[str, list[float]]:
    client = plain_client(url.rsplit("/", 1)[0] + f"/{BASELINE_DB}")
    try:
        out: dict[str, list[float]] = {"naive": [], "batched": []}
        for _ in range(reps):
            out["naive"].append(stream_round_trip(client, n, 1))
            out["batched"].append(stream_round_trip(client, n, BATCH))
        return out
    finally:
        client.close()


# ---------------------------------------------------------------------------- nodes


class NodePool:
    """`n` test `Node`s in one asyncio loop, in a thread of their own."""

    def __init__(self, py_node: type, base_url: str, join_code: str, n: int) -> None:
        self.nodes = [py_node(base_url, join_code, cores=NODE_CORES) for _ in range(n)]
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._target, name="bench-nodes", daemon=True)

    def _target(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await asyncio.gather(*(node.run(stop=self._stop) for node in self.nodes))

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the caller
            self.error = exc
        finally:
            self._started.set()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def cpu_now(self) -> float:
        """CPU seconds the node thread has used so far (Linux: per-thread clock via /proc)."""
        tid = self._thread.native_id
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended on its own (a node failed)
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


def wait_connected(r: Client, pool: NodePool, timeout: float = 15) -> None:
    ids = {n.device_id for n in pool.nodes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pool.error is not None:
            raise RuntimeError(f"a node failed to join: {pool.error!r}")
        live = {c.decode().split("~", 1)[0] for c in r.zrange(keys.NODES, 0, -1)}
        if ids <= live:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{len(ids)} nodes did not connect within {timeout}s")


# ---------------------------------------------------------------------------- one job


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class JobRun:
    nodes: int
    aggregators: int
    total: int
    job_id: str
    steady_rate: float  # subtasks/s between 10 % and 90 % merged
    job_wall_s: float  # created -> finished, from the job record
    cli_wall_s: float  # CLI process start -> exit
    first_merge_s: float  # created -> first subtask merged
    finalize_s: float  # last subtask merged -> finished
    tasks_backlog_empty: float  # share of samples with no undelivered task queued
    results_backlog_mean: float  # mean length of the results stream (not yet committed)
    cpu_ms_per_subtask: dict[str, float] = field(default_factory=dict)
    per_node_done: list[int] = field(default_factory=list)
    stats_delta: dict[str, int] = field(default_factory=dict)
    redis_commands: dict[str, float] = field(default_factory=dict)  # per subtask, by command

    @property
    def end_to_end_rate(self) -> float:
        return self.total / self.job_wall_s


def _stats(r: Client) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}


_job_counter = itertools.count(1)


def _commandstats(r: Client) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def run_job(
    ctl: Any, r: Client, pool: NodePool, redis_pid: int, size: tuple[int, int], work: Path, python: str = sys.executable
) -> JobRun:
    width, height = size
    tag = f"{len(pool.nodes)}-{next(_job_counter)}"
    raw = work / f"counts-{tag}.npy"
    known = set(r.zrange(keys.JOBS, 0, -1))
    stats0 = _stats(r)
    commands0 = _commandstats(r)
    own: Counter[str] = Counter()  # commands this function sends meanwhile, taken off the count
    pids = {name: proc.pid for name, proc in ctl.procs.items()} | {"redis": redis_pid}
    cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()} | {"nodes": pool.cpu_now()}
    done0 = [n.done for n in pool.nodes]
    log = open(work / f"submit-{tag}.log", "w")  # noqa: SIM115 - handed to the child
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "processdistro",
            "submit",
            "mandelbrot",
            *("--width", str(width), "--height", str(height), "--tile", str(TILE), "--max-iter", "1"),
            *("--wait", "-q", "--timeout", str(JOB_TIMEOUT_S), "--raw", str(raw)),
        ],
        env=ctl.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    job_id = ""
    samples: list[tuple[float, int, int, int]] = []  # wall clock, done, undelivered tasks, results
    try:
        while proc.poll() is None:
            if time.perf_counter() - started > JOB_TIMEOUT_S + 15:
                raise RuntimeError(f"job with {len(pool.nodes)} nodes did not finish\n{ctl.logs()}")
            if pool.error is not None:
                raise RuntimeError(f"a node failed: {pool.error!r}")
            if not job_id:
                own["zrange"] += 1
                new = [j for j in r.zrange(keys.JOBS, 0, -1) if j not in known]
                job_id = new[0].decode() if new else ""
            if job_id:
                pipe = r.pipeline(transaction=False)
                pipe.hget(keys.job(job_id), "done")
                pipe.xlen(keys.TASKS)
                pipe.xpending(keys.TASKS, keys.NODES_GROUP)
                pipe.xlen(keys.RESULTS)
                done, tasks_len, pending, results_len = pipe.execute()
                undelivered = int(tasks_len) - int(pending["pending"])
                samples.append((time.time(), int(done or 0), undelivered, int(results_len)))
                own.update({"hget": 1, "xlen": 2, "xpending": 1})
            time.sleep(SAMPLE_EVERY_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cli_wall = time.perf_counter() - started
    cpu1 = {name: proc_cpu_s(pid) for name, pid in pids.items()} | {"nodes": pool.cpu_now()}
    if proc.returncode != 0:
        raise RuntimeError(f"submit exited {proc.returncode}: {(work / f'submit-{tag}.log').read_text()}")
    job = {k.decode(): v.decode() for k, v in r.hgetall(keys.job(job_id)).items()}
    total = int(job["total"])
    if job["state"] != "done" or int(job["done"]) != total:
        raise RuntimeError(f"job {job_id} ended {job['state']} with {job['done']}/{total}")
    counts = np.load(raw)
    if counts.shape != (height, width) or not (counts == 1).all():  # max_iter=1: every pixel escapes at 1
        raise RuntimeError(f"job {job_id} produced a wrong image")
    created, finished = float(job["created"]), float(job["finished"])

    def first(at_least: float) -> tuple[float, int]:
        for t, d, _b, _res in samples:
            if d >= at_least:
                return t, d
        raise RuntimeError(f"job {job_id}: never saw {at_least} subtasks merged (poll too slow?)")

    t10, d10 = first(0.1 * total)
    t90, d90 = first(0.9 * total)
    t_first, _ = first(1)
    t_last, _ = first(total)
    running = [s for s in samples if 0 < s[1] < total]
    stats1 = _stats(r)
    commands1 = _commandstats(r)
    own.update({"hgetall": 2, "info": 1})  # the job record, the counters, the first INFO
    commands = {k: v - commands0.get(k, 0) - own[k] for k, v in commands1.items()}
    commands = {k: v for k, v in commands.items() if v > 0}
    return JobRun(
        nodes=len(pool.nodes),
        aggregators=sum(1 for name in ctl.procs if name.startswith("aggregator")),
        total=total,
        job_id=job_id,
        steady_rate=(d90 - d10) / (t90 - t10) if t90 > t10 else float("nan"),
        job_wall_s=finished - created,
        cli_wall_s=cli_wall,
        first_merge_s=t_first - created,
        finalize_s=max(0.0, finished - t_last),
        tasks_backlog_empty=sum(1 for s in running if s[2] == 0) / max(1, len(running)),
        results_backlog_mean=statistics.fmean(s[3] for s in running) if running else 0.0,
        cpu_ms_per_subtask=_by_component({k: 1000 * (cpu1[k] - cpu0[k]) / total for k in cpu0}),
        per_node_done=[n.done - d for n, d in zip(pool.nodes, done0, strict=True)],
        stats_delta={k: v - stats0.get(k, 0) for k, v in stats1.items() if v != stats0.get(k, 0)},
        redis_commands={k: v / total for k, v in sorted(commands.items(), key=lambda kv: -kv[1])},
    )


# ---------------------------------------------------------------------------- controller


def make_controller(
    controller_cls: type, url: str, home: Path, profile_dir: Path | None, python: str = sys.executable
) -> Any:
    port = free_port()
    env = {
        **os.environ,
        "PD_REDIS_URL": url,
        "PD_HOME": str(home),
        "PD_HOST": "127.0.0.1",
        "PD_PORT": str(port),
        "PD_LOG_LEVEL": "INFO",
    }
    ctl = controller_cls(redis_url=url, home=home, port=port, env=env)
    ctl.python = python
    for name in SERVICES:
        spawn(ctl, name, profile_dir)
    return ctl


def spawn(ctl: Any, name: str, profile_dir: Path | None) -> subprocess.Popen[bytes]:
    """Start service instance `name` (`aggregator-2` is another aggregator), under cProfile
    when profiling, with the controller's python (`make_controller`)."""
    service = name.split("-", 1)[0]
    python = getattr(ctl, "python", sys.executable)
    if profile_dir is None and python == sys.executable:
        return ctl.start(name, service)  # type: ignore[no-any-return]
    command = [python, "-m", "processdistro"]
    if profile_dir is not None:
        command = [python, "-m", "cProfile", "-o", str(profile_dir / f"{name}.prof"), "-m", "processdistro"]
    with open(ctl.home / f"{name}.log", "ab") as out:
        proc = subprocess.Popen([*command, service], env=ctl.env, stdout=out, stderr=subprocess.STDOUT)
    ctl.procs[name] = proc
    return proc


def _by_component(cpu: dict[str, float]) -> dict[str, float]:
    """Sum the CPU of extra instances (`aggregator-2`) into their service."""
    out: dict[str, float] = {}
    for name, value in cpu.items():
        component = name.split("-", 1)[0]
        out[component] = out.get(component, 0.0) + value
    return out


def start_extra(ctl: Any, r: Client, name: str, profile_dir: Path | None, timeout: float = 20) -> None:
    """Another instance of a service (`aggregator-2`), once its liveness key shows."""
    service = name.split("-", 1)[0]
    proc = spawn(ctl, name, profile_dir)
    key = keys.service_heartbeat(service, f"{socket.gethostname()}-{proc.pid}")
    deadline = time.monotonic() + timeout
    while not r.exists(key):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start\n{ctl.logs()}")
        time.sleep(0.05)


def stop_extra(ctl: Any, name: str) -> None:
    proc = ctl.procs.pop(name, None)
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)  # SIGINT, not SIGTERM: lets cProfile write, if it runs
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


NOTABLE = ("requeue", "silent", "refused", "reaper", "WARNING", "ERROR")


def notable_log_lines(home: Path, limit: int = 12) -> list[str]:
    """Service log lines that say something went other than planned (requeues, errors); a
    traceback is summed up by its exception line."""
    found = []
    for path in sorted(home.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                exc = next((x for x in lines[i + 1 :] if x and not x.startswith(" ")), "?")
                found.append(f"{path.stem}: traceback ending in {exc}")
            elif not line.startswith(" ") and any(word in line for word in NOTABLE):
                found.append(f"{path.stem}: {line[:300]}")
    return found[:limit]


def node_compute_us() -> float:
    """What a node spends computing one of these tiles (NumPy), in microseconds."""
    from executors import tile_counts

    params = MandelbrotParams(width=SIZES[False][0], height=SIZES[False][1], tile=TILE, max_iter=1)
    plugin = MandelbrotPlugin()
    payloads = [plugin.encode(params, i) for i in range(200)]
    started = time.perf_counter()
    for p in payloads:
        tile_counts(p).astype("<u4").tobytes()
    return 1e6 * (time.perf_counter() - started) / len(payloads)


# ---------------------------------------------------------------------------- run


def _configs() -> tuple[Config, ...]:
    chosen = os.environ.get("BENCH_CONFIGS")
    if not chosen:
        return CONFIGS
    out = []
    for item in chosen.split(","):
        n, _, aggregators = item.partition("x")
        out.append((int(n), int(aggregators or 1)))
    return tuple(out)


def run(*, quick: bool, console: Console) -> Report:
    controller_cls, py_node = _test_helpers()
    size = SIZES[quick]
    n_subtasks = (size[0] // TILE) * (size[1] // TILE)
    reps = int(os.environ.get("BENCH_REPS", 1 if quick else 3))
    configs = _configs()
    profile = os.environ.get("BENCH_PROFILE")
    profile_dir = Path(profile).resolve() if profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    variants = {"this": sys.executable}
    if os.environ.get("BENCH_BASELINE_PYTHON"):
        variants["baseline"] = os.environ["BENCH_BASELINE_PYTHON"]
    runs: dict[str, dict[Config, list[JobRun]]] = {v: {c: [] for c in configs} for v in variants}
    alone: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    log_lines: list[str] = []
    base: dict[str, list[float]] = {"naive": [], "batched": []}
    with scratch_redis("pd-bench-") as scratch:
        work, url, r = scratch.work, scratch.url, scratch.r
        console.print(f"baselines: {n_subtasks} entries, naive and batched")
        for k, v in baselines(url, n_subtasks, 2).items():
            base[k] += v
        for rep in range(reps):  # interleaved, so drift on a shared machine hits every variant and node count
            for variant, python in variants.items():
                home = work / f"pd-home-{variant}-{rep}"
                home.mkdir()
                ctl = make_controller(controller_cls, url, home, profile_dir if variant == "this" else None, python)
                try:
                    ctl.wait_ready(timeout=90)  # a loaded machine starts services slowly
                    for config in configs:
                        console.print(f"job {rep + 1}/{reps} ({variant}): {n_subtasks} subtasks, {_label(config)}")
                        runs[variant][config].append(
                            _one_job(ctl, r, py_node, scratch.redis_pid, size, work, config, python, profile_dir)
                        )
                    log_lines += notable_log_lines(home)
                finally:
                    _stop_controller(ctl, profile_dir if variant == "this" else None)
        console.print("the aggregator alone")
        for _ in range(reps):
            for variant, python in variants.items():
                alone[variant].append(aggregator_alone(python, ALONE_SIZES[quick]))
        console.print("baselines again")
        for k, v in baselines(url, n_subtasks, 2).items():
            base[k] += v
    compute_us = node_compute_us()
    report = _report(runs["this"], base, n_subtasks, compute_us)
    report.tables.append(_alone_table(alone))
    report.data["aggregator_alone"] = alone
    if "baseline" in runs:
        report.tables.append(_comparison(runs))
        report.data["baseline_runs"] = [
            {
                "nodes": x.nodes,
                "aggregators": x.aggregators,
                "subtasks_per_s": x.steady_rate,
                "cpu_ms_per_subtask": x.cpu_ms_per_subtask,
                "redis_commands_per_subtask": x.redis_commands,
                "results_waiting_mean": x.results_backlog_mean,
                "tasks_queue_empty_share": x.tasks_backlog_empty,
            }
            for rs in runs["baseline"].values()
            for x in rs
        ]
    if log_lines:
        report.notes.append("service log lines worth a look:\n    " + "\n    ".join(log_lines[:12]))
    return report


def _one_job(
    ctl: Any,
    r: Client,
    py_node: type,
    redis_pid: int,
    size: tuple[int, int],
    work: Path,
    config: Config,
    python: str,
    profile_dir: Path | None,
) -> JobRun:
    n, aggregators = config
    extra = [f"aggregator-{i}" for i in range(2, aggregators + 1)]
    pool = NodePool(py_node, ctl.url, ctl.join_code, n)
    try:
        for name in extra:
            start_extra(ctl, r, name, profile_dir)
        pool.start()
        wait_connected(r, pool)
        return run_job(ctl, r, pool, redis_pid, size, work, python)
    finally:
        pool.stop()
        for name in extra:
            stop_extra(ctl, name)
        if pool.error is not None:
            raise RuntimeError(f"a node failed: {pool.error!r}")


def _stop_controller(ctl: Any, profile_dir: Path | None) -> None:
    if profile_dir is not None:
        # SIGINT: uvicorn re-raises the signal it caught, and only KeyboardInterrupt
        # (not death by SIGTERM) lets cProfile write the gateway's profile
        for proc in ctl.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in ctl.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    ctl.stop()


def aggregator_alone(python: str, size: tuple[int, int]) -> dict[str, float]:
    """`bench/_aggregator_alone.py` under `python`: the aggregator with every result of a
    job waiting for it (its own Redis; no gateway, scheduler or node beside it)."""
    script = Path(__file__).resolve().parent / "_aggregator_alone.py"
    done = subprocess.run(
        [python, str(script), str(size[0]), str(size[1])], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the aggregator alone failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _alone_table(alone: dict[str, list[dict[str, float]]]) -> Table:
    table = Table(
        "the aggregator alone: a whole job's results waiting in the stream (medians)",
        ["code", "results", "results/s", "aggregator CPU ms/result", "Redis CPU ms/result", "Redis cmds/result"],
    )
    for variant, samples in alone.items():
        med = {k: statistics.median(x[k] for x in samples) for k in samples[0]}
        table.rows.append(
            [
                variant,
                int(med["results"]),
                med["results_per_s"],
                med["aggregator_cpu_ms"],
                med["redis_cpu_ms"],
                med["redis_commands"],
            ]
        )
    return table


def _comparison(runs: dict[str, dict[Config, list[JobRun]]]) -> Table:
    """This code against the baseline install, per configuration (medians of each)."""
    table = Table(
        "this code / baseline (same run, interleaved; medians)",
        ["path", "sub/s", "baseline sub/s", "x sub/s", "agg CPU ms", "baseline", "Redis cmds", "baseline"],
    )
    for config, rs in runs["this"].items():
        new, old = _median_run(rs), _median_run(runs["baseline"][config])
        table.rows.append(
            [
                _label(config),
                new.steady_rate,
                old.steady_rate,
                new.steady_rate / old.steady_rate,
                new.cpu_ms_per_subtask.get("aggregator", 0.0),
                old.cpu_ms_per_subtask.get("aggregator", 0.0),
                sum(new.redis_commands.values()),
                sum(old.redis_commands.values()),
            ]
        )
    return table


def _median_run(runs: list[JobRun]) -> JobRun:
    return sorted(runs, key=lambda r: r.steady_rate)[(len(runs) - 1) // 2]


def _label(config: Config) -> str:
    n, aggregators = config
    return f"{n} node{'s' if n > 1 else ''}" + (f", {aggregators} aggregators" if aggregators > 1 else "")


def _report(runs: dict[Config, list[JobRun]], base: dict[str, list[float]], n: int, compute_us: float) -> Report:
    naive, batched = statistics.median(base["naive"]), statistics.median(base["batched"])
    median = {config: _median_run(rs) for config, rs in runs.items()}
    shown = list(median)[-2 if len(median) > 1 else -1]  # the most nodes with one aggregator, by default
    throughput = Table(
        f"{n} subtasks, Mandelbrot {TILE}x{TILE} px tiles, max_iter=1",
        ["path", "sub/s", "ms/sub", "x naive", "x batched", "job s", "CLI s", "1st s", "final s"],
    )
    for config, run in median.items():
        throughput.rows.append(
            [
                _label(config),
                run.steady_rate,
                1000 / run.steady_rate,
                run.steady_rate / naive,
                run.steady_rate / batched,
                run.job_wall_s,
                run.cli_wall_s,
                run.first_merge_s,
                run.finalize_s,
            ]
        )
    throughput.rows.append(["Redis naive", naive, 1000 / naive, 1.0, naive / batched, "", "", "", ""])
    throughput.rows.append(["Redis batched", batched, 1000 / batched, batched / naive, 1.0, "", "", "", ""])
    components = ["gateway", "scheduler", "aggregator", "redis", "nodes"]
    cpu = Table(
        "CPU ms per subtask by process; queue states while running",
        ["path", *components, "sum", "Redis cmds", "no task queued", "results queued"],
    )
    for config, run in median.items():
        c = run.cpu_ms_per_subtask
        cpu.rows.append(
            [
                _label(config),
                *(c[k] for k in components),
                sum(c.values()),
                sum(run.redis_commands.values()),
                f"{100 * run.tasks_backlog_empty:.0f} %",
                run.results_backlog_mean,
            ]
        )
    notes = [
        "sub/s: steady rate between 10 % and 90 % of subtasks merged (median of "
        f"{len(next(iter(runs.values())))} job(s); all: "
        + "; ".join(f"{_label(k)} " + ", ".join(f"{r.steady_rate:.0f}" for r in rs) for k, rs in runs.items())
        + ")",
        "job s: job record created -> finished; CLI s: `processdistro submit --wait` process start -> exit; "
        "1st s: created -> first subtask merged; final s: last merge -> finished",
        "end-to-end (subtasks / job s): "
        + ", ".join(f"{r.end_to_end_rate:.0f}/s with {_label(k)}" for k, r in median.items()),
        f"a node computes one tile in {compute_us:.0f} us (NumPy), so ms/sub is controller overhead",
        "Redis naive: XADD, XREADGROUP COUNT 1, XACK+XDEL per entry; batched: by "
        f"{BATCH}; one client. Samples/s naive {', '.join(f'{x:.0f}' for x in base['naive'])}; "
        f"batched {', '.join(f'{x:.0f}' for x in base['batched'])} (before and after the jobs)",
        "no task queued: share of samples with no undelivered task in the tasks stream (nodes waiting on the "
        "scheduler); results queued: mean length of the results stream (read or unread, not yet committed)",
        "Redis cmds: commands the services sent per subtask (INFO commandstats, commands inside Lua "
        f"scripts included); with {_label(shown)}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in list(median[shown].redis_commands.items())[:12]),
        "subtasks per node: " + "; ".join(f"{_label(k)} {r.per_node_done}" for k, r in median.items()),
    ]
    for config, rs in runs.items():
        for run in rs:
            odd = {k: v for k, v in run.stats_delta.items() if k != "tasks_completed"}
            if odd:
                notes.append(f"{_label(config)}, job {run.job_id}: unexpected counters {odd}")
    data = {
        "subtasks": n,
        "tile_px": TILE,
        "max_iter": 1,
        "node_cores": NODE_CORES,
        "node_compute_us": compute_us,
        "baseline": {"naive_per_s": naive, "batched_per_s": batched, "samples": base},
        "runs": [
            {
                "nodes": r.nodes,
                "aggregators": r.aggregators,
                "job_id": r.job_id,
                "median": r is median[(r.nodes, r.aggregators)],
                "subtasks_per_s": r.steady_rate,
                "ms_per_subtask": 1000 / r.steady_rate,
                "end_to_end_per_s": r.end_to_end_rate,
                "ratio_to_naive": r.steady_rate / naive,
                "ratio_to_batched": r.steady_rate / batched,
                "job_wall_s": r.job_wall_s,
                "cli_wall_s": r.cli_wall_s,
                "first_merge_s": r.first_merge_s,
                "finalize_s": r.finalize_s,
                "tasks_queue_empty_share": r.tasks_backlog_empty,
                "results_waiting_mean": r.results_backlog_mean,
                "cpu_ms_per_subtask": r.cpu_ms_per_subtask,
                "per_node_done": r.per_node_done,
                "counters": r.stats_delta,
                "redis_commands_per_subtask": r.redis_commands,
            }
            for rs in runs.values()
            for r in rs
        ],
    }
    return Report("pipeline", "Pipeline overhead", [throughput, cpu], notes, data)
