"""A job's per-subtask limits (`TaskPlugin.limits` -> `TaskFields` -> `TaskAssign.deadline_s`,
`.memory_mb` -> the node's `Start`) are enforced on every node and reported like a failure.

- the path: `TaskLimits` bounds, `TaskFields` round trip, the gateway's task frame;
- the native node: `Limits.within`, `ModuleRunner` and `ExecutorPool` under a run's own
  limits (pd-ABI and WASI modules), real wasmtime and real processes;
- the browser: a module that never ends is stopped at its deadline (its Web Worker
  terminated) and reported as `task_failed`; memory past the cap fails the run (real Chromium);
- end to end: a job whose task entries carry a deadline, run by `processdistro worker`.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import test_agent_protocol as agent
from conftest import Controller
from nodes import run_async
from playwright.sync_api import Browser, Page
from processdistro import client
from processdistro.gateway.frames import task_frame
from processdistro.shared import keys
from processdistro.shared import protocol as P
from processdistro.shared.jobs import JobState
from processdistro.shared.modules import Module
from processdistro.shared.queue import TaskFields
from processdistro.shared.store.connection import Client
from processdistro.shared.tasks import PLUGINS
from processdistro.shared.tasks.base import TaskLimits
from processdistro.shared.wasi import RunEnvelope
from processdistro.worker.exceptions import DeadlineExceeded, MemoryCapReached
from processdistro.worker.pool import ExecutorPool
from processdistro.worker.runtime import MIB, Limits, ModuleRunner
from test_agent_protocol import ABI_SHA, WORKER_CALLS, Conn, spin_input, wait_state
from test_matmul import wait_job
from test_worker import GROW_WAT, LOOP_WAT, MANDEL_SHA, MANDELBROT, Worker, tile_input, tile_reference, wat_module

# WASI commands: one spins forever, one grows its memory until refused, then traps.
WASI_LOOP_WAT = """(module
 (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
 (memory (export "memory") 1)
 (func (export "_start") (loop $l (br $l))))"""
WASI_GROW_WAT = """(module
 (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
 (memory (export "memory") 1)
 (func (export "_start")
   (block $refused (loop $l
     (br_if $refused (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
     (br $l)))
   unreachable))"""
# the browser fixtures of the agent's protocol tests (a static server, a page on it, a fake gateway)
static_server, page, gateway_factory = agent.static_server, agent.page, agent.gateway_factory

ONE_RUN = RunEnvelope(argv=("prog",), env=(), stdins=(b"",)).encode()


# ---------------------------------------------------------------------------- the path to the node


@pytest.mark.parametrize(
    ("deadline_s", "memory_mb"),
    [(0.0, None), (-1.0, None), (86400.5, None), (None, 0), (None, 65537)],
    ids=["zero deadline", "negative deadline", "deadline over a day", "no memory", "memory over 64 GiB"],
)
def test_task_limits_keep_to_the_protocol_bounds(deadline_s: float | None, memory_mb: int | None) -> None:
    with pytest.raises(ValueError, match="expected a"):
        TaskLimits(deadline_s=deadline_s, memory_mb=memory_mb)


def test_built_in_kinds_set_no_limits() -> None:
    mandelbrot = PLUGINS["mandelbrot"]
    assert mandelbrot.limits(mandelbrot.parse_params({})) == TaskLimits(None, None)


@pytest.mark.parametrize(
    "fields",
    [
        TaskFields("j", 3, "wasm", "a" * 64, b"in", deadline_s=2.5, memory_mb=64),
        TaskFields("j", 3, "wasm", "a" * 64, b"in", deadline_s=0.25),
        TaskFields("j", 3, "mandelbrot", "a" * 64, b"in"),
    ],
    ids=["both", "deadline only", "none"],
)
def test_task_fields_carry_limits_through_redis_and_retries(fields: TaskFields) -> None:
    stored = fields.to_redis()
    assert ("deadline_s" in stored, "memory_mb" in stored) == (
        fields.deadline_s is not None,
        fields.memory_mb is not None,
    )
    raw = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in stored.items()}
    assert TaskFields.from_redis(raw) == fields
    again = fields.retry()
    assert (again.deadline_s, again.memory_mb, again.attempt) == (fields.deadline_s, fields.memory_mb, 1)


def test_the_task_frame_takes_the_limits_of_its_first_part() -> None:
    module = Module("m", "b" * 64, Path("m.wasm"), b"")
    first = TaskFields("j", 0, "wasm", module.sha256, b"\x01", deadline_s=1.5, memory_mb=32)
    frame = task_frame([("1-0", first), ("1-1", dataclasses.replace(first, index=1, input=b"\x02"))], module)
    assert (frame.deadline_s, frame.memory_mb, len(frame.more)) == (1.5, 32, 1)
    assert P.server_message_adapter.validate_json(frame.model_dump_json()) == frame
    plain = task_frame([("2-0", dataclasses.replace(first, deadline_s=None, memory_mb=None))], module)
    assert (plain.deadline_s, plain.memory_mb) == (None, None)


# ---------------------------------------------------------------------------- the native node


@pytest.mark.parametrize(
    ("own", "deadline_s", "memory_mb", "expected"),
    [
        (Limits(300.0, 1024 * MIB), None, None, Limits(300.0, 1024 * MIB)),
        (Limits(300.0, 1024 * MIB), 2.5, 64, Limits(2.5, 64 * MIB)),
        (Limits(1.0, 32 * MIB), 2.5, 64, Limits(1.0, 32 * MIB)),
        (Limits(300.0, 32 * MIB), 0.5, None, Limits(0.5, 32 * MIB)),
    ],
    ids=["task has none", "task lower", "worker lower", "deadline only"],
)
def test_a_task_only_lowers_the_workers_limits(
    own: Limits, deadline_s: float | None, memory_mb: int | None, expected: Limits
) -> None:
    assert own.within(deadline_s, memory_mb) == expected


def test_the_runner_applies_each_runs_own_limits(tmp_path: Path) -> None:
    loop_sha, loop_path = wat_module(tmp_path, "loop", LOOP_WAT)
    grow_sha, grow_path = wat_module(tmp_path, "grow", GROW_WAT)
    runner = ModuleRunner(limits=Limits(deadline_s=60, memory_bytes=64 * MIB))
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"ran past its 0.3s deadline"):
            runner.run(loop_sha, loop_path, b"", runner.limits.within(0.3, None))
        assert time.monotonic() - started < 10
        capped = runner.limits.within(None, 8)
        with pytest.raises(MemoryCapReached, match=r"the memory cap is 8 MiB"):
            runner.run(grow_sha, grow_path, b"", capped)
        with pytest.raises(MemoryCapReached, match=r"memory at 6[34] MiB; the memory cap is 64 MiB"):
            runner.run(grow_sha, grow_path, b"")  # no task limits: the worker's own again
        # the instance kept from that run is larger than the next run's cap: a fresh one runs it
        with pytest.raises(MemoryCapReached, match=r"memory at [1-8] MiB; the memory cap is 8 MiB"):
            runner.run(grow_sha, grow_path, b"", capped)
        assert runner.run(MANDEL_SHA, MANDELBROT, tile_input(), capped) == tile_reference()
    finally:
        runner.close()


def test_the_runner_applies_a_runs_limits_to_wasi_commands(tmp_path: Path) -> None:
    loop_sha, loop_path = wat_module(tmp_path, "wasi-loop", WASI_LOOP_WAT)
    grow_sha, grow_path = wat_module(tmp_path, "wasi-grow", WASI_GROW_WAT)
    runner = ModuleRunner(limits=Limits(deadline_s=60, memory_bytes=64 * MIB))
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"ran past its 0.3s deadline"):
            runner.run(loop_sha, loop_path, ONE_RUN, runner.limits.within(0.3, None))
        assert time.monotonic() - started < 10
        with pytest.raises(MemoryCapReached, match=r"the memory cap is 8 MiB"):
            runner.run(grow_sha, grow_path, ONE_RUN, runner.limits.within(None, 8))
        with pytest.raises(MemoryCapReached, match=r"the memory cap is 64 MiB"):
            runner.run(grow_sha, grow_path, ONE_RUN)
    finally:
        runner.close()


def test_the_pool_stops_a_run_at_its_own_deadline_and_carries_on(tmp_path: Path) -> None:
    loop_sha, loop_path = wat_module(tmp_path, "loop", LOOP_WAT)

    async def scenario() -> None:
        pool = ExecutorPool(size=1, limits=Limits(deadline_s=120))
        try:
            before = pool.pids()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"0.5s deadline"):
                await pool.run("1-0", loop_sha, loop_path, b"", limits=pool.limits.within(0.5, None))
            assert time.monotonic() - started < 20, "stopped by the task's deadline, not the worker's"
            assert pool.pids() != before, "the overrun process was replaced"
            out, _ = await pool.run("1-1", MANDEL_SHA, MANDELBROT, tile_input())
            assert out == tile_reference()
        finally:
            await pool.close()

    run_async(scenario())


# ---------------------------------------------------------------------------- the browser


@pytest.mark.browser
def test_browser_worker_fails_a_run_past_its_memory_cap(page: Page) -> None:
    run = {"op": "run", "sha256": ABI_SHA, "url": "/test-modules/abi.wasm"}
    replies = page.evaluate(
        WORKER_CALLS,
        [
            {**run, "input": 3_000_000, "memoryMb": 4},  # the module grows to ~6 MiB
            {**run, "input": 3_000_000, "memoryMb": 16},
            {**run, "input": 3_000_000},  # no cap
            {**run, "input": [1, 2, 3], "memoryMb": 4},  # the big instance is not reused under 4 MiB
        ],
    )
    over, under, free, small = replies
    assert not over["ok"] and over["error"]["name"] == "MemoryCapReached", over
    assert "the memory cap is 4 MiB" in over["error"]["message"]
    assert under["ok"] and under["output"] is True
    assert free["ok"] and free["output"] is True
    assert small["ok"] and small["output"] == [3, 2, 1], small


@pytest.mark.browser
@pytest.mark.timeout(90)
def test_browser_stops_a_never_ending_part_at_its_deadline(browser: Browser, gateway_factory: Any) -> None:
    async def only(c: Conn) -> None:
        await c.welcome()
        await c.recv("ready")
        endless = c.task("1-0", spin_input(0xFFFFFFFF), {"1-1": b"after"}).model_copy(update={"deadline_s": 1.5})
        sent = time.monotonic()
        await c.send(endless)
        failed = await c.recv("task_failed", timeout=30)
        took = time.monotonic() - sent
        assert failed.task_id == "1-0"
        assert failed.message.startswith("DeadlineExceeded: task ran past its 1.5s deadline"), failed.message
        assert took >= 1.4, f"stopped after {took:.1f}s, before its deadline"
        res = await c.recv("result", timeout=10)  # the task's next part runs on a fresh worker
        assert res.task_id == "1-1" and base64.b64decode(res.output_b64) == b"retfa"
        plain = c.task("2-0", spin_input(2_000_000))  # no deadline: runs to its end
        await c.send(plain)
        res = await c.recv("result", timeout=30)
        assert res.task_id == "2-0"
        await c.ws.close(P.CloseCode.BANNED, "test over")

    gw, base = gateway_factory([only])
    tab = browser.new_page()
    try:
        tab.goto(f"{base}/agent?code=JOIN-1234")
        tab.click("#join")
        wait_state(tab, "banned", 60_000)
        snap = tab.evaluate("window.pdAgent.snapshot()")
        assert gw.errors == [], tab.evaluate("window.pdAgent.logLines")
    finally:
        tab.close()
    assert gw.errors == []
    assert (snap["tasksDone"], snap["tasksFailed"], snap["running"]) == (2, 1, 0)


# ---------------------------------------------------------------------------- end to end


def _give_deadline(r: Client, deadline_s: float) -> int:
    """Rewrite every undelivered task entry with a deadline (as a plugin's `limits` would)."""
    n = 0
    for entry_id, raw in r.xrange(keys.TASKS):
        fields = dataclasses.replace(TaskFields.from_redis(raw), deadline_s=deadline_s)
        with r.pipeline() as pipe:
            pipe.xadd(keys.TASKS, fields.to_redis())
            pipe.xdel(keys.TASKS, entry_id)
            pipe.execute()
        n += 1
    return n


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_native_worker_fails_parts_past_the_jobs_deadline(controller: Controller, r: Client, tmp_path: Path) -> None:
    """One tile of points inside the set at 10^8 iterations: minutes of work, far inside the
    worker's own 300 s deadline. With a 1 s deadline on its task entry every run fails
    with DeadlineExceeded, and once two distinct workers report it failing (one node's
    word is not enough: `core.failures`) the job fails and says why."""
    view = {"xmin": -0.1, "xmax": 0.1, "ymin": -0.1, "ymax": 0.1}
    params = {"width": 32, "height": 32, "tile": 32, "max_iter": 100_000_000, **view}
    # no replicated copy (the default picks 5 % of the subtasks, so now and then this one):
    # exactly one entry gets the deadline
    job_id = client.submit(r, "mandelbrot", params, replicate=0)
    deadline = time.monotonic() + 60
    while not r.xlen(keys.TASKS):  # fed, and no node yet to take it
        assert time.monotonic() < deadline, controller.logs()
        time.sleep(0.05)
    assert _give_deadline(r, 1.0) == 1
    workers = [Worker(controller, tmp_path / f"worker-{n}", "--cores", "1") for n in range(2)]
    try:
        for worker in workers:
            worker.wait_connected()
        started = time.monotonic()
        job = wait_job(r, job_id, timeout=180)
        took = time.monotonic() - started
    finally:
        for worker in workers:
            worker.stop()
    assert job.state is JobState.FAILED, (job, controller.logs(), *(w.text() for w in workers))
    assert "failed on 2 distinct nodes" in job.error, job.error
    assert "DeadlineExceeded: task ran past its 1s deadline" in job.error, job.error
    assert took < 150, "every attempt was stopped at the task's deadline, not the worker's 300 s"
