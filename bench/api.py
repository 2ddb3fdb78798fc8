"""Python API throughput: items/s of `pd.map` over many small inputs on two native workers,
against a single-process wasmtime loop over the same module and inputs.

The module is `examples/wordfreq` (built by `make examples`: a C program compiled to WASI),
the inputs N lines of text of about 60 bytes (N = 10,000; `--quick` 2,000), each one run of
the program (stdin the line; stdout its counts, checksum and top words).

- `pd.map`: a fresh embedded Redis, the three services as real processes (the test suite's
  `Controller`), two `processdistro worker --cores 1` processes; `processdistro.connect()`
  then `pd.map(module, generator)` and its `as_completed()`, timed from the call (inputs
  streamed into Redis, grouped 64 to a subtask) to the last output read back. Three modes:
  `files=True` with `--replicate 0` (before: the aggregator writes out/<index> per input),
  the default layout (packed: one file per subtask, its result envelope) with replicate 0,
  and packed with the wasm default replicate (0.1 of the subtasks run twice and compared).
  3 runs each, interleaved (`--quick`: 1), median reported; a warm-up job first (the workers
  fetch and compile the module), reported apart. The CPU each process used (/proc) says
  where the time goes.
- Baseline: the worker's own `ModuleRunner` (its wasmtime engine and settings, epoch
  deadline, memory cap, deterministic WASI) in this one process, looping over the inputs
  as a user would: one run envelope, one run, per input. And the same loop in envelopes of
  64 runs (what one subtask of `pd.map` is), to separate per-call from per-run costs.
  Measured before and after the jobs; the median is the reference. And a trivial pd-ABI
  module (examples/rust_rot13) called 5,000 times through the same ModuleRunner: what a node
  pays per run when no WASI instance is built (the ceiling for many tiny items).

pd-ABI rows (goal 3, 50,000 small items/s): `pd.map` of examples/rust_rot13 (a trivial
pd-ABI module that exports `pd_run_batch`) over M lines (M = 200,000; `--quick` 50,000),
`batch=True` (the default: up to `BATCH_RUNS` inputs per subtask, one call into the module
each) with replicate 0 and with the default 0.1, and `batch=False` (before: one input per
subtask) over fewer lines (3,000; `--quick` 1,000: it is ~100x slower), interleaved in the
same run. Baselines in this process: the ModuleRunner looping `pd_run` per line (what a user
would write), and the same ModuleRunner given batches of `BATCH_RUNS` (one core's ceiling).

Every output of every `pd.map` run is compared with the baseline's; a difference fails the
benchmark. The services, the workers and this process share the machine's cores.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processdistro import connect
from processdistro.shared.pd_batch import decode_results, encode_batch
from processdistro.shared.redis_server import EmbeddedRedis
from processdistro.shared.tasks.wasm import BATCH_RUNS, GROUP_RUNS
from processdistro.shared.wasi import ResultEnvelope, RunEnvelope
from processdistro.worker.runtime import Limits, ModuleRunner
from rich.console import Console

from . import Report, Table
from .pipeline import _test_helpers, make_controller, notable_log_lines, proc_cpu_s
from .stealing import Worker

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "examples" / "wordfreq" / "wordfreq.wasm"
N = {False: 10_000, True: 2_000}
REPS = {False: 3, True: 1}
WORKERS = 2
WARM_UP = 4 * GROUP_RUNS
JOB_TIMEOUT_S = 600
ROT13 = REPO / "examples" / "rust_rot13" / "rust_rot13.wasm"  # a pd-ABI module: one instance, many runs
CEILING_RUNS = 5_000
# mode -> (replicate, a file per input): `files=True` is the layout before outputs were packed
# (the aggregator writes out/<index> per input, which on a VM's disk costs more than running
# the program); the default writes one file per subtask
MODES: dict[str, tuple[float | None, bool]] = {
    "files=True, replicate 0 (before: a file per input)": (0.0, True),
    "replicate 0 (packed: a file per subtask)": (0.0, False),
    "replicate 0.1 (wasm default), packed": (None, False),
}
# pd-ABI rows: mode -> (replicate, batch); inputs for batch=False are fewer (it is far slower)
PD_ABI_N = {False: 200_000, True: 50_000}
PD_ABI_BEFORE_N = {False: 3_000, True: 1_000}
PD_ABI_LOOP_N = 20_000  # lines the per-call loop baseline times
PD_ABI_MODES: dict[str, tuple[float | None, bool]] = {
    "pd-ABI, batch=False, replicate 0 (before: one input per subtask)": (0.0, False),
    "pd-ABI, batches, replicate 0": (0.0, True),
    "pd-ABI, batches, replicate 0.1 (wasm default)": (None, True),
}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "box"]


def lines(n: int) -> Iterator[bytes]:
    """The inputs: n distinct lines of about 60 bytes."""
    for i in range(n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8)]
        yield f"{i} {' '.join(words)} {i % 97}\n".encode()


# ---------------------------------------------------------------------------- baseline


def baseline(n: int, batch: int) -> tuple[float, float, list[bytes]]:
    """Items/s of the worker's ModuleRunner over the inputs in this process, `batch` runs
    per envelope, the CPU seconds it used, and the outputs."""
    data = MODULE.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    runner = ModuleRunner(limits=Limits())
    outputs: list[bytes] = []
    try:
        runner.module(sha, MODULE)  # compiled once, as a worker does before its first task
        started, cpu = time.perf_counter(), time.process_time()
        pending: list[bytes] = []

        def flush() -> None:
            envelope = RunEnvelope(("wordfreq.wasm",), (), tuple(pending), seed=len(outputs), deterministic=True)
            for run in ResultEnvelope.decode(runner.run(sha, MODULE, envelope.encode())).runs:
                if run.exit_code != 0:
                    raise RuntimeError(f"the baseline run {len(outputs)} exited with {run.exit_code}")
                outputs.append(run.stdout)
            pending.clear()

        for line in lines(n):
            pending.append(line)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        return n / (time.perf_counter() - started), time.process_time() - cpu, outputs
    finally:
        runner.close()


def pd_abi_ceiling() -> float:
    """Runs/s of a trivial pd-ABI module (examples/rust_rot13: one instance serves every run)
    through the worker's ModuleRunner in this process: what a node's executor costs per call
    when there is no WASI instance to build."""
    data = ROT13.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    runner = ModuleRunner(limits=Limits())
    try:
        runner.module(sha, ROT13)
        started = time.perf_counter()
        for i in range(CEILING_RUNS):
            if runner.run(sha, ROT13, b"item %d" % i) != codecs.encode(f"item {i}", "rot13").encode():
                raise RuntimeError(f"rust_rot13 gave a wrong output for item {i}")
        return CEILING_RUNS / (time.perf_counter() - started)
    finally:
        runner.close()


def rot13_loop(n: int, batch: int) -> float:
    """Items/s of examples/rust_rot13 through the worker's ModuleRunner in this process over
    the first n lines: one `pd_run` per line (batch 1, as a user's loop), or batch inputs of
    `batch` lines (one `pd_run_batch` call each); every output checked."""
    data = ROT13.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    runner = ModuleRunner(limits=Limits())
    items = list(lines(n))
    try:
        runner.module(sha, ROT13)
        started = time.perf_counter()
        outs: list[bytes] = []
        if batch == 1:
            outs = [runner.run(sha, ROT13, item) for item in items]
        else:
            for at in range(0, n, batch):
                outs += [
                    out for _s, out in decode_results(runner.run(sha, ROT13, encode_batch(items[at : at + batch])))
                ]
        rate = n / (time.perf_counter() - started)
        if outs != [rot13(item) for item in items]:
            raise RuntimeError(f"rust_rot13 in the loop (batch {batch}) gave a wrong output")
        return rate
    finally:
        runner.close()


def rot13(data: bytes) -> bytes:
    return codecs.encode(data.decode(), "rot13").encode()


# ---------------------------------------------------------------------------- pd.map


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


_WORKER_CPU: dict[int, float] = {}  # pid -> CPU seconds, every worker process seen this run


def cpu_now(ctl: Any, workers: list[Worker], redis_pid: int) -> dict[str, float]:
    """CPU seconds used so far by each part: the services, the workers (with their executor
    processes), Redis, and this process (the API: streaming inputs, polling, reading outputs)."""
    cpu = {name: proc_cpu_s(proc.pid) for name, proc in ctl.procs.items()}
    # a worker replaces an executor process now and then: keep the last figure of every
    # process ever seen, so the sum never drops (a replaced process's last moments are lost)
    for pid in (p for w in workers for p in (w.proc.pid, *children_of(w.proc.pid))):
        _WORKER_CPU[pid] = max(_WORKER_CPU.get(pid, 0.0), proc_cpu_s(pid))
    cpu["workers"] = sum(_WORKER_CPU.values())
    cpu["redis"] = proc_cpu_s(redis_pid)
    cpu["api"] = time.process_time()
    return cpu


@dataclass
class MapRun:
    mode: str
    seconds: float  # the map call to the last output read back
    submit_s: float  # the map call's return: inputs streamed, module stored, command sent
    first_s: float  # the map call to the first output
    subtasks: int
    inputs: int
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each part used meanwhile

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds


def map_run(
    url: str,
    home: Path,
    n: int,
    mode: str,
    replicate: float | None,
    expected: list[bytes],
    cpu: Callable[[], dict[str, float]],
    files: bool = False,
    module: Path = MODULE,
    batch: bool = True,
) -> MapRun:
    before = cpu()
    with connect(url, home=home) as pd:
        started = time.perf_counter()
        job = pd.map(module, lines(n), replicate=replicate, timeout=120, files=files, batch=batch)
        submitted = time.perf_counter()
        outputs: list[bytes | None] = [None] * n
        first = 0.0
        for index, output in job.as_completed(timeout=JOB_TIMEOUT_S):
            first = first or time.perf_counter()
            outputs[index] = output
        elapsed = time.perf_counter() - started
        total = job.progress.total
    used = {k: v - before.get(k, 0.0) for k, v in cpu().items()}
    wrong = [i for i in range(n) if outputs[i] != expected[i]]
    if wrong:
        raise RuntimeError(f"pd.map gave {len(wrong)} outputs unlike the baseline's, first at input {wrong[0]}")
    return MapRun(mode, elapsed, submitted - started, first - started, total, n, used)


def run(*, quick: bool, console: Console) -> Report:
    subprocess.run(["make", "-s", "-C", str(REPO / "examples")], check=True)
    n = N[quick]
    base: dict[int, list[float]] = {1: [], GROUP_RUNS: []}
    base_cpu: dict[int, list[float]] = {1: [], GROUP_RUNS: []}
    modes = MODES
    runs: dict[str, list[MapRun]] = {mode: [] for mode in modes}
    log_lines: list[str] = []
    cold: MapRun | None = None

    ceiling: list[float] = []
    m, m_before = PD_ABI_N[quick], PD_ABI_BEFORE_N[quick]
    abi_runs: dict[str, list[MapRun]] = {mode: [] for mode in PD_ABI_MODES}
    abi_loop: dict[int, list[float]] = {1: [], BATCH_RUNS: []}
    abi_expected = [rot13(line) for line in lines(m)]

    def measure_abi_loop() -> None:
        for batch in abi_loop:
            console.print(f"baseline: rust_rot13 over {PD_ABI_LOOP_N} lines in one ModuleRunner, batch {batch}")
            abi_loop[batch].append(rot13_loop(PD_ABI_LOOP_N, batch))

    def measure_baseline() -> list[bytes]:
        ceiling.append(pd_abi_ceiling())
        out: list[bytes] = []
        for batch in base:
            console.print(f"baseline: {n} inputs through one ModuleRunner, {batch} run(s) per envelope")
            rate, used, out = baseline(n, batch)
            base[batch].append(rate)
            base_cpu[batch].append(used)
        return out

    expected = measure_baseline()
    measure_abi_loop()
    controller_cls, _py_node = _test_helpers()
    with tempfile.TemporaryDirectory(prefix="pd-bench-api-") as tmp:
        work = Path(tmp)
        server = EmbeddedRedis(directory=work / "redis", persist=False)
        url = server.start()
        home = work / "pd-home"
        home.mkdir()
        ctl = make_controller(controller_cls, url, home, None)
        workers: list[Worker] = []
        try:
            ctl.wait_ready()
            workers = [Worker(ctl, work / f"w{i}") for i in range(WORKERS)]
            # a first job fetches and compiles the module on each worker (the loop compiles
            # it before timing too); what it costs is reported apart
            console.print(f"pd.map warm-up: {WARM_UP} inputs, the workers fetch and compile the module")
            assert server.process is not None
            redis_pid = server.process.pid

            def cpu() -> dict[str, float]:
                return cpu_now(ctl, workers, redis_pid)

            cold = map_run(url, home, WARM_UP, "warm-up", 0.0, expected[:WARM_UP], cpu)
            map_run(url, home, 1000, "warm-up", 0.0, abi_expected[:1000], cpu, module=ROT13)
            for rep in range(REPS[quick]):  # interleaved, so drift on a shared machine hits both modes
                for mode, (replicate, files) in modes.items():
                    console.print(f"pd.map {rep + 1}/{REPS[quick]}: {n} inputs on {WORKERS} workers, {mode}")
                    runs[mode].append(map_run(url, home, n, mode, replicate, expected, cpu, files))
                for mode, (replicate, batch) in PD_ABI_MODES.items():
                    k = m if batch else m_before
                    console.print(f"pd.map {rep + 1}/{REPS[quick]}: {k} lines through rust_rot13, {mode}")
                    abi_runs[mode].append(
                        map_run(url, home, k, mode, replicate, abi_expected[:k], cpu, module=ROT13, batch=batch)
                    )
            log_lines = notable_log_lines(home)
        finally:
            for w in workers:
                w.stop()
            ctl.stop()
            server.stop()
    if measure_baseline() != expected:
        raise RuntimeError("the baseline's outputs changed between its two runs")
    measure_abi_loop()
    assert cold is not None
    report = _report(n, base, base_cpu, runs, cold, log_lines, ceiling)
    _abi_report(report, m, abi_loop, abi_runs)
    return report


def _abi_report(report: Report, m: int, loop: dict[int, list[float]], runs: dict[str, list[MapRun]]) -> None:
    """The pd-ABI rows: a table of their own, and their figures in the report's data."""
    reference = statistics.median(loop[1])
    table = Table(
        f"lines of ~60 bytes through examples/rust_rot13 (pd-ABI, exports pd_run_batch); pd.map on {WORKERS}"
        f" native workers vs one process looping in wasmtime; load average {os.getloadavg()[0]:.1f} at the end",
        [
            "how",
            "inputs",
            "items/s (runs)",
            "x loop",
            "wall s",
            "subtasks",
            "workers / aggregator / rest CPU us per input",
        ],
    )
    for batch, rates in loop.items():
        label = "1 pd_run per input" if batch == 1 else f"pd_run_batch of {batch}"
        rate = statistics.median(rates)
        table.rows.append(
            [f"loop: ModuleRunner, {label}", PD_ABI_LOOP_N, _runs_text(rates), rate / reference, "", "", ""]
        )
    data: dict[str, Any] = {"loop_items_per_s": {str(k): v for k, v in loop.items()}, "inputs": m}
    for mode, rs in runs.items():
        med = sorted(rs, key=lambda x: x.rate)[(len(rs) - 1) // 2]
        per = {k: v * 1e6 / med.inputs for k, v in med.cpu_s.items()}
        rest = sum(v for k, v in per.items() if k not in ("workers", "aggregator"))
        cpu = f"{per.get('workers', 0):.0f} / {per.get('aggregator', 0):.0f} / {rest:.0f}"
        rates = [x.rate for x in rs]
        table.rows.append(
            [f"pd.map, {mode}", med.inputs, _runs_text(rates), med.rate / reference, med.seconds, med.subtasks, cpu]
        )
        data[mode] = {
            "median_items_per_s": med.rate,
            "ratio_to_loop": med.rate / reference,
            "runs": [vars(x) for x in rs],
        }
    report.tables.append(table)
    report.data["pd_abi"] = data


def _runs_text(rates: list[float]) -> str:
    med = statistics.median(rates)
    return f"{med:,.0f} ({' / '.join(f'{r:,.0f}' for r in rates)})" if len(rates) > 1 else f"{med:,.0f}"


def _report(
    n: int,
    base: dict[int, list[float]],
    base_cpu: dict[int, list[float]],
    runs: dict[str, list[MapRun]],
    cold: MapRun,
    log_lines: list[str],
    ceiling: list[float],
) -> Report:
    reference = statistics.median(base[1])
    batched = statistics.median(base[GROUP_RUNS])
    table = Table(
        f"{n} lines of ~60 bytes through examples/wordfreq (WASI); pd.map on {WORKERS} native workers"
        f" (1 core each) vs one process looping in wasmtime",
        ["how", "items/s", "x loop", "x loop (64/envelope)", "wall s", "submit s", "first output s", "subtasks"],
    )
    table.rows.append(["loop: ModuleRunner, 1 run per envelope", reference, 1.0, reference / batched, n / reference])
    table.rows[-1] += ["", "", ""]
    table.rows.append(["loop: ModuleRunner, 64 runs per envelope", batched, batched / reference, 1.0, n / batched])
    table.rows[-1] += ["", "", ""]
    data_runs = {}
    for mode, rs in runs.items():
        med = sorted(rs, key=lambda x: x.rate)[(len(rs) - 1) // 2]
        table.rows.append(
            [
                f"pd.map, {mode}",
                med.rate,
                med.rate / reference,
                med.rate / batched,
                med.seconds,
                med.submit_s,
                med.first_s,
                med.subtasks,
            ]
        )
        data_runs[mode] = {
            "median_items_per_s": med.rate,
            "ratio_to_loop": med.rate / reference,
            "ratio_to_batched_loop": med.rate / batched,
            "runs": [vars(x) | {"items_per_s": x.rate} for x in rs],
        }
    parts = ["workers", "gateway", "scheduler", "aggregator", "redis", "api"]
    cpu = Table(
        "CPU seconds per 1,000 inputs, by process (the median run of each); cores busy = all CPU / wall time",
        ["how", *parts, "all", "cores busy"],
    )
    loop_cpu = statistics.median(base_cpu[1]) * 1000 / n
    cpu.rows.append(["loop: ModuleRunner, 1 run per envelope", loop_cpu, "", "", "", "", "", loop_cpu, ""])
    for mode, rs in runs.items():
        med = sorted(rs, key=lambda x: x.rate)[(len(rs) - 1) // 2]
        per = [med.cpu_s.get(p, 0.0) * 1000 / n for p in parts]
        cpu.rows.append([f"pd.map, {mode}", *per, sum(per), sum(med.cpu_s.values()) / med.seconds])
    report = Report(
        name="api",
        title="Python API",
        tables=[table, cpu],
        notes=[
            "x loop: pd.map's items/s over the single-process loop's, both measured in this run;"
            " the baseline ran before and after the jobs (median of both)",
            f"the controller's three services, {WORKERS} workers and this process share the machine's cores",
            f"before the timed jobs, a warm-up pd.map of {cold.inputs} inputs (the workers fetch and compile the"
            f" module) took {cold.seconds:.2f} s, first output after {cold.first_s:.2f} s",
            f"a WASI run builds its instance: {reference:,.0f} runs/s on one core (the loop), so at most"
            f" {2 * reference:,.0f}/s on 2 cores with a free controller; a trivial pd-ABI call through the same"
            f" ModuleRunner: {statistics.median(ceiling):,.0f} runs/s on one core; many such inputs go in"
            " batches (the rust_rot13 table)",
        ],
        data={
            "inputs": n,
            "workers": WORKERS,
            "group_runs": GROUP_RUNS,
            "baseline_items_per_s": {"per_input": base[1], "per_64": base[GROUP_RUNS]},
            "baseline_cpu_s": {"per_input": base_cpu[1], "per_64": base_cpu[GROUP_RUNS]},
            "map": data_runs,
            "warm_up": vars(cold),
            "pd_abi_runs_per_s": ceiling,
        },
    )
    if log_lines:
        report.notes.append("service log lines worth a look:\n    " + "\n    ".join(log_lines))
    return report
