"""A node that is connected but never says `ready` (a monitor, a stuck agent, the simulated
nodes of bench/simnodes.py) is neither a taker nor a voter (`core.replication.said_ready`):
the replicated copies of a job do not wait `PARKED_WAIT_S` for it to confirm them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import websockets
from conftest import Controller
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.core.replication import PARKED_WAIT_S
from processdistro.shared.store.connection import Client
from test_pipeline import expected_small, submit


class SilentNode(Node):
    """Joins, says `hello` and beats its heartbeat, and never asks for work."""

    async def hold(self, url: str, stop: asyncio.Event) -> None:
        accepted = self.join()
        async with websockets.connect(url.replace("http", "ws") + f"/ws?token={accepted['token']}") as ws:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert welcome["type"] == "welcome", welcome
            await ws.send(json.dumps({"type": "hello", "running": []}))
            every = float(welcome.get("heartbeat_interval_s") or 1.0)
            while not stop.is_set():
                await ws.send(json.dumps({"type": "heartbeat", "running": 0, "done": 0}))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)


def test_a_node_that_never_says_ready_holds_up_no_replicated_copy(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    before = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    proc = submit(controller, tmp_path, "--tile", "64", "--replicate", "1")  # 20 tiles, every one twice
    silent = SilentNode(controller.url, controller.join_code)
    worker = Node(controller.url, controller.join_code)

    async def scenario() -> float:
        stop = asyncio.Event()
        held = asyncio.create_task(silent.hold(controller.url, stop))
        # the silent node is live (its connection scored in keys.NODES) before any work runs
        deadline = time.monotonic() + 30
        while not any(c.decode().startswith(silent.device_id) for c in r.zrange(keys.NODES, 0, -1)):
            assert time.monotonic() < deadline, "the silent node never connected"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        run = asyncio.create_task(worker.run(stop=stop))
        while proc.poll() is None and time.monotonic() - started < 3 * PARKED_WAIT_S:
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        stop.set()
        await asyncio.gather(run, held)
        return elapsed

    elapsed = run_async(scenario())
    assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected_small())
    # the second copies waited for nobody: one replicated copy parked for the silent node
    # would have held the job PARKED_WAIT_S (20 s)
    assert elapsed < PARKED_WAIT_S / 2, f"took {elapsed:.1f}s: copies waited for the silent node"
    after = {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}
    assert after.get("replicas_unconfirmed", 0) - before.get("replicas_unconfirmed", 0) >= 19, after
    assert after.get("tasks_backup", 0) == before.get("tasks_backup", 0), "a backup was made for the silent node"
    assert r.scard(keys.PARKED) == 0
