"""Chaos, bounded: random kill -9 of services and nodes while a mix of jobs runs. Every
output must be exact, every job finalized once, no subtask lost and none merged twice."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import random
import time
from pathlib import Path

import numpy as np
from conftest import Controller
from mandel_ref import reference_counts
from nodes import Node, run_async
from processdistro import client
from processdistro.shared import keys
from processdistro.shared.jobs import JobState
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job

CHAOS_S = 40  # how long the killing goes on (jobs are sized to outlast it)
SERVICES = ["gateway", "scheduler", "aggregator", "aggregator-2"]


def test_chaos(controller: Controller, tmp_path: Path, r: Client) -> None:
    controller.start("aggregator-2", "aggregator")
    rnd = random.Random(2026)
    jobs = {
        "m1": client.submit(r, "mandelbrot", {"width": 320, "height": 240, "tile": 8, "max_iter": 300}),
        "m2": client.submit(r, "mandelbrot", {"width": 200, "height": 200, "tile": 8, "max_iter": 200}, priority=1),
    }
    rows = [(f"pw{i}é", f"salt{i % 13}") for i in range(300)]
    with open(tmp_path / "rows.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["password", "salt"])
        w.writerows(rows)
    jobs["h"] = client.submit(r, "hash", {"input": str(tmp_path / "rows.csv"), "iterations": 200, "batch": 5})
    kills: list[str] = []

    def all_over() -> bool:
        return all((j := load_job(r, job_id)) is not None and j.state.terminal for job_id in jobs.values())

    async def scenario() -> None:
        stop = asyncio.Event()
        nodes: list[tuple[Node, asyncio.Task[None]]] = []

        def add_node() -> None:
            node = Node(controller.url, controller.join_code, delay=rnd.uniform(0.03, 0.07))
            nodes.append((node, asyncio.create_task(node.run_reconnecting(stop))))

        for _ in range(3):
            add_node()
        started = time.monotonic()
        try:
            while time.monotonic() - started < CHAOS_S and not all_over():
                await asyncio.sleep(rnd.uniform(0.5, 2.0))
                if rnd.random() < 0.6:
                    victim = rnd.choice(SERVICES)
                    controller.kill(victim)
                    kills.append(victim)
                    await asyncio.sleep(rnd.uniform(0.0, 0.5))
                    controller.start(victim, "aggregator" if victim.startswith("aggregator") else victim)
                else:
                    # a node vanishes mid-task (its socket dies with it) and a new one joins
                    i = rnd.randrange(len(nodes))
                    nodes.pop(i)[1].cancel()
                    kills.append("node")
                    add_node()
            deadline = time.monotonic() + 120
            while not all_over() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            for _, task in nodes:
                task.cancel()
            await asyncio.gather(*(t for _, t in nodes), return_exceptions=True)

    run_async(scenario())
    assert len(kills) >= 5, f"too little chaos: {kills}"
    for name, job_id in jobs.items():
        job = load_job(r, job_id)
        assert job is not None and job.state is JobState.DONE, f"{name}: {job}\n{controller.logs()}"
        assert job.finalized == 1, f"{name} finalized {job.finalized} times"
        assert r.scard(keys.job_done(job_id)) == job.total == job.done, f"{name}: lost or doubled subtasks"
    np.testing.assert_array_equal(
        np.load(load_job(r, jobs["m1"]).outputs["raw"]), reference_counts(320, 240, -2.0, 1.0, -1.5, 1.5, 300)
    )
    np.testing.assert_array_equal(
        np.load(load_job(r, jobs["m2"]).outputs["raw"]), reference_counts(200, 200, -2.0, 1.0, -1.5, 1.5, 200)
    )
    with open(load_job(r, jobs["h"]).outputs["csv"], encoding="utf-8", newline="") as fh:
        got = [row["dk_hex"] for row in csv.DictReader(fh)]
    assert got == [hashlib.pbkdf2_hmac("sha256", p.encode(), s.encode(), 200, 32).hex() for p, s in rows]
    merged = int(r.hget(keys.STATS, "tasks_completed") or 0)
    assert merged == sum(load_job(r, j).total for j in jobs.values()), "a subtask was merged twice"  # type: ignore[union-attr]
    duplicates = int(r.hget(keys.STATS, "tasks_duplicate") or 0)
    print(f"\nchaos: {len(kills)} kills ({', '.join(kills)}); duplicates discarded: {duplicates}")
