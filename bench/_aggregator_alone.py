"""The aggregator alone: `python bench/_aggregator_alone.py WIDTH HEIGHT` queues the results of
a whole Mandelbrot job (4 x 4 px tiles, max_iter 1, no replication) into the results stream
of a fresh embedded Redis, as gateways would hand them over from four nodes, then runs an
in-process `Aggregator.step` until the job is `done`, and prints one JSON line: results/s
(wall), the aggregator's and Redis's CPU ms per result and the Redis commands per result.

Run by `bench/pipeline.py` with this checkout's Python and, for a before/after, with
`BENCH_BASELINE_PYTHON` (so it uses only what both versions have: `client.submit`,
`Scheduler`, `Aggregator`). Not a benchmark of its own (the leading underscore).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _scratch import scratch_redis  # a script: bench/ is its first path entry
from processdistro import client
from processdistro.aggregator.service import Aggregator
from processdistro.scheduler.service import Scheduler
from processdistro.shared import keys
from processdistro.shared.jobs import JobState
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.service import StopFlag
from processdistro.shared.settings import Settings
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job
from processdistro.shared.store.streams import ensure_groups
from processdistro.shared.tasks import plugin_and_params

NODES = 4


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def calls(r: Client) -> int:
    return sum(int(v["calls"]) for v in r.info("commandstats").values())


def measure(r: Client, redis_pid: int, work: Path, width: int, height: int) -> dict[str, float]:
    ensure_groups(r)
    settings = Settings(redis_url="redis://unused", home=work / "home")
    sched = Scheduler(client=r, settings=settings, modules=ModuleRegistry(static_dir=settings.static_path))
    job_id = client.submit(r, "mandelbrot", {"width": width, "height": height, "tile": 4, "max_iter": 1}, replicate=0.0)
    sched.handle_commands(block_ms=None)
    sched.feeder.feed()  # queued -> running
    job = load_job(r, job_id)
    assert job is not None
    plugin, params = plugin_and_params(job_id, job.kind, job.params)
    output = np.ones(16, dtype="<u4").tobytes()  # max_iter 1: every pixel escapes at 1
    pipe = r.pipeline(transaction=False)
    for task in plugin.entries(job, params, 0, job.total):
        fields = {**task.to_redis(), "node": f"node-{task.index % NODES}", "output": output, "elapsed_ms": 1.0}
        pipe.xadd(keys.RESULTS, fields)
    pipe.execute()
    agg = Aggregator(client=r, data_dir=work / "data")
    flag = StopFlag()
    calls0, redis0, cpu0, t0 = calls(r), proc_cpu_s(redis_pid), time.process_time(), time.perf_counter()
    polls = 0
    while True:  # until every result is merged (the finalize after it is not measured)
        agg.step(flag)
        polls += 1
        state = load_job(r, job_id)
        assert state is not None
        if state.done >= state.total:
            break
    wall = time.perf_counter() - t0
    cpu, redis_cpu = time.process_time() - cpu0, proc_cpu_s(redis_pid) - redis0
    commands = calls(r) - calls0 - 1 - polls
    deadline = time.monotonic() + 60
    while state.state is not JobState.DONE and time.monotonic() < deadline:
        agg.step(flag)
        state = load_job(r, job_id)
        assert state is not None
    if state.state is not JobState.DONE:
        raise RuntimeError(f"job {job_id} ended {state.state.value}")
    n = job.total
    return {
        "results": n,
        "results_per_s": n / wall,
        "aggregator_cpu_ms": 1000 * cpu / n,
        "redis_cpu_ms": 1000 * redis_cpu / n,
        # the loop's own job-record reads (one HGETALL per step) are not the aggregator's
        "redis_commands": commands / n,
    }


def main() -> None:
    width, height = int(sys.argv[1]), int(sys.argv[2])
    with scratch_redis("pd-agg-alone-") as scratch:
        print(json.dumps(measure(scratch.r, scratch.redis_pid, scratch.work, width, height)))


if __name__ == "__main__":
    main()
