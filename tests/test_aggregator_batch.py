"""The aggregator's batch path (aggregator/batch.py) against a real Redis, in process: many
results claimed, merged and committed together keep the one-result invariants (first
valid result wins, wrong ones are redone, a crash between claim and commit is finished by
the next aggregator, a ban in the same batch takes its node's results back), and the
merged-work maps kept open across results (tasks.base.OpenFiles) give the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from processdistro import client
from processdistro.aggregator.service import Aggregator
from processdistro.scheduler.service import Scheduler
from processdistro.shared import keys
from processdistro.shared.jobs import JobState
from processdistro.shared.modules import ModuleRegistry
from processdistro.shared.queue import TaskFields
from processdistro.shared.service import StopFlag
from processdistro.shared.settings import Settings
from processdistro.shared.store import results as results_store
from processdistro.shared.store.connection import Client
from processdistro.shared.store.jobs import load_job
from processdistro.shared.store.streams import ensure_groups
from processdistro.shared.tasks import plugin_and_params
from processdistro.shared.tasks.base import JobFiles, OpenFiles
from processdistro.shared.tasks.mandelbrot import MandelbrotParams, MandelbrotPlugin

SIZE, TILE = 16, 4  # 16 tiles of 4 x 4 px
RIGHT = np.ones(TILE * TILE, dtype="<u4").tobytes()  # max_iter 1: every pixel escapes at 1
WRONG = np.full(TILE * TILE, 2, dtype="<u4").tobytes()  # more than max_iter: rejected


@pytest.fixture
def sched(r: Client, redis_url: str) -> Scheduler:
    ensure_groups(r)
    return Scheduler(client=r, settings=Settings(redis_url=redis_url), modules=ModuleRegistry())


def start_job(r: Client, sched: Scheduler) -> tuple[str, list[TaskFields]]:
    """A running 16-tile Mandelbrot job (no replication) and its subtasks' task entries."""
    job_id = client.submit(r, "mandelbrot", {"width": SIZE, "height": SIZE, "tile": TILE, "max_iter": 1}, replicate=0)
    sched.handle_commands(block_ms=None)
    sched.feeder.feed()
    job = load_job(r, job_id)
    assert job is not None and job.state is JobState.RUNNING
    plugin, params = plugin_and_params(job_id, job.kind, job.params)
    r.delete(keys.TASKS)  # these tests play the nodes and gateways: they hand results over themselves
    ensure_groups(r)
    return job_id, list(plugin.entries(job, params, 0, job.total))


def hand_over(r: Client, task: TaskFields, node: str, output: bytes = RIGHT, **extra: object) -> None:
    r.xadd(keys.RESULTS, {**task.to_redis(), "node": node, "output": output, "elapsed_ms": 1.0, **extra})


def settle(r: Client, agg: Aggregator, job_id: str, steps: int = 50) -> JobState:
    for _ in range(steps):
        agg.step(StopFlag())
        job = load_job(r, job_id)
        assert job is not None
        if job.state.terminal:
            return job.state
    job = load_job(r, job_id)
    assert job is not None
    return job.state


def stats(r: Client) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.STATS).items()}


def image(data: Path, job_id: str) -> np.ndarray:
    return np.load(data / "jobs" / job_id / MandelbrotPlugin.RAW)


def test_a_batch_merges_each_index_once_and_redoes_wrong_results(r: Client, sched: Scheduler, tmp_path: Path) -> None:
    job_id, tasks = start_job(r, sched)
    hand_over(r, tasks[5], "liar", WRONG)  # first in, wrong: redone, never merged
    for task in tasks:
        hand_over(r, task, "node-a")
    hand_over(r, tasks[3], "node-b")  # a second result for an index in the same batch
    agg = Aggregator(client=r, data_dir=tmp_path)
    assert settle(r, agg, job_id) is JobState.DONE
    counters = stats(r)
    assert counters["tasks_completed"] == 16
    assert counters["tasks_duplicate"] == 1
    assert counters["tasks_rejected"] == 1
    assert r.hget(keys.node("liar"), "rejected") == b"1"
    assert r.hget(keys.node("node-a"), "completed") == b"16"
    assert [TaskFields.from_redis(f).index for _id, f in r.xrange(keys.TASKS)] == [5]  # the redo
    assert r.xlen(keys.RESULTS) == 0 and r.xpending(keys.RESULTS, keys.AGGREGATORS_GROUP)["pending"] == 0
    assert (image(tmp_path, job_id) == 1).all()
    assert int(r.hget(keys.job(job_id), "finalized") or 0) == 1


def test_a_crash_between_claim_and_commit_is_finished_by_the_next_aggregator(
    r: Client, sched: Scheduler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, tasks = start_job(r, sched)
    for task in tasks:
        hand_over(r, task, "node-a")
    dead = Aggregator(client=r, data_dir=tmp_path)
    entries = dead.results.read(block_ms=10, count=100)
    claims = [(TaskFields.from_redis(f).job, TaskFields.from_redis(f).index, eid) for eid, f in entries[:10]]
    assert dead.results.claim_many(claims) == [True] * 10  # then it dies: claimed, nothing committed
    monkeypatch.setattr(results_store, "CLAIM_IDLE_MS", 0)  # no waiting for the dead one's entries to age
    heir = Aggregator(client=r, data_dir=tmp_path)
    heir.results.consumer = "heir"  # another process's consumer (both here share a host and pid)
    assert settle(r, heir, job_id) is JobState.DONE
    assert stats(r)["tasks_completed"] == 16 and "tasks_duplicate" not in stats(r)
    assert (image(tmp_path, job_id) == 1).all()


def test_a_ban_in_the_batch_takes_back_what_its_node_merged_with_it(
    r: Client, sched: Scheduler, tmp_path: Path
) -> None:
    job_id, tasks = start_job(r, sched)
    for task in tasks[:4]:
        hand_over(r, task, "node-x")
    hand_over(r, tasks[0], "node-x", b"", ban=1)  # a gateway's ban entry, after its results
    agg = Aggregator(client=r, data_dir=tmp_path)
    agg.step(StopFlag())
    assert r.hget(keys.node("node-x"), "banned") == b"1"
    assert r.scard(keys.job_done(job_id)) == 0  # merged in the batch, then taken back
    assert sorted(TaskFields.from_redis(f).index for _id, f in r.xrange(keys.TASKS)) == [0, 1, 2, 3]
    for task in tasks:
        hand_over(r, task, "node-a")
    assert settle(r, agg, job_id) is JobState.DONE
    assert (image(tmp_path, job_id) == 1).all()


@pytest.mark.parametrize("kept_open", [False, True], ids=["flushed per merge", "kept open"])
def test_merged_work_is_the_same_with_files_kept_open(tmp_path: Path, kept_open: bool) -> None:
    plugin = MandelbrotPlugin()
    params = MandelbrotParams(width=SIZE, height=SIZE, tile=TILE, max_iter=50)
    open_files = OpenFiles() if kept_open else None
    files = JobFiles.under(tmp_path, "job-1", open_files=open_files)
    for index in range(plugin.count(params)):
        plugin.merge(files, params, index, np.full(TILE * TILE, index, dtype="<u4").tobytes())
    if open_files is not None:
        open_files.close("job-1")
    canvas = np.load(files.path(plugin.PARTIAL))
    expected = np.repeat(np.repeat(np.arange(16, dtype="<u4").reshape(4, 4), TILE, axis=0), TILE, axis=1)
    np.testing.assert_array_equal(canvas, expected)


def test_open_files_keep_at_most_max_jobs_and_let_idle_ones_go(tmp_path: Path) -> None:
    open_files = OpenFiles(max_jobs=2)
    for job in ("a", "b", "c"):
        open_files.memmap(job, tmp_path / f"{job}.npy", (4,), np.uint8)[:] = 7
    assert open_files.jobs() == ["b", "c"]  # the least recently used went, flushed
    assert (np.load(tmp_path / "a.npy") == 7).all()
    open_files.memmap("b", tmp_path / "b.npy", (4,), np.uint8)
    assert open_files.jobs() == ["c", "b"]
    assert set(open_files.idle(now=float("inf"), idle_s=1.0)) == {"b", "c"}
    assert open_files.idle(now=0.0, idle_s=1.0) == []
