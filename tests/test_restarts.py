"""kill -9 of any service mid-job loses nothing: restarted, every output is still exact."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Controller
from mandel_ref import reference_counts
from nodes import Node, run_async
from processdistro.shared import keys
from processdistro.shared.store.connection import Client
from test_pipeline import submit

# enough subtasks that a kill lands mid-job: 300x200 in 16 px tiles = 19 x 13 = 247
ARGS = ("--tile", "16")


def wait_done(r: Client, at_least: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = r.zrange(keys.JOBS, 0, 0)
        if ids and int(r.hget(keys.job(ids[0].decode()), "done") or 0) >= at_least:
            return ids[0].decode()
        time.sleep(0.01)
    raise AssertionError("job made no progress")


def run_with_kills(ctl: Controller, tmp: Path, r: Client, victims: list[str]) -> None:
    proc = submit(ctl, tmp, *ARGS)

    killed_at: list[int] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        nodes = [Node(ctl.url, ctl.join_code) for _ in range(2)]
        tasks = [asyncio.create_task(n.run_reconnecting(stop)) for n in nodes]
        try:
            for i, victim in enumerate(victims):
                job_id = await asyncio.to_thread(wait_done, r, 30 + 40 * i)
                ctl.kill(victim)
                killed_at.append(int(r.hget(keys.job(job_id), "done") or 0))
                await asyncio.sleep(0.3)
                ctl.start(victim)
            deadline = time.monotonic() + 90
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    run_async(scenario())
    assert proc.returncode == 0, (tmp / "submit.log").read_text() + ctl.logs()
    np.testing.assert_array_equal(np.load(tmp / "m.npy"), reference_counts(300, 200, -2.0, 1.0, -1.5, 1.5, 200))
    job_id = r.zrange(keys.JOBS, 0, 0)[0].decode()
    assert r.hget(keys.job(job_id), "finalized") == b"1"
    assert r.scard(keys.job_done(job_id)) == 247
    assert len(killed_at) == len(victims) and all(k < 247 for k in killed_at), f"kills not mid-job: {killed_at}"


@pytest.mark.parametrize("victim", ["scheduler", "aggregator", "gateway"])
def test_kill_one_service_mid_job(controller: Controller, tmp_path: Path, r: Client, victim: str) -> None:
    run_with_kills(controller, tmp_path, r, [victim])


def test_kill_all_three_in_a_row(controller: Controller, tmp_path: Path, r: Client) -> None:
    run_with_kills(controller, tmp_path, r, ["scheduler", "aggregator", "gateway"])
