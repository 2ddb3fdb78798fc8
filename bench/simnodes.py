"""Scale of one gateway: many simulated nodes connected at once (join, report, heartbeats, no
work), the gateway's CPU and memory beside them, and a real job's speed with and without them.

- The controller: a fresh embedded Redis, the three services as real processes (the test
  suite's `Controller`), ONE gateway, its settings the defaults (heartbeat every 1 s, a
  node silent 4 s is closed) except that the per-address rate limits are not in the way:
  each simulated node comes from an address of its own (127.1.x.y: Linux answers the whole
  127/8 on loopback), so the per-address connection cap (`gateway/edge.py`) and the report
  and connect rates apply per node as they would to real devices.
- The nodes: `SIM_PROCESSES` separate processes (`python -m bench.simnodes sim ...`), each an
  asyncio loop holding its share of the nodes. Each node speaks the real protocol: `POST
  /node-report` (a native node's report with a benchmark score), `WS /ws?token=...`, the
  welcome, `hello`, then a `heartbeat` every `heartbeat_interval_s` of the welcome, the
  first at a random point of the interval (so 2,000 nodes do not beat in step). A node never
  says `ready`, so it is given no work; token refreshes are read and dropped.
- Measured: the gateway's CPU (utime + stime from /proc, in cores: CPU seconds over wall
  seconds) and RSS (VmRSS) idle with no node, then with every node connected, over a window
  of `WINDOW_S`; Redis's CPU likewise; the simulators' own CPU. From the difference, the
  gateway's and Redis's CPU per heartbeat, and so how many such nodes one core of each would
  carry.
- The job: a Mandelbrot job on one native worker (`processdistro worker --cores 1`; the
  other core is left to the gateway, Redis and the simulators), makespan from the job
  record, run without the simulated nodes and with them, interleaved; the ratio of the
  medians is the answer to "does a job still run at full speed beside them".

Goal (issue 11, goal 4): 2,000 nodes cost the gateway under 0.3 core and under 1 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from processdistro.shared.protocol import PROTOCOL_VERSION, Heartbeat, Hello, NodeAccepted, NodeReport
from processdistro.shared.redis_server import EmbeddedRedis
from processdistro.shared.store.connection import plain_client
from rich.console import Console

from . import Report, Table
from .pipeline import _test_helpers, make_controller, notable_log_lines, proc_cpu_s
from .stealing import Worker, restart_scheduler, run_job, submit_args

NODES = {False: 2000, True: 300}
SIM_PROCESSES = 2
WINDOW_S = {False: 20.0, True: 8.0}
SETTLE_S = 5.0
JOB_REPS = {False: 2, True: 1}
JOB = (1024, 1024, 400)  # width, height, max-iter: a few seconds on one core
CONNECT_CONCURRENCY = 64  # node reports and connects in flight per simulator
CONNECT_TIMEOUT_S = 900.0
GOAL_CORES = 0.3
GOAL_RSS_BYTES = 1024**3
FD_HEADROOM = 512
REJOIN_S = 1.0  # a simulated node the gateway closed joins again after this
JOIN_TIMEOUT_S = 30.0  # a node report, a socket's opening, the welcome: each at most this
# one job with the scheduler's tail on beside the nodes: it treats them as idle takers
TAIL_ON_JOB = os.environ.get("PD_BENCH_TAIL_ON", "1") != "0"


def address(i: int) -> str:
    """Simulated node i's own source address on loopback."""
    return f"127.1.{i // 250}.{i % 250 + 1}"


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-files soft limit towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------- the simulator


@dataclass
class SimCounts:
    welcomed: int = 0  # nodes that got their welcome, ever
    connected: int = 0  # nodes connected now
    failed: int = 0
    closed: int = 0  # connections the gateway closed after the welcome
    heartbeats: int = 0
    frames_in: int = 0
    late: int = 0  # heartbeats this simulator sent over 1 s after their time (its own loop starved)
    errors: list[str] = field(default_factory=list)


async def _post_report(host: str, port: int, source: str, body: bytes) -> tuple[int, bytes]:
    """`POST /node-report` over a connection from `source` (HTTP/1.1, Connection: close)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        head = (
            f"POST /node-report HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, raw.split(b"\r\n\r\n", 1)[1]


async def _node(i: int, host: str, port: int, code: str, counts: SimCounts, gate: asyncio.Semaphore) -> None:
    """One simulated node: join, then heartbeats until cancelled; closed by the gateway, it
    joins again after `REJOIN_S` with the identity it was given, as a real node does."""
    device_id, secret = f"simnode-{os.getpid()}-{i:05d}", None
    while True:
        device_id, secret = await _session(i, host, port, code, counts, gate, device_id, secret)
        await asyncio.sleep(REJOIN_S)


async def _session(
    i: int,
    host: str,
    port: int,
    code: str,
    counts: SimCounts,
    gate: asyncio.Semaphore,
    device_id: str,
    secret: str | None,
) -> tuple[str, str | None]:
    import websockets

    source = address(i)
    report = NodeReport(
        join_code=code,
        device_id=device_id,
        node_secret=secret,
        cores=2,
        kind="native",
        browser="simnodes",
        benchmark_score=2e8,
    )
    async with gate:
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):  # a starved gateway must not hold a slot for ever
                status, body = await _post_report(host, port, source, report.model_dump_json().encode())
            if status != 200:
                raise RuntimeError(f"node report: HTTP {status} {body[:200]!r}")
            accepted = NodeAccepted.model_validate_json(body)
            device_id, secret = accepted.node_id, accepted.node_secret or secret
            url = f"ws://{host}:{port}{accepted.ws_path}?token={quote(accepted.token, safe='')}"
            ws = await websockets.connect(url, local_addr=(source, 0), open_timeout=JOIN_TIMEOUT_S)
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                welcome = json.loads(await ws.recv())
            if welcome.get("type") != "welcome":
                raise RuntimeError(f"expected a welcome, got {welcome}")
            await ws.send(Hello(protocol=PROTOCOL_VERSION).model_dump_json())
        except Exception as exc:
            counts.failed += 1
            if len(counts.errors) < 5:
                counts.errors.append(f"node {i}: {type(exc).__name__}: {exc}")
            return device_id, secret
    counts.welcomed += 1
    counts.connected += 1
    interval = float(welcome["heartbeat_interval_s"])
    beat = Heartbeat(running=0, done=0).model_dump_json()

    async def read() -> None:
        async for _frame in ws:  # token refreshes, nothing else: this node never asks for work
            counts.frames_in += 1

    reader = asyncio.create_task(read())
    try:
        due = time.monotonic() + random.random() * interval
        await asyncio.sleep(due - time.monotonic())
        while not reader.done():
            if time.monotonic() - due > 1.0:
                counts.late += 1
            await ws.send(beat)
            counts.heartbeats += 1
            due = max(due + interval, time.monotonic())  # late: no burst to catch up
            await asyncio.sleep(due - time.monotonic())
    except Exception:
        pass
    finally:
        reader.cancel()
        counts.connected -= 1
        if ws.close_code not in (None, 1000, 1001):
            counts.closed += 1
            if len(counts.errors) < 5:
                counts.errors.append(f"node {i}: closed {ws.close_code} {ws.close_reason}")
        await ws.close()
    return device_id, secret


async def simulate(host: str, port: int, code: str, first: int, count: int, status_file: Path) -> None:
    """Hold `count` simulated nodes (numbers first..first+count-1) until SIGTERM; write the
    counts to `status_file` twice a second."""
    counts = SimCounts()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nodes = [asyncio.create_task(_node(first + k, host, port, code, counts, gate)) for k in range(count)]

    def write() -> None:  # whole or not at all: the benchmark reads it meanwhile
        status_file.with_suffix(".tmp").write_text(json.dumps(vars(counts)))
        status_file.with_suffix(".tmp").replace(status_file)

    while not stop.is_set():
        write()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    for t in nodes:
        t.cancel()
    await asyncio.gather(*nodes, return_exceptions=True)
    write()


class Simulators:
    """`SIM_PROCESSES` simulator processes holding `nodes` nodes between them."""

    def __init__(self, ctl: Any, work: Path, nodes: int) -> None:
        self.files = [work / f"sim-{k}.json" for k in range(SIM_PROCESSES)]
        share = -(-nodes // SIM_PROCESSES)
        self.procs: list[subprocess.Popen[bytes]] = []
        for k, status in enumerate(self.files):
            count = min(share, nodes - k * share)
            cmd = [sys.executable, "-m", "bench.simnodes", "sim", "--port", str(ctl.port), "--code", ctl.join_code]
            cmd += ["--first", str(k * share), "--count", str(count), "--status", str(status)]
            log = open(work / f"sim-{k}.log", "wb")  # noqa: SIM115 - handed to the child
            self.procs.append(subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=log))
            log.close()

    def counts(self) -> SimCounts:
        total = SimCounts()
        for f in self.files:
            try:
                c = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            for k in ("welcomed", "connected", "failed", "closed", "heartbeats", "frames_in", "late"):
                setattr(total, k, getattr(total, k) + c[k])
            total.errors += c["errors"]
        return total

    def cpu_s(self) -> float:
        return sum(proc_cpu_s(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------- the benchmark


@dataclass
class Window:
    """What a stretch of `seconds` cost: CPU in cores, RSS at its end, heartbeats sent."""

    nodes: int
    seconds: float
    gateway_cores: float
    gateway_rss: int
    redis_cores: float
    sim_cores: float
    heartbeats: int
    closed: int  # connections the gateway closed meanwhile (the nodes joined again)


def measure(gateway: int, redis: int, sims: Simulators | None, seconds: float) -> Window:
    g0, r0, s0 = proc_cpu_s(gateway), proc_cpu_s(redis), sims.cpu_s() if sims else 0.0
    c0 = sims.counts() if sims else SimCounts()
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    counts = sims.counts() if sims else SimCounts()
    return Window(
        nodes=counts.connected,
        seconds=wall,
        gateway_cores=(proc_cpu_s(gateway) - g0) / wall,
        gateway_rss=rss_bytes(gateway),
        redis_cores=(proc_cpu_s(redis) - r0) / wall,
        sim_cores=((sims.cpu_s() if sims else 0.0) - s0) / wall,
        heartbeats=counts.heartbeats - c0.heartbeats,
        closed=counts.closed - c0.closed,
    )


def run(*, quick: bool, console: Console) -> Report:
    n = NODES[quick]
    fds = raise_fd_limit(2 * n + FD_HEADROOM * 4)
    if fds < n + FD_HEADROOM:
        raise RuntimeError(f"ulimit -n is {fds}: {n} nodes need at least {n + FD_HEADROOM}")
    controller_cls, _node = _test_helpers()
    makespans: dict[str, list[float]] = {"without": [], "with": []}
    # PD_BENCH_KEEP=1 keeps the services' logs (the work directory is printed)
    keep = bool(os.environ.get("PD_BENCH_KEEP"))
    with contextlib.ExitStack() as stack:
        if keep:
            tmp = tempfile.mkdtemp(prefix="pd-bench-simnodes-")
            console.print(f"work directory (kept): {tmp}")
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pd-bench-simnodes-"))
        work = Path(tmp)
        server = EmbeddedRedis(directory=work / "redis", persist=False)
        url = server.start()
        home = work / "pd-home"
        home.mkdir()
        # PD_BENCH_PROFILE=DIR: the services run under cProfile, DIR/<service>.prof
        profile = os.environ.get("PD_BENCH_PROFILE")
        ctl = make_controller(controller_cls, url, home, Path(profile) if profile else None)
        worker: Worker | None = None
        sims: Simulators | None = None
        r = plain_client(url)
        try:
            ctl.wait_ready()
            assert server.process is not None
            redis_pid, gateway_pid = server.process.pid, ctl.procs["gateway"].pid
            # the scheduler's tail (stealing, backups) off: it counts a connected node holding
            # less than its slots as idle, and simulated nodes never ask for work (see the
            # job "tail on" below)
            restart_scheduler(ctl, r, backups=False)
            worker = Worker(ctl, work / "w0")
            # no replicated subtasks: a replicated copy waits up to PARKED_WAIT_S for the idle
            # simulated nodes, which are voters that never take it (the job "default settings")
            args = [*submit_args(*JOB), "--replicate", "0"]

            def job(tag: str, key: str | None = None) -> None:
                console.print(f"job {tag}: mandelbrot {JOB[0]}x{JOB[1]} max-iter {JOB[2]} on one native worker")
                key = key or ("with" if sims else "without")
                makespans.setdefault(key, []).append(run_job(ctl, r, work, tag, args, [worker.node_id]).makespan_s)

            job("warm-up")  # the worker fetches and compiles the module
            makespans["without"].clear()
            for rep in range(JOB_REPS[quick]):
                job(f"without-{rep}")
            console.print(f"idle gateway, no simulated node: {WINDOW_S[quick]:.0f} s")
            idle = measure(gateway_pid, redis_pid, None, WINDOW_S[quick])
            console.print(f"connecting {n} simulated nodes from {SIM_PROCESSES} processes")
            started = time.monotonic()
            sims = Simulators(ctl, work, n)
            # every node joined once (a node the gateway closes joins again: `connected` may
            # stay below n on a starved machine; the window reports how many were connected)
            while (c := sims.counts()).welcomed < n:
                if time.monotonic() - started > CONNECT_TIMEOUT_S or any(p.poll() is not None for p in sims.procs):
                    logs = "\n".join(f.read_text()[-2000:] for f in sorted(work.glob("sim-*.log")))
                    raise RuntimeError(
                        f"{c.welcomed} of {n} nodes welcomed after {time.monotonic() - started:.0f} s ({c}):\n"
                        f"{logs}\n{ctl.logs()[-6000:]}"
                    )
                time.sleep(0.2)
            connect_s = time.monotonic() - started
            at_connect = c
            console.print(f"{n} nodes connected in {connect_s:.1f} s; settling {SETTLE_S:.0f} s")
            time.sleep(SETTLE_S)
            loaded = measure(gateway_pid, redis_pid, sims, WINDOW_S[quick])
            console.print(
                f"gateway {loaded.gateway_cores:.3f} cores, {loaded.gateway_rss / 2**20:.0f} MiB;"
                f" redis {loaded.redis_cores:.3f} cores; simulators {loaded.sim_cores:.3f} cores"
            )
            for rep in range(JOB_REPS[quick]):
                job(f"with-{rep}")
            during = sims.counts()
            if TAIL_ON_JOB:
                restart_scheduler(ctl, r, backups=True)
                makespans["with, defaults"] = [
                    run_job(ctl, r, work, "with-defaults", submit_args(*JOB), [worker.node_id]).makespan_s
                ]
                restart_scheduler(ctl, r, backups=False)
            sims.stop()
            sims = None
            for rep in range(JOB_REPS[quick]):
                job(f"without-after-{rep}")
            log_lines = notable_log_lines(home)
        finally:
            if sims is not None:
                sims.stop()
            if worker is not None:
                worker.stop()
            r.close()
            ctl.stop()
            server.stop()
    return _report(n, idle, loaded, connect_s, at_connect, during, makespans, log_lines)


def _report(
    n: int,
    idle: Window,
    loaded: Window,
    connect_s: float,
    at_connect: SimCounts,
    during: SimCounts,
    makespans: dict[str, list[float]],
    log_lines: list[str],
) -> Report:
    beats_per_s = loaded.heartbeats / loaded.seconds
    g_us = (loaded.gateway_cores - idle.gateway_cores) / beats_per_s * 1e6 if beats_per_s else 0.0
    r_us = (loaded.redis_cores - idle.redis_cores) / beats_per_s * 1e6 if beats_per_s else 0.0
    rss_per_node = (loaded.gateway_rss - idle.gateway_rss) / n
    without, with_ = statistics.median(makespans["without"]), statistics.median(makespans["with"])
    windows = Table(
        f"one gateway, {n} simulated nodes (heartbeat every 1 s, no work), {SIM_PROCESSES} simulator processes",
        [
            "window",
            "nodes",
            "heartbeats/s",
            "closed by gateway",
            "gateway cores",
            "gateway RSS MiB",
            "redis cores",
            "simulators cores",
        ],
    )
    for name, w in (("no node", idle), (f"{n} nodes", loaded)):
        windows.rows.append(
            [
                name,
                w.nodes,
                w.heartbeats / w.seconds,
                w.closed,
                w.gateway_cores,
                w.gateway_rss / 2**20,
                w.redis_cores,
                w.sim_cores,
            ]
        )
    limits = Table(
        "per node, and what one core would carry at this cost",
        ["part", "CPU µs per heartbeat", "nodes per core (1 heartbeat/s)", "RSS KiB per node"],
    )
    limits.rows.append(["gateway (one event loop)", g_us, 1e6 / g_us if g_us else 0.0, rss_per_node / 1024])
    limits.rows.append(["redis (one thread)", r_us, 1e6 / r_us if r_us else 0.0, ""])
    jobs = Table(
        f"mandelbrot {JOB[0]}x{JOB[1]}, max-iter {JOB[2]}, one native worker: makespan"
        " (--replicate 0, stealing and backups off, unless said)",
        ["simulated nodes", "runs", "median s", "runs s", "x without"],
    )
    rows = (
        ("without", "none"),
        ("with", str(n)),
        ("with, defaults", f"{n}, default settings (stealing, backups, replicate 0.05)"),
    )
    for key, label in rows:
        runs = makespans.get(key)
        if not runs:
            continue
        jobs.rows.append([label, len(runs), statistics.median(runs), " ".join(f"{x:.2f}" for x in runs), 0.0])
        jobs.rows[-1][-1] = statistics.median(runs) / without
    met = loaded.gateway_cores < GOAL_CORES and loaded.gateway_rss < GOAL_RSS_BYTES
    report = Report(
        name="simnodes",
        title="Scale of one gateway",
        tables=[windows, limits, jobs],
        notes=[
            f"goal: {n} nodes under {GOAL_CORES} core and 1 GiB on the gateway: "
            + ("met" if met else "MISSED")
            + f" ({loaded.gateway_cores:.3f} cores, {loaded.gateway_rss / 2**20:.0f} MiB)",
            f"{n} nodes reported and connected in {connect_s:.1f} s ({n / connect_s:.0f} nodes/s);"
            f" meanwhile {at_connect.failed} joins failed and {at_connect.closed} connections were closed by the"
            f" gateway (those nodes joined again){': ' + '; '.join(at_connect.errors) if at_connect.errors else ''}",
            f"after the jobs with them: {during.connected} connected; since the start {during.closed} closed by the"
            f" gateway, {during.failed} joins failed; {during.frames_in} frames received (token refreshes);"
            f" {during.late} heartbeats left the simulators over 1 s late (their own loops starved)",
            f"job makespan with {n} nodes connected: {with_ / without:.2f}x without (medians)",
            "CPU per heartbeat = (cores with the nodes - cores idle) / heartbeats per second: everything a"
            " connected node costs (its session's watchdog and touches included), charged to its heartbeats",
        ],
        data={
            "nodes": n,
            "simulator_processes": SIM_PROCESSES,
            "connect_s": connect_s,
            "idle": vars(idle),
            "loaded": vars(loaded),
            "gateway_us_per_heartbeat": g_us,
            "redis_us_per_heartbeat": r_us,
            "gateway_rss_per_node_bytes": rss_per_node,
            "makespans": makespans,
            "makespan_ratio": with_ / without,
            "goal_met": met,
            "at_connect": vars(at_connect),
            "after_jobs": vars(during),
        },
    )
    if log_lines:
        report.notes.append("service log lines worth a look:\n    " + "\n    ".join(log_lines))
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.simnodes sim ...`: one simulator process (the benchmark starts them)."""
    p = argparse.ArgumentParser(prog="python -m bench.simnodes")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sim", help="hold simulated nodes until SIGTERM")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--code", required=True)
    s.add_argument("--first", type=int, default=0)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--status", type=Path, required=True)
    args = p.parse_args(argv)
    raise_fd_limit(args.count * 2 + FD_HEADROOM)
    asyncio.run(simulate(args.host, args.port, args.code, args.first, args.count, args.status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
