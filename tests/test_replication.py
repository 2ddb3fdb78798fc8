"""Replication: a share of subtasks runs on two distinct nodes; a mismatch goes to a quorum.

The liar here returns tiles with one pixel off, which a spot check of a few random pixels
almost always lets through: only a second, independent result catches it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from conftest import Controller
from executors import flip_first_pixel
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_pipeline import expected_small, run_nodes_until, submit


def stats(r: Client) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}


def gained(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def test_a_subtle_liar_is_outvoted_and_the_output_stays_exact(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    before = stats(r)
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "1")  # 20 tiles, every one twice
    liar = Node(controller.url, controller.join_code, cores=1, corrupt=flip_first_pixel)
    honest = [Node(controller.url, controller.join_code, cores=1) for _ in range(2)]

    async def scenario() -> None:
        stop = asyncio.Event()
        runs = [asyncio.create_task(n.run(stop=stop)) for n in honest]
        ids = {n.device_id for n in honest}
        # a result is accepted unconfirmed only when no other node is there
        while len({c.decode().split("~")[0] for c in r.zrange(keys.NODES, 0, -1)} & ids) < 2:
            await asyncio.sleep(0.02)
        runs.append(asyncio.create_task(liar.run(stop=stop)))
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*runs)

    run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    after = stats(r)
    assert liar.done >= 1 and int(r.hget(keys.node(liar.device_id), "rejected") or 0) >= 1
    assert gained(before, after, "replicas_disputed") >= 1, after
    assert gained(before, after, "replicas_confirmed") >= 15, after  # two honest results agreed
    # every tile the liar computed and nobody else had the chance to check was redone
    assert int(r.hget(keys.node(liar.device_id), "completed") or 0) == 0


def test_one_node_alone_still_finishes_a_replicated_job(controller: Controller, tmp_path: Path, r: Client) -> None:
    before = stats(r)
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "1")
    run_async(run_nodes_until(proc, Node(controller.url, controller.join_code), timeout=60))
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    assert gained(before, stats(r), "replicas_unconfirmed") >= 20 - 1


def test_replicate_share_is_checked_at_submit(controller: Controller, tmp_path: Path) -> None:
    result = controller.cli("submit", "mandelbrot", "--replicate", "1.5")
    assert result.returncode != 0 and "expected a number from 0 to 1" in result.stderr


def test_copies_parked_for_a_node_that_leaves_are_not_lost(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Every tile replicated on a fast and a slow node: the fast one parks the second copies
    for the slow one; when the slow one leaves, they come back and the job still finishes."""
    before = stats(r)
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "1")
    fast = Node(controller.url, controller.join_code, cores=1)
    slow = Node(controller.url, controller.join_code, cores=1, delay=1.0)

    async def scenario() -> int:
        stop_all, stop_slow = asyncio.Event(), asyncio.Event()
        runs = [asyncio.create_task(fast.run(stop=stop_all)), asyncio.create_task(slow.run(stop=stop_slow))]
        deadline = time.monotonic() + 60
        while not r.scard(keys.PARKED) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        parked = int(r.scard(keys.PARKED))
        stop_slow.set()  # the only node that may confirm the parked copies leaves
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop_all.set()
        await asyncio.gather(*runs)
        return parked

    parked = run_async(scenario())
    assert parked >= 1
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    assert gained(before, stats(r), "replicas_unconfirmed") >= 1
    assert r.scard(keys.PARKED) == 0


def test_no_node_runs_both_copies_while_the_aggregator_lags(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Thousands of tiny replicated tiles: the nodes outrun the aggregator, so a node's vote
    is recorded seconds after it returned the copy. The gateway's own record of who returned
    what still keeps the second copy off that node (it used to run it again, and the
    confirmation went to the stream's end)."""
    proc = submit(controller, tmp_path, "--width", "400", "--height", "400", "--tile", "8", "--replicate", "1")
    nodes = [Node(controller.url, controller.join_code, cores=2) for _ in range(2)]
    run_async(run_nodes_until(proc, *nodes, timeout=120))
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    for node in nodes:
        inputs = [m["input_b64"] for m in node.received if m["type"] == "task"]
        assert len(inputs) > 100  # both nodes did a share
        assert len(set(inputs)) == len(inputs), f"node ran {len(inputs) - len(set(inputs))} subtasks twice"


def test_a_rejected_copy_does_not_count_as_a_vote(controller: Controller, tmp_path: Path, r: Client) -> None:
    """Every tile replicated; a liar the cheap check always catches. Its rejected copies make
    it a node that returned the tile but not a voter: the remaining copy is not left waiting
    for a tie-breaker that can never come, and the job finishes exactly."""
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "1")
    liar = Node(controller.url, controller.join_code, corrupt=lambda out: flip_first_pixel(out[::-1]))
    honest = Node(controller.url, controller.join_code)
    run_async(run_nodes_until(proc, liar, honest, timeout=60))
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    assert liar.closed_with == 4004 and int(r.hget(keys.node(liar.device_id), "completed") or 0) == 0


def test_a_dispute_with_no_node_left_to_ask_is_settled_by_the_controller(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    """Two nodes, one a subtle liar, every tile replicated: a tie has no third node to break
    it, so the controller computes those tiles itself instead of waiting for ever."""
    before = stats(r)
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "1")
    liar = Node(controller.url, controller.join_code, cores=1, corrupt=flip_first_pixel)
    honest = Node(controller.url, controller.join_code, cores=1)
    run_async(run_nodes_until(proc, liar, honest, timeout=150))
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    after = stats(r)
    assert gained(before, after, "replicas_resolved") >= 1, after
    assert int(r.hget(keys.node(liar.device_id), "rejected") or 0) >= 1
