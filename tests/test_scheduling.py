"""Scheduling: stealing and backups of stragglers, fair share between equal jobs, priorities."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from conftest import Controller
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_pipeline import expected_small, submit

SLOW_S = 60.0  # the straggler's time per task: far longer than the job takes with backups


def job_ids(r: Client) -> list[str]:
    return [j.decode() for j in r.zrange(keys.JOBS, 0, -1)]


def fraction(r: Client, job_id: str) -> float:
    done, total = r.hmget(keys.job(job_id), "done", "total")
    return int(done or 0) / max(1, int(total or 1))


def test_backups_rescue_a_straggler(controller: Controller, tmp_path: Path, r: Client) -> None:
    """A node 60 s per task holds a few tasks; backups let the fast node finish the job long
    before the slow node could finish any of them (the time is counted from the moment the
    fast node joins, which is after the slow one holds tasks: without backups, the job could
    not end within `SLOW_S` of it)."""
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "0")  # 5 x 4 = 20 tiles
    slow = Node(controller.url, controller.join_code, delay=SLOW_S)
    fast = Node(controller.url, controller.join_code)

    async def scenario() -> float:
        stop = asyncio.Event()
        slow_task = asyncio.create_task(slow.run(stop=stop))
        deadline = time.monotonic() + 60  # the submit command starts slowly on a loaded machine
        while not any(m["type"] == "task" for m in slow.received):  # the slow node holds its share first
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "submit.log").read_text()
            await asyncio.sleep(0.05)
        started = time.monotonic()
        fast_task = asyncio.create_task(fast.run(stop=stop))
        job_id = job_ids(r)[0]
        while r.hget(keys.job(job_id), "state") != b"done" and time.monotonic() - started < SLOW_S:
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        await asyncio.to_thread(proc.wait, 60)  # it writes the outputs
        stop.set()
        fast_task.cancel()
        slow_task.cancel()
        await asyncio.gather(fast_task, slow_task, return_exceptions=True)
        return elapsed

    elapsed = run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text()
    assert slow.done == 0, f"the slow node delivered {slow.done} results: the job waited for it"
    # a loaded 2-core machine takes a few seconds here; a job that waited for the slow node, SLOW_S
    assert elapsed < SLOW_S - 20, f"took {elapsed:.1f}s: stragglers were not backed up"
    assert int(r.hget(keys.STATS, "tasks_backup") or 0) >= 1
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())


def test_slow_node_gives_back_queued_work_and_loses_its_copy(controller: Controller, tmp_path: Path, r: Client) -> None:
    """One slot each; the slow node (3 s a task) holds a queued task when the fast one runs
    dry: the queued task is stolen, the running one backed up, and the slow copy cancelled."""
    before = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "0")  # 20 tiles
    slow = Node(controller.url, controller.join_code, cores=1, delay=3.0)
    fast = Node(controller.url, controller.join_code, cores=1)

    async def scenario() -> int:
        stop = asyncio.Event()
        slow_task = asyncio.create_task(slow.run(stop=stop))
        while slow.done < 1:  # the slow node has a speed record and holds two tasks
            await asyncio.sleep(0.05)
        fast_task = asyncio.create_task(fast.run(stop=stop))
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        slow_done = slow.done
        stop.set()
        await asyncio.gather(fast_task, slow_task, return_exceptions=True)
        return slow_done

    slow_done = run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text()
    after = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    gained = {k: after.get(k, 0) - before.get(k, 0) for k in ("tasks_stolen", "tasks_backup", "copies_cancelled")}
    assert gained["tasks_stolen"] >= 1, (gained, controller.logs())
    # the slow node's last running task: its backup on the fast node wins and the original stops
    assert gained["tasks_backup"] >= 1 and gained["copies_cancelled"] >= 1, gained
    # neither the queued nor the running task waited for the slow node
    assert slow_done == 1, f"the slow node delivered {slow_done} results: the job waited for it"
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())


def test_equal_jobs_share_and_priority_overtakes(controller: Controller, r: Client) -> None:
    big = ("--width", "400", "--height", "400", "--tile", "8", "--max-iter", "50")  # 2500 tiles each
    for _ in range(2):
        assert controller.cli("submit", "mandelbrot", *big).returncode == 0

    async def scenario() -> tuple[float, float, list[str]]:
        stop = asyncio.Event()
        nodes = [Node(controller.url, controller.join_code, cores=2) for _ in range(2)]
        tasks = [asyncio.create_task(n.run(stop=stop)) for n in nodes]
        try:
            while len(job_ids(r)) < 2:
                await asyncio.sleep(0.05)
            a, b = job_ids(r)
            while fraction(r, a) < 0.3 and fraction(r, b) < 0.3:
                await asyncio.sleep(0.05)
            fa, fb = fraction(r, a), fraction(r, b)
            # now a later, more important job
            result = await asyncio.to_thread(controller.cli, "submit", "mandelbrot", *big, "--priority", "5")
            assert result.returncode == 0
            while len(job_ids(r)) < 3:
                await asyncio.sleep(0.05)
            urgent = job_ids(r)[2]
            order: list[str] = []
            deadline = time.monotonic() + 240
            while len(order) < 3 and time.monotonic() < deadline:
                for j in (a, b, urgent):
                    if j not in order and r.hget(keys.job(j), "state") == b"done":
                        order.append(j)
                await asyncio.sleep(0.05)
            return fa, fb, [{a: "a", b: "b", urgent: "urgent"}[j] for j in order]
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    fa, fb, order = run_async(scenario())
    assert abs(fa - fb) < 0.1, f"equal jobs progressed unequally: {fa:.2f} vs {fb:.2f}"
    assert order and order[0] == "urgent", f"finish order {order}"
    assert len(order) == 3


def test_cancel_frees_nodes_within_a_second(controller: Controller, tmp_path: Path, r: Client) -> None:
    """`processdistro cancel`: the job's tasks leave the nodes (no entry pending) within a
    second of the cancel command reaching the controller. Counted from the command's entry in
    `keys.COMMANDS` to the first look that finds nothing pending, both on Redis's clock: the
    CLI's own start-up (seconds of imports on a loaded machine) is not the controller's."""
    proc = submit(controller, tmp_path, "--tile", "16")
    node = Node(controller.url, controller.join_code, delay=30.0)  # holds its tasks a long time

    def look() -> tuple[str, int, float]:
        """(the last command's entry id, task entries pending, Redis's clock) at one moment."""
        pipe = r.pipeline(transaction=True)
        pipe.xinfo_stream(keys.COMMANDS)
        pipe.xpending(keys.TASKS, keys.NODES_GROUP)
        pipe.time()
        info, pending, (seconds, micros) = pipe.execute()
        return info["last-generated-id"].decode(), int(pending["pending"]), seconds + micros / 1e6

    async def scenario() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(node.run(stop=stop))
        while not any(m["type"] == "task" for m in node.received):
            await asyncio.sleep(0.05)
        job_id = job_ids(r)[0]
        submitted = look()[0]  # the submit: the cancel is the next command (nothing else sends one here)
        cancel = asyncio.create_task(asyncio.to_thread(controller.cli, "cancel", job_id))
        deadline = time.monotonic() + 60  # the CLI starts slowly on a loaded machine
        while True:
            sent, pending, now = look()
            if sent != submitted and pending == 0:
                break
            assert time.monotonic() < deadline, controller.logs()
            await asyncio.sleep(0.02)
        result = await cancel
        assert result.returncode == 0, result.stdout + result.stderr
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return now - int(sent.split("-")[0]) / 1000  # an entry id starts with its ms on Redis's clock

    freed = run_async(scenario())
    proc.wait(30)
    assert proc.returncode == 1 and "cancelled" in (tmp_path / "submit.log").read_text()
    assert freed < 1.0, f"nodes freed {freed:.2f}s after the cancel command reached the controller"


def test_idle_node_takes_the_unstarted_parts_of_a_slow_nodes_task(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    """A slow node (0.3 s a part) holds two long hash tasks of many parts when a fast node
    runs dry: the fast one takes over the parts not yet started, by their speeds."""
    from processdistro import client
    from test_hash import write_rows

    write_rows(tmp_path / "rows.csv", 400, with_ids=False)
    params = {"input": str(tmp_path / "rows.csv"), "iterations": 50, "batch": 5}
    job_id = client.submit(r, "hash", params, replicate=0)  # 80 parts
    slow = Node(controller.url, controller.join_code, cores=1, delay=0.3)
    fast = Node(controller.url, controller.join_code, cores=1)
    stolen_before = int(r.hget(keys.STATS, "tasks_stolen") or 0)

    def state() -> bytes | None:
        return r.hget(keys.job(job_id), "state")  # type: ignore[no-any-return]

    async def scenario() -> tuple[int, int]:
        stop = asyncio.Event()
        slow_run = asyncio.create_task(slow.run(stop=stop))
        # wait until it has been timed and holds tasks of several parts
        while not any(m["type"] == "task" and len(m["more"]) >= 5 for m in slow.received):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        fast_run = asyncio.create_task(fast.run(stop=stop))
        deadline = time.monotonic() + 60
        while state() not in (b"done", b"failed", b"cancelled") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        given = sum(1 + len(m["more"]) for m in slow.received if m["type"] == "task")
        done = slow.done
        stop.set()
        await asyncio.gather(slow_run, fast_run)
        return given, done

    given, done = run_async(scenario())
    assert state() == b"done", controller.logs()
    stolen = int(r.hget(keys.STATS, "tasks_stolen") or 0) - stolen_before
    assert stolen >= 5, (stolen, controller.logs())
    # most of what the slow node was given it never ran: the fast node did
    assert given - done >= 5, (given, done, stolen)
