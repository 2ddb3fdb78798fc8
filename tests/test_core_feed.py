"""The feeding decisions (shared/core/feed.py): the backlog target, and how the room is
shared by jobs. No Redis, no processes."""

from __future__ import annotations

import math

import pytest
from processdistro.shared.capacity import NodeView
from processdistro.shared.core.feed import (
    BUSY_WAIT_MS,
    IDLE_WAIT_MS,
    MAX_DRAIN_BACKLOG,
    MIN_BACKLOG,
    Batch,
    FeedJob,
    backlog_target,
    command_wait_ms,
    drain_rate,
    plan,
)


def job(job_id: str, left: int, *, priority: int = 0, queued: bool = False, done: int = 0) -> FeedJob:
    """A job with `left` subtasks not fed yet (after `done` fed ones)."""
    return FeedJob(job_id, priority, queued, done, done + left)


CASES = [
    ("no room", [job("a", 10)], 0, 256, []),
    ("one job: as much as there is room", [job("a", 100)], 10, 256, [Batch("a", 0, 10)]),
    ("one job: no more than it has", [job("a", 3, done=7)], 10, 256, [Batch("a", 7, 3)]),
    ("a queued job starts with its first batch", [job("a", 5, queued=True)], 10, 256, [Batch("a", 0, 5, True)]),
    ("equal jobs share evenly", [job("a", 100), job("b", 100)], 10, 256, [Batch("a", 0, 5), Batch("b", 0, 5)]),
    (
        "an odd room: the first job's share rounds up, the last gets the rest",
        [job("a", 100), job("b", 100)],
        11,
        256,
        [Batch("a", 0, 6), Batch("b", 0, 5)],
    ),
    (
        "a job running out leaves its share to the others in the next round",
        [job("a", 2), job("b", 100)],
        10,
        256,
        [Batch("a", 0, 2), Batch("b", 0, 5), Batch("b", 5, 3)],
    ),
    (
        "higher priority first",
        [job("urgent", 100, priority=5), job("a", 100), job("b", 100)],
        10,
        256,
        [Batch("urgent", 0, 10)],
    ),
    (
        "lower priority gets what the higher leaves",
        [job("urgent", 4, priority=5), job("a", 100), job("b", 100)],
        10,
        256,
        [Batch("urgent", 0, 4), Batch("a", 0, 3), Batch("b", 0, 3)],
    ),
    (
        "batches of at most batch_max",
        [job("a", 1000)],
        600,
        256,
        [Batch("a", 0, 256), Batch("a", 256, 256), Batch("a", 512, 88)],
    ),
    (
        "a queued job with nothing left still starts",
        [job("a", 0, queued=True), job("b", 5)],
        10,
        256,
        [Batch("a", 0, 0, True), Batch("b", 0, 5)],
    ),
    (
        "a queued job met when the room ran out starts, empty",
        [job("a", 5, queued=True), job("b", 5, queued=True)],
        1,
        256,
        [Batch("a", 0, 1, True), Batch("b", 0, 0, True)],
    ),
    ("a running job with nothing left is not fed", [job("a", 0, done=9), job("b", 5)], 10, 256, [Batch("b", 0, 5)]),
]


@pytest.mark.parametrize(("jobs", "room", "batch_max", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(jobs: list[FeedJob], room: int, batch_max: int, expected: list[Batch]) -> None:
    assert plan(jobs, room, batch_max=batch_max) == expected


def test_equal_jobs_get_equal_shares_every_turn() -> None:
    """Fed turn after turn, equal jobs get the same share but for rounding (each share is
    the room over the jobs, rounded up; the last in line gets what is left)."""
    jobs = [job(name, 10_000) for name in "abc"]
    for _ in range(20):
        fed = {j.job_id: 0 for j in jobs}
        for b in plan(jobs, 97):
            fed[b.job_id] += b.count
        assert sum(fed.values()) == 97 and max(fed.values()) - min(fed.values()) < len(jobs)
        jobs = [FeedJob(j.job_id, 0, False, j.next_index + fed[j.job_id], j.total) for j in jobs]


def node(slots: int, **ewma: float) -> NodeView:
    return NodeView("n", "n~1", slots, ewma_ms=dict(ewma))


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([], MIN_BACKLOG),
        ([node(4), node(4)], MIN_BACKLOG),  # 4 x 8 slots is less than the floor
        ([node(8), node(12)], 80),  # four tasks per slot
        ([node(2, hash=100.0)], 4 * 2 * 32),  # 40 parts fit 4 s: capped at MAX_PARTS
        ([node(2, hash=500.0)], 4 * 2 * 8),  # 8 parts of 0.5 s per task
        ([node(2, mandelbrot=1.0)], MIN_BACKLOG),  # whole tasks: one per slot
    ],
    ids=["no nodes", "floor", "slots", "parts capped", "parts", "not adaptive"],
)
def test_backlog_target(nodes: list[NodeView], expected: int) -> None:
    assert backlog_target(nodes, frozenset({"hash", "crack"}), 4.0) == expected


@pytest.mark.parametrize(
    ("nodes", "drain_per_s", "expected"),
    [
        ([node(2)], 0.0, MIN_BACKLOG),
        ([node(2)], 300.0, MIN_BACKLOG),  # 30 entries in 0.1 s: under the floor
        ([node(2)], 5000.0, 500),  # 0.1 s of 5,000 subtasks/s
        ([node(2)], 5000.5, 501),  # rounded up
        ([node(40)], 1000.0, 160),  # the slots ask for more than the drain
        ([node(2)], 1e9, MAX_DRAIN_BACKLOG),  # capped: a longer queue only delays the tail
        ([node(2)], -50.0, MIN_BACKLOG),  # a negative rate (requeues) counts as none
    ],
    ids=["no drain", "slow drain", "fast drain", "rounded up", "slots win", "capped", "negative"],
)
def test_backlog_target_holds_what_the_nodes_take_in_a_tenth_of_a_second(
    nodes: list[NodeView], drain_per_s: float, expected: int
) -> None:
    assert backlog_target(nodes, frozenset(), 4.0, drain_per_s) == expected


@pytest.mark.parametrize(
    ("previous", "taken", "elapsed_s", "expected"),
    [
        (0.0, 100, 0.1, 1000.0 * (1 - math.exp(-1 / 3))),  # first sample: 1,000/s weighted ~0.28
        (1000.0, 100, 0.1, 1000.0),  # steady
        (1000.0, 0, 0.05, 1000.0 * math.exp(-1 / 6)),  # nothing taken: the rate decays
        (1000.0, -20, 0.1, 1000.0),  # entries came back (requeued): no sample
        (1000.0, 50, 0.0, 1000.0),  # no time passed: no sample
        (500.0, 32, 0.001, 500.0 + (32_000.0 - 500.0) * (1 - math.exp(-0.001 / 0.3))),  # ~605/s, not 10,000
        (1000.0, 0, 3.0, 1000.0 * math.exp(-10)),  # a long quiet turn: the rate is forgotten
    ],
    ids=["first", "steady", "idle", "requeued", "no time", "a bundled burst weighs little", "long quiet"],
)
def test_drain_rate(previous: float, taken: int, elapsed_s: float, expected: float) -> None:
    assert drain_rate(previous, taken, elapsed_s) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fed", "unfed", "backlog", "drain_per_s", "expected"),
    [
        (10, True, 64, 1000.0, None),  # just fed: go round again at once
        (10, False, 64, 1000.0, None),
        (0, False, 64, 1000.0, IDLE_WAIT_MS),  # nothing to feed: wait for a command
        (0, True, 64, 1000.0, 32),  # 64 entries last 64 ms: look again at half of it
        (0, True, 500, 5000.0, 50),  # 100 ms of work queued: capped at the idle wait
        (0, True, 64, 100_000.0, BUSY_WAIT_MS),  # drains in under a millisecond: the floor
        (0, True, 64, 0.0, IDLE_WAIT_MS),  # nobody takes anything: no hurry
        (0, True, 0, 0.0, BUSY_WAIT_MS),  # an empty backlog with work left: soon
    ],
    ids=["fed, more left", "fed the last", "idle", "half the backlog", "capped", "floor", "no takers", "empty"],
)
def test_command_wait(fed: int, unfed: bool, backlog: int, drain_per_s: float, expected: int | None) -> None:
    assert command_wait_ms(fed=fed, unfed=unfed, backlog=backlog, drain_per_s=drain_per_s) == expected


def test_a_busy_wait_is_shorter_than_an_idle_one() -> None:
    assert 0 < BUSY_WAIT_MS < IDLE_WAIT_MS


def test_backlog_target_counts_only_nodes_that_take_work() -> None:
    """2,000 connected nodes that never asked for work (bench/simnodes.py) would make the
    backlog 8,000 entries deep, and a later job of higher priority wait behind it."""
    mute = [NodeView(f"m{i}", f"m{i}~1", 1, ready=False) for i in range(2000)]
    working = [NodeView("w", "w~1", 2)]
    assert backlog_target(mute + working, frozenset(), 4.0) == backlog_target(working, frozenset(), 4.0) == MIN_BACKLOG
