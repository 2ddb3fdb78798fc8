"""ProcessDistro vs Dask vs Ray: the same Mandelbrot WASM kernel and tiles, one run, interleaved.

`make compare` (or `python -m bench --only compare [--quick]`; `make bench` runs it too).

- **The kernel**: static/wasm's Mandelbrot module that a native worker is sent on this
  machine (`mandelbrot_simd` where wasmtime validates SIMD128, `dispatch.pick_module`), run
  through the worker's own `ModuleRunner` with its executor processes' settings
  (`interruptible=False`: wasmtime's default configuration) by every system:
  bench/peers_kernel.py `run_tile` is the task function of Dask and Ray and the serial
  baseline's loop; ProcessDistro's workers run the same runner in their executor processes.
- **The tiles**: the inputs `MandelbrotPlugin.encode` gives ProcessDistro's subtasks, in its
  order. Rows: 2048² max-iter 2000 in 256 tiles of 128²; 3072² max-iter 2000 in 256 tiles of
  192²; 10,000 trivial tiles (400² image, 4² tiles, max-iter 1). `--quick`: the 2048² row and
  2,500 trivial tiles, one round.
- **ProcessDistro**: what a user runs: `processdistro up --workers 2` (embedded Redis,
  gateway, scheduler, aggregator, two native workers of one core each) in a fresh
  PD_HOME, a warm-up job, then per row `processdistro submit mandelbrot ... --wait -q --raw
  F` (default settings: 5 % of the tiles replicated on both workers and compared, every tile
  spot-checked, PNG and .npy written). Makespan: the job record's created -> finished; the
  `submit --wait` process's wall time (interpreter start-up included) is shown beside it,
  and the CPU each of its processes spent on the job (utime + stime from /proc before and
  after it, summed per kind of process: `cpu_by_process`).
- **Dask**: `LocalCluster(n_workers=2, threads_per_worker=1)`, `client.map`, `gather`;
  **Ray**: `ray.init(num_cpus=2)`, one remote task per tile, `ray.get`. Both in the
  benchmark virtualenv `.bench-venv/` (created on first use: `dask[distributed]`, `ray` and
  this project; not runtime dependencies), bench/peers_run.py, a warm-up map first; timed
  from the first submission to the last result in hand.
- **Serial baseline**: the same tiles one after the other in this process, same runner,
  same engine. Parallel efficiency = serial / (2 x makespan). The serial loop on an engine
  with epoch interruption (what executor processes ran before) is measured beside it.

Every system starts fresh in each round (no idle cluster beside another's run); the order of
the systems rotates from round to round; medians and ranges over the rounds. Every output of
every run is compared with the serial baseline's counts (ProcessDistro's from its `--raw`
file): a difference fails the benchmark.

The before/after table measures this branch's other changes on the 2048² job's own tiles:
the spot checks of `MandelbrotPlugin.verify` (pure-Python pixels vs the kernel in-process)
and finalize (the colouring and PNG settings before vs now).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from processdistro.shared.core.dispatch import pick_module
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.tasks.mandelbrot import MandelbrotParams, MandelbrotPlugin
from processdistro.worker.device import describe
from rich.console import Console

from . import Report, Table
from .compare_parts import before_after
from .peers_kernel import run_tiles

REPO = Path(__file__).resolve().parent.parent
BENCH_VENV = REPO / ".bench-venv"
PEERS = ["dask[distributed]", "ray"]
PD_BIN = Path(sys.executable).parent / "processdistro"
SYSTEMS = ["ProcessDistro", "Dask", "Ray"]
PEER_TIMEOUT_S = 600
JOB_TIMEOUT_S = 600
PLUGIN = MandelbrotPlugin()


@dataclass(frozen=True)
class Row:
    name: str
    params: MandelbrotParams
    compute: bool  # a compute-heavy row (efficiency) or the trivial one (subtasks/s)

    @property
    def count(self) -> int:
        return PLUGIN.count(self.params)

    def inputs(self) -> list[bytes]:
        return [PLUGIN.encode(self.params, i) for i in range(self.count)]

    def canvas(self, outputs: bytes | list[bytes]) -> np.ndarray:
        """The (H, W) counts from the tiles' outputs in order (back to back, or a list)."""
        p = self.params
        chunks = outputs if isinstance(outputs, list) else None
        out = np.zeros((p.height, p.width), dtype=np.uint32)
        at = 0
        for i in range(self.count):
            x0, y0, w, h = p.tile_rect(i)
            if chunks is not None:
                tile = chunks[i]
            else:
                assert isinstance(outputs, bytes)
                tile, at = outputs[at : at + w * h * 4], at + w * h * 4
            out[y0 : y0 + h, x0 : x0 + w] = np.frombuffer(tile, dtype="<u4").reshape(h, w)
        return out


def rows(quick: bool) -> list[Row]:
    def mp(size: int, max_iter: int, tile: int) -> MandelbrotParams:
        return MandelbrotParams(width=size, height=size, max_iter=max_iter, tile=tile)

    trivial = Row(f"{(200 if quick else 400) ** 2 // 16:,} trivial tiles", mp(200 if quick else 400, 1, 4), False)
    if quick:
        return [Row("2048²", mp(2048, 2000, 128), True), trivial]
    return [Row("2048²", mp(2048, 2000, 128), True), Row("3072²", mp(3072, 2000, 192), True), trivial]


def kernel_module() -> tuple[str, str, str]:
    """(name, path, sha256) of the Mandelbrot build a native worker on this machine is sent."""
    reg = ModuleRegistry()
    base = reg.get("mandelbrot")
    module = pick_module(reg.by_sha, reg.by_name, base.sha256, simd=describe().simd) or base
    assert module.path is not None
    return module.name, str(module.path), module.sha256


# ---------------------------------------------------------------------------- the peers' venv


def ensure_bench_venv(console: Console) -> Path:
    """.bench-venv/ with Dask, Ray and this project (editable), created on first use."""
    python = BENCH_VENV / "bin" / "python"
    probe = [str(python), "-c", "import dask.distributed, ray, processdistro.worker.runtime"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    console.print(f"creating {BENCH_VENV} with {', '.join(PEERS)} (first use; about a minute)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEERS, "-e", str(REPO)], check=True)
    subprocess.run(probe, check=True)
    return python


# ---------------------------------------------------------------------------- one turn of each


@dataclass
class Turn:
    """One system's figures in one round."""

    makespan: dict[str, float] = field(default_factory=dict)  # row -> s
    wall: dict[str, float] = field(default_factory=dict)  # row -> s, `submit --wait` (ProcessDistro)
    startup_s: float = 0.0
    #: row -> process group -> CPU seconds its job cost (ProcessDistro: /proc, `cpu_by_process`)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)


CLK_TCK = os.sysconf("SC_CLK_TCK")
#: process groups of `up --workers 2`, by a word of their command line (first match wins)
PROCESS_GROUPS = [
    ("redis-server", "Redis"),
    ("worker.pool", "executor processes (the kernel)"),
    ("processdistro gateway", "gateway"),
    ("processdistro scheduler", "scheduler"),
    ("processdistro aggregator", "aggregator (verify, merge, commit, finalize)"),
    ("processdistro worker", "workers' socket processes"),
]


def cpu_by_process(root: int) -> dict[str, float]:
    """utime + stime (s) of every process under `root` (`up`), summed per `PROCESS_GROUPS`
    group; processes of no group are left out (the `up` supervisor itself)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        tree.update(kids)
        todo += kids
    out: dict[str, float] = {}
    for pid in tree:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = next((g for word, g in PROCESS_GROUPS if word in cmd), None)
        if group is not None:
            out[group] = out.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pd(env: dict[str, str], *args: str, timeout: float = JOB_TIMEOUT_S) -> str:
    done = subprocess.run([str(PD_BIN), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"processdistro {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def _submit_args(p: MandelbrotParams) -> list[str]:
    return [
        "submit", "mandelbrot", "--width", str(p.width), "--height", str(p.height),
        "--max-iter", str(p.max_iter), "--tile", str(p.tile), "--wait", "-q",
    ]  # fmt: skip


def turn_processdistro(table: list[Row], work: Path, expected: dict[str, np.ndarray]) -> Turn:
    home = work / "pd"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, "PD_HOME": str(home), "PD_HOST": "127.0.0.1", "PD_PORT": str(free_port())}
    env.pop("PD_REDIS_URL", None)
    turn = Turn()
    started = time.perf_counter()
    with (home / "up.log").open("wb") as log:
        up = subprocess.Popen(
            [str(PD_BIN), "up", "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if up.poll() is not None:
                raise RuntimeError(
                    f"processdistro up exited ({up.returncode}): {(home / 'up.log').read_text()[-2000:]}"
                )
            if (home / "controller.json").exists():
                try:
                    nodes = json.loads(_pd(env, "nodes", "--json", timeout=30))
                except (RuntimeError, json.JSONDecodeError):
                    nodes = []
                if sum(1 for n in nodes if n.get("live") == "yes") >= 2:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("two workers did not join within 60 s")
            time.sleep(0.2)
        turn.startup_s = time.perf_counter() - started
        _pd(env, *_submit_args(MandelbrotParams(width=256, height=256, max_iter=2000, tile=64)))  # warm-up
        for row in table:
            raw = work / f"pd-{row.params.width}.npy"
            raw.unlink(missing_ok=True)
            cpu0 = cpu_by_process(up.pid)
            t0 = time.perf_counter()
            _pd(env, *_submit_args(row.params), "--raw", str(raw))
            turn.wall[row.name] = time.perf_counter() - t0
            cpu1 = cpu_by_process(up.pid)
            turn.cpu[row.name] = {g: cpu1[g] - cpu0.get(g, 0.0) for g in cpu1}
            job = json.loads(_pd(env, "jobs", "--json", "--limit", "1"))[0]
            if job["state"] != "done":
                raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('error')}")
            turn.makespan[row.name] = float(job["finished"]) - float(job["created"])
            _check("ProcessDistro", row, np.load(raw), expected)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    return turn


def turn_peer(
    system: str,
    python: Path,
    table: list[Row],
    module: tuple[str, str, str],
    work: Path,
    expected: dict[str, np.ndarray],
) -> Turn:
    _, path, sha = module
    warm = work / "warmup.bin"
    warm.write_bytes(
        b"".join(PLUGIN.encode(MandelbrotParams(width=256, height=256, max_iter=2000, tile=64), i) for i in range(16))
    )
    spec: dict[str, Any] = {"module": path, "sha256": sha, "warmup": str(warm), "rows": []}
    for row in table:
        inputs = work / f"in-{row.params.width}-{row.params.tile}.bin"
        if not inputs.exists():
            inputs.write_bytes(b"".join(row.inputs()))
        spec["rows"].append(
            {"name": row.name, "inputs": str(inputs), "output": str(work / f"{system}-{row.params.width}.bin")}
        )
    spec_path = work / f"{system}.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [str(python), str(REPO / "bench" / "peers_run.py"), "--system", system.lower(), str(spec_path)],
        capture_output=True, text=True, timeout=PEER_TIMEOUT_S, cwd=work,
    )  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{system} failed ({done.returncode}): {done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    turn = Turn(makespan={k: float(v) for k, v in result["rows"].items()}, startup_s=float(result["startup_s"]))
    for row, entry in zip(table, spec["rows"], strict=True):
        _check(system, row, row.canvas(Path(entry["output"]).read_bytes()), expected)
    return turn


def _check(system: str, row: Row, counts: np.ndarray, expected: dict[str, np.ndarray]) -> None:
    if not np.array_equal(counts, expected[row.name]):
        bad = int(np.count_nonzero(counts != expected[row.name])) if counts.shape == expected[row.name].shape else -1
        raise RuntimeError(f"{system}: the {row.name} counts differ from the serial baseline's ({bad} pixels)")


# ---------------------------------------------------------------------------- the run


def run(*, quick: bool, console: Console) -> Report:
    table = rows(quick)
    rounds = 1 if quick else 3
    module = kernel_module()
    name, path, sha = module
    python = ensure_bench_venv(console)
    load_before = os.getloadavg()
    serial: dict[str, list[float]] = {}
    epoch: dict[str, list[float]] = {}
    turns: dict[str, list[Turn]] = {s: [] for s in SYSTEMS}
    expected: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="pd-compare-") as tmp:
        work = Path(tmp)
        for k in range(rounds):
            console.print(f"round {k + 1}/{rounds}: serial baselines")
            for row in table:
                if not row.compute:
                    continue
                inputs = row.inputs()
                run_tiles(path, sha, inputs[:4])  # compile outside the timing
                t0 = time.perf_counter()
                outputs = run_tiles(path, sha, inputs)
                serial.setdefault(row.name, []).append(time.perf_counter() - t0)
                expected.setdefault(row.name, row.canvas(outputs))
                if row is table[0]:
                    run_tiles(path, sha, inputs[:4], interruptible=True)
                    t0 = time.perf_counter()
                    run_tiles(path, sha, inputs, interruptible=True)
                    epoch.setdefault(row.name, []).append(time.perf_counter() - t0)
            for row in table:
                if row.name not in expected:
                    expected[row.name] = row.canvas(run_tiles(path, sha, row.inputs()))
            order = SYSTEMS[k % 3 :] + SYSTEMS[: k % 3]
            for system in order:
                console.print(f"round {k + 1}/{rounds}: {system}")
                if system == "ProcessDistro":
                    turns[system].append(turn_processdistro(table, work, expected))
                else:
                    turns[system].append(turn_peer(system, python, table, module, work, expected))
        console.print("before/after of the verify and finalize changes")
        parts = before_after(table[0].params, expected[table[0].name], work)
    load_after = os.getloadavg()
    return _report(table, rounds, name, serial, epoch, turns, parts, (load_before, load_after))


def _fmt(xs: list[float], unit: str = "s") -> str:
    med = statistics.median(xs)
    if len(xs) == 1:
        return f"{med:.2f} {unit}"
    return f"{med:.2f} {unit} [{min(xs):.2f}–{max(xs):.2f}]"


def _rate(n: int, xs: list[float]) -> str:
    rates = [n / x for x in xs]
    med = statistics.median(rates)
    if len(rates) == 1:
        return f"{med:,.0f}/s"
    return f"{med:,.0f}/s [{min(rates):,.0f}–{max(rates):,.0f}]"


def _report(
    table: list[Row],
    rounds: int,
    module_name: str,
    serial: dict[str, list[float]],
    epoch: dict[str, list[float]],
    turns: dict[str, list[Turn]],
    parts: list[list[Any]],
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> Report:
    report = Report(name="compare", title="ProcessDistro vs Dask vs Ray (same kernel, same tiles)")
    mk = {s: {r.name: [t.makespan[r.name] for t in ts] for r in table} for s, ts in turns.items()}
    main = Table(
        f"median [range] of {rounds}",
        ["work", "ProcessDistro", "Dask", "Ray", "serial (1 core)"],
    )
    data: dict[str, Any] = {"module": module_name, "rounds": rounds, "rows": {}}
    med = statistics.median
    for row in table:
        ms = {s: mk[s][row.name] for s in SYSTEMS}
        if row.compute:
            eff = {s: [med(serial[row.name]) / (2 * x) for x in ms[s]] for s in SYSTEMS}
            pd = med(ms["ProcessDistro"])
            walls = [t.wall[row.name] for t in turns["ProcessDistro"]]
            title = f"{row.name} max-iter {row.params.max_iter}, {row.count} tiles"
            main.rows.append([f"{title}: makespan", *(_fmt(ms[s]) for s in SYSTEMS), _fmt(serial[row.name])])
            main.rows.append(
                ["  parallel efficiency (serial ÷ 2 × makespan)", *(f"{med(eff[s]):.2f}" for s in SYSTEMS), ""]
            )
            main.rows.append(
                ["  makespan ÷ ProcessDistro's", "1", f"{med(ms['Dask']) / pd:.2f}", f"{med(ms['Ray']) / pd:.2f}", ""]
            )
            main.rows.append(["  ProcessDistro `submit --wait` wall (CLI start-up included)", _fmt(walls), "", "", ""])
            data["rows"][row.name] = {
                "makespan_s": ms,
                "submit_wait_wall_s": walls,
                "serial_s": serial[row.name],
                "efficiency_median": {s: med(eff[s]) for s in SYSTEMS},
            }
        else:
            title = f"{row.name} (4×4, max-iter 1): subtasks/s"
            main.rows.append([title, *(_rate(row.count, ms[s]) for s in SYSTEMS), ""])
            data["rows"][row.name] = {
                "subtasks_per_s_median": {s: med([row.count / x for x in ms[s]]) for s in SYSTEMS}
            }
    first = table[0].name
    startup = [_fmt([t.startup_s for t in turns[s]]) for s in SYSTEMS]
    main.rows.append(["start-up (up → 2 workers joined; LocalCluster; ray.init)", *startup, ""])
    report.tables.append(main)
    ba = Table("this branch's changes, before → after (same run)", ["change", "before", "after", "ratio"])
    ep, de = med(epoch[first]), med(serial[first])
    change = f"executor engine: serial {first} kernel, epoch interruption → default config"
    ba.rows.append([change, f"{ep:.2f} s", f"{de:.2f} s", f"{ep / de:.2f}×"])
    ba.rows.extend(parts)
    report.tables.append(ba)
    groups = [g for _word, g in PROCESS_GROUPS]
    for row in (r for r in table if r.compute):
        per = {g: [t.cpu[row.name].get(g, 0.0) for t in turns["ProcessDistro"]] for g in groups}
        cpu = Table(
            f"ProcessDistro CPU per {row.name} job, by process (median of {rounds}, /proc)", ["process", "CPU s"]
        )
        cpu.rows += [[g, f"{med(per[g]):.2f}"] for g in groups]
        cpu.rows.append(["total", f"{med([sum(t.cpu[row.name].values()) for t in turns['ProcessDistro']]):.2f}"])
        report.tables.append(cpu)
        data["rows"][row.name]["cpu_s_by_process"] = per
    data["epoch_serial_s"] = epoch
    data["before_after"] = parts
    data["load"] = {"before": list(load[0]), "after": list(load[1])}
    report.data = data
    (b1, b5, b15), (a1, a5, a15) = load[0][:3], load[1][:3]
    report.notes += [
        f"kernel: static/wasm/{module_name}.wasm (the build a native worker here is sent), "
        "ModuleRunner(interruptible=False)",
        f"load average before {b1:.2f} {b5:.2f} {b15:.2f}, after {a1:.2f} {a5:.2f} {a15:.2f}",
        "ProcessDistro makespan: job record created → finished (verify, merge, finalize: PNG + .npy "
        "included); Dask/Ray: first submission → last result in hand",
    ]
    return report
