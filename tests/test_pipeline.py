"""The services as real processes against a real Redis, fed by Python protocol nodes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Controller
from executors import flip_first_pixel
from mandel_ref import reference_counts
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.store.connection import Client

SMALL = ["--width", "300", "--height", "200", "--tile", "32", "--max-iter", "200"]


def submit(ctl: Controller, tmp: Path, *extra: str) -> subprocess.Popen[str]:
    return ctl.submit_mandelbrot(tmp, *SMALL, *extra)


async def run_nodes_until(proc: subprocess.Popen[str], *nodes: Node, timeout: float = 120) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(n.run(stop=stop)) for n in nodes]
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*tasks)


def expected_small() -> np.ndarray:
    return reference_counts(300, 200, -2.0, 1.0, -1.5, 1.5, 200)


def test_job_completes_exactly(controller: Controller, tmp_path: Path) -> None:
    proc = submit(controller, tmp_path)
    run_async(run_nodes_until(proc, Node(controller.url, controller.join_code)))
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())


def test_two_aggregators_finalize_once(controller: Controller, tmp_path: Path, r: Client) -> None:
    controller.start("aggregator-2", "aggregator")
    controller.start("aggregator-3", "aggregator")
    proc = submit(controller, tmp_path)
    nodes = [Node(controller.url, controller.join_code) for _ in range(2)]
    run_async(run_nodes_until(proc, *nodes))
    assert proc.returncode == 0, controller.logs()
    job_id = r.zrange(keys.JOBS, 0, 0)[0].decode()
    assert r.hget(keys.job(job_id), "finalized") == b"1"
    consumers = {c["name"] for c in r.xinfo_consumers(keys.RESULTS, keys.AGGREGATORS_GROUP)}
    assert len(consumers) >= 2, "results were not shared between aggregators"
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())


def test_lying_node_never_reaches_the_output(controller: Controller, tmp_path: Path, r: Client) -> None:
    proc = submit(controller, tmp_path)
    liar = Node(controller.url, controller.join_code, corrupt=lambda out: flip_first_pixel(out[::-1]))
    honest = Node(controller.url, controller.join_code)
    run_async(run_nodes_until(proc, liar, honest))
    assert proc.returncode == 0, controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    rejected = int(r.hget(keys.node(liar.device_id), "rejected") or 0)
    # every result it got through was rejected (the last may have died with its socket)
    assert 3 <= rejected <= liar.done and int(r.hget(keys.node(liar.device_id), "completed") or 0) == 0
    assert liar.closed_with == 4004, "a node that keeps failing checks is banned"


def test_closed_socket_requeues_at_once(controller: Controller, tmp_path: Path, r: Client) -> None:
    proc = submit(controller, tmp_path)

    async def scenario() -> float:
        # a node that takes tasks and never answers, then its socket closes
        quitter = Node(controller.url, controller.join_code, cores=4)
        accepted = quitter.join()
        import websockets

        url = controller.url.replace("http", "ws") + f"/ws?token={accepted['token']}"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "ready", "free": 4}))
            for _ in range(4):
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                while msg["type"] != "task":
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"] >= 4
        closed = time.monotonic()
        while r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"] > 0:
            await asyncio.sleep(0.02)
            assert time.monotonic() - closed < 5, "tasks of a closed socket were not requeued"
        requeue_s = time.monotonic() - closed
        await run_nodes_until(proc, Node(controller.url, controller.join_code))
        return requeue_s

    requeue_s = run_async(scenario())
    assert requeue_s < 1.0
    assert proc.returncode == 0, controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())


def test_cancel_ends_the_job(controller: Controller, r: Client) -> None:
    result = controller.cli("submit", "mandelbrot", *SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = r.zrange(keys.JOBS, 0, 0)
    deadline = time.monotonic() + 10
    while not job_id and time.monotonic() < deadline:
        time.sleep(0.1)
        job_id = r.zrange(keys.JOBS, 0, 0)
    cancelled = controller.cli("cancel", job_id[0].decode())
    assert cancelled.returncode == 0, cancelled.stderr
    deadline = time.monotonic() + 5
    while r.hget(keys.job(job_id[0].decode()), "state") != b"cancelled":
        assert time.monotonic() < deadline, controller.logs()
        time.sleep(0.05)
    jobs = controller.cli("jobs", "--json")
    assert json.loads(jobs.stdout)[0]["state"] == "cancelled"


def test_bad_parameters_refused_at_submit(controller: Controller, r: Client) -> None:
    result = controller.cli("submit", "mandelbrot", "--xmin", "2", "--xmax", "1")
    assert result.returncode == 2
    assert "expected xmin < xmax" in result.stderr
    result = controller.cli("submit", "mandelbrot", "--width", "0")
    assert result.returncode == 2 and "width" in result.stderr
    assert r.xlen(keys.COMMANDS) == 0


@pytest.mark.parametrize("service", ["gateway", "scheduler", "aggregator"])
def test_service_health(controller: Controller, service: str) -> None:
    if service == "gateway":
        import httpx

        assert httpx.get(f"{controller.url}/healthz").json()["status"] == "ok"
    else:
        assert controller.cli("healthcheck", "--service", service).returncode == 0


def test_task_that_always_fails_fails_the_job(controller: Controller, tmp_path: Path, r: Client) -> None:
    """A subtask fails its job once two distinct nodes report it failing (`core.failures`;
    one node's word is not enough: see tests/hostile/test_hostile_failures.py)."""
    proc = submit(controller, tmp_path)

    async def failing_node() -> None:
        import websockets

        node = Node(controller.url, controller.join_code)
        accepted = node.join()
        url = controller.url.replace("http", "ws") + f"/ws?token={accepted['token']}"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "ready", "free": 1}))
            while proc.poll() is None:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                except TimeoutError:
                    continue
                if msg["type"] == "task":
                    await ws.send(
                        json.dumps({"type": "task_failed", "task_id": msg["task_id"], "message": "CompileError: boom"})
                    )
                    await ws.send(json.dumps({"type": "ready", "free": 1}))

    async def two_failing_nodes() -> None:
        await asyncio.gather(failing_node(), failing_node())

    run_async(asyncio.wait_for(two_failing_nodes(), 60))
    assert proc.returncode == 1
    log = (tmp_path / "submit.log").read_text()
    assert "failed on 2 distinct nodes" in log and "CompileError: boom" in log, log
    job_id = r.zrange(keys.JOBS, 0, 0)[0].decode()
    assert r.hget(keys.job(job_id), "state") == b"failed"
    assert b"CompileError: boom" in (r.hget(keys.job(job_id), "error") or b"")


def test_silent_node_requeued_within_five_seconds(controller: Controller, tmp_path: Path, r: Client) -> None:
    proc = submit(controller, tmp_path)

    async def scenario() -> float:
        import websockets

        mute = Node(controller.url, controller.join_code, cores=2)
        accepted = mute.join()
        url = controller.url.replace("http", "ws") + f"/ws?token={accepted['token']}"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "ready", "free": 3}))
            got = 0
            while got < 3:
                if json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "task":
                    got += 1
            went_silent = time.monotonic()  # from now on: not a frame, socket left open
            while r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"] > 0:
                await asyncio.sleep(0.05)
                assert time.monotonic() - went_silent < 10, "a silent node kept its tasks"
            requeue_s = time.monotonic() - went_silent
        await run_nodes_until(proc, Node(controller.url, controller.join_code))
        return requeue_s

    requeue_s = run_async(scenario())
    assert requeue_s < 5.0, f"silent node's tasks requeued after {requeue_s:.1f}s"
    assert proc.returncode == 0, controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())


def test_repeat_offender_is_banned_and_its_merged_results_redone(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    """Every other result of this liar is garbage (caught); the rest have one wrong pixel,
    which a spot check of 4 pixels in 1024 rarely sees and so get merged. After its third
    rejection the node is banned, and everything it merged is computed again."""
    proc = submit(controller, tmp_path)
    count = {"n": 0}

    def sly(out: bytes) -> bytes:
        count["n"] += 1
        return bytes(len(out)) if count["n"] % 2 == 0 else flip_first_pixel(out)

    liar = Node(controller.url, controller.join_code, corrupt=sly)

    async def scenario() -> None:
        stop = asyncio.Event()
        liar_task = asyncio.create_task(liar.run(stop=stop))
        while liar.closed_with is None and proc.poll() is None:
            await asyncio.sleep(0.05)
        await run_nodes_until(proc, Node(controller.url, controller.join_code))
        stop.set()
        await liar_task

    run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    assert liar.closed_with == 4004
    assert r.hget(keys.node(liar.device_id), "banned") == b"1"
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    rejoin = httpx.post(
        f"{controller.url}/node-report",
        json={"join_code": controller.join_code, "device_id": liar.device_id, "cores": 1},
    )
    assert rejoin.status_code == 403 and "banned" in rejoin.json()["error"]
