"""Feeding: how many undelivered task entries to keep, and how the room is shared by jobs.

The scheduler keeps the undelivered backlog of the task stream near `backlog_target`:
enough for every live slot to take a few tasks, and for what the nodes take in `REFILL_S`
(`drain_rate`: small tasks go fast, and a backlog that lasts less than one turn of the
scheduler's loop leaves nodes waiting). It tops the backlog up from the active jobs,
higher priority first; jobs of equal priority share the room evenly (rounds of equal
shares, at most `FEED_BATCH` each), so they progress at similar rates. Between turns it
waits for commands (`command_wait_ms`): not at all after feeding, while work is left to
feed about half the time the backlog lasts, longer when there is none.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..capacity import NodeView, parts_per_task

MIN_BACKLOG = 64
FEED_BATCH = 256
#: the backlog also holds what the nodes take in this long (at their recent rate) ...
REFILL_S = 0.1
#: ... up to this many entries (a longer queue only delays stealing in the tail)
MAX_DRAIN_BACKLOG = 2048
#: the least the scheduler waits for a command when it fed nothing but work is left to feed
BUSY_WAIT_MS = 5
#: ... and when no job has anything left to feed
IDLE_WAIT_MS = 50
#: the drain rate's moving average forgets with this time constant: a sample weighs by the time
#: it covers (a burst of a node taking 32 bundled parts between two turns a millisecond apart
#: is not a rate of 32,000/s: weighted 0.3 per sample, it filled the backlog with seconds of
#: work, and a job of higher priority submitted then waited behind it)
DRAIN_TAU_S = 0.3


@dataclass(frozen=True)
class FeedJob:
    """An active job as feeding sees it (in `keys.ACTIVE_JOBS` order: priority, then age)."""

    job_id: str
    priority: int
    queued: bool  #: still `queued` (nothing fed yet); else `running`
    next_index: int  #: the first subtask not fed yet
    total: int


@dataclass(frozen=True)
class Batch:
    """Feed subtasks `start .. start + count - 1` of a job; `starts_job`: the job moves
    `queued -> running` with this batch (its first, which may be empty)."""

    job_id: str
    start: int
    count: int
    starts_job: bool = False


def backlog_target(
    nodes: Iterable[NodeView], adaptive: frozenset[str], target_task_s: float, drain_per_s: float = 0.0
) -> int:
    """Enough undelivered entries for every slot of a node that takes work (`NodeView.ready`:
    connected nodes that never ask would only make the queue a later job of higher priority
    waits behind longer) to take a few tasks, at the parts per task a node gets for the
    adaptive kinds (hash, crack), and for what the nodes take in `REFILL_S` at `drain_per_s`
    entries per second (at most `MAX_DRAIN_BACKLOG`)."""
    room = 0
    for node in (n for n in nodes if n.ready):
        parts = [parts_per_task(ms, target_task_s) for k, ms in node.ewma_ms.items() if k in adaptive]
        room += node.slots * max([1, *parts])
    drain = min(MAX_DRAIN_BACKLOG, math.ceil(max(0.0, drain_per_s) * REFILL_S))
    return max(MIN_BACKLOG, 4 * room, drain)


def drain_rate(previous: float, taken: int, elapsed_s: float, *, tau_s: float = DRAIN_TAU_S) -> float:
    """The nodes' take from the backlog, entries per second, as a moving average over time:
    `taken` entries left the backlog in the `elapsed_s` since the last sample, which weighs
    `1 - exp(-elapsed_s / tau_s)` (about 0.28 for a tenth of a second, 0.003 for a
    millisecond). A sample over no time (or a negative take: entries requeued) leaves the
    average as it was."""
    if elapsed_s <= 0 or taken < 0:
        return previous
    weight = 1 - math.exp(-elapsed_s / tau_s)
    return (1 - weight) * previous + weight * (taken / elapsed_s)


def command_wait_ms(*, fed: int, unfed: bool, backlog: int = 0, drain_per_s: float = 0.0) -> int | None:
    """How long the scheduler's next turn waits for a command: not at all (None) right
    after feeding (the nodes may be draining fast); while a job has subtasks left to feed
    (the backlog was full), half the time the `backlog` lasts at the nodes' `drain_per_s`,
    within [`BUSY_WAIT_MS`, `IDLE_WAIT_MS`] (a fixed 50 ms wait let a backlog of 64 run dry
    at a thousand subtasks a second; a fixed short one spins when the nodes are slow);
    with nothing left to feed, `IDLE_WAIT_MS`."""
    if fed > 0:
        return None
    if not unfed:
        return IDLE_WAIT_MS
    if drain_per_s <= 0:
        return IDLE_WAIT_MS if backlog > 0 else BUSY_WAIT_MS
    lasts_ms = 1000 * max(0, backlog) / drain_per_s
    return int(min(IDLE_WAIT_MS, max(BUSY_WAIT_MS, lasts_ms / 2)))


def plan(jobs: Sequence[FeedJob], room: int, *, batch_max: int = FEED_BATCH) -> list[Batch]:
    """The batches that fill `room` undelivered entries from `jobs` (queued or running,
    in `keys.ACTIVE_JOBS` order). Higher priority first; equal priority in rounds of even
    shares, so equal jobs progress at similar rates."""
    if room <= 0:
        return []
    out: list[Batch] = []
    for _priority, group in itertools.groupby(jobs, key=lambda j: j.priority):
        hungry = [_Cursor(j, j.next_index, j.queued) for j in group if j.next_index < j.total or j.queued]
        while room > 0 and hungry:
            share = max(1, -(-room // len(hungry)))
            still = []
            for c in hungry:
                n = max(0, min(share, room, batch_max, c.job.total - c.next_index))
                if n or c.queued:
                    out.append(Batch(c.job.job_id, c.next_index, n, starts_job=c.queued))
                room -= n
                c.next_index += n
                c.queued = False
                if c.next_index < c.job.total and n > 0:
                    still.append(c)
            hungry = still
        if room <= 0:
            break
    return out


@dataclass
class _Cursor:
    """A job's progress through the rounds of one plan."""

    job: FeedJob
    next_index: int
    queued: bool
