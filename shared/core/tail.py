"""The tail of the work: which queued tasks to steal and which running ones to back up.

Called once nothing undelivered is left in the task stream. Takes plain values (live node
views, their held counts, pending task entries with their ages and kinds, settings) and
returns instructions; `scheduler/tail.py` reads the inputs and carries the instructions out.

1. Stealing: a node holding more tasks than it has slots has not started the extra ones
   (prefetch); if an idle node is not much slower for that kind (`STEAL_FACTOR`), or a busy
   one with prefetch room is at least twice as fast (`BUSY_STEAL_FACTOR`: never between
   nodes of like speed, which would pass tasks back and forth), the holder gives them back
   (`Steal`). For an adaptive kind (parts of one long task) the takers get a share by speed.
2. Backups: a task still running on a node clearly slower than one with room
   (`BACKUP_SPEEDUP`), or out far longer than tasks usually take (`BACKUP_FACTOR` typical
   task times, at least `BACKUP_STUCK_MIN_MS`), gets a copy for a node with room (`Backup`);
   the first valid result wins.

Takers (idle nodes, nodes with room) are only nodes whose connection has said `ready`
(`NodeView.ready`): a connected node that never asks for work would take nothing. A
holder's `held` counts task entries, i.e. parts (a task may carry several: docs/protocol.md),
so what it has queued is weighed by time: queued parts that it runs within `STEAL_MIN_MS`
(trivial parts bundled by the gateway) are not worth a round trip of `Steal`, cancel and
requeue, and are left where they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..capacity import MAX_TASK_MS, NodeView, finite, worth_moving
from ..keys import PARKED_CONSUMER
from ..queue import node_of_consumer

STEAL_FACTOR = 1.5  # steal a queued task for an idle node up to this many times slower per task
BUSY_STEAL_FACTOR = 0.5  # ... and for a busy node with prefetch room at least twice as fast
BACKUP_MIN_MS = 250  # never back up a task out for less than this
BACKUP_SPEEDUP = 0.67  # back up a running task for an idle node at least this much faster per task ...
BACKUP_STUCK_MIN_MS = 1500  # ... or one out for longer than this and than
BACKUP_FACTOR = 3.0  # this many typical task times (a node that stalled)
TYPICAL_MS_UNKNOWN = 1000.0  # the typical task time before any latency was recorded
STEAL_MIN_MS = 100.0  # never steal queued work that its holder runs within this long


@dataclass(frozen=True)
class Steal:
    """Ask the gateway of `consumer` to give back up to `count` unstarted tasks."""

    consumer: str
    count: int


@dataclass(frozen=True)
class Backup:
    """Queue a copy of task entry `entry_id`, marked as a backup of node `backup_of`."""

    entry_id: str
    backup_of: str


Instruction = Steal | Backup


@dataclass(frozen=True)
class Pending:
    """A task entry some consumer holds (in the stream's pending entries list)."""

    entry_id: str
    consumer: str
    out_ms: int  #: time since it was delivered
    kind: str = ""  #: its task kind; "" when unknown (the entry is gone)


@dataclass(frozen=True)
class TailSettings:
    prefetch: int
    stealing: bool
    backups: bool
    target_task_s: float
    adaptive: frozenset[str]  #: the kinds whose subtasks are parts of a node's task


def typical_ms(latencies_ms: Iterable[float]) -> float:
    """The median of recent task round trips (a time that is not finite, one stored before
    reports were validated, is left out; a huge one is capped)."""
    ordered = sorted(ms for x in latencies_ms if (ms := finite(x, MAX_TASK_MS)) is not None)
    return ordered[len(ordered) // 2] if ordered else TYPICAL_MS_UNKNOWN


def running(pending: Sequence[Pending], nodes: dict[str, NodeView]) -> list[Pending]:
    """The entries that may be running now: a node runs its oldest entries (in stream order)
    first, so only each consumer's first `slots` (1 for an unknown node); the parked consumer
    runs nothing. `pending` in stream order; `nodes` by node id."""
    out: list[Pending] = []
    per_consumer: dict[str, int] = {}
    for p in pending:
        if p.consumer == PARKED_CONSUMER:
            continue  # waiting for a particular node, not running
        per_consumer[p.consumer] = per_consumer.get(p.consumer, 0) + 1
        node = nodes.get(node_of_consumer(p.consumer))
        if per_consumer[p.consumer] <= (node.slots if node else 1):
            out.append(p)
    return out


def backup_candidates(pending: Sequence[Pending], nodes: dict[str, NodeView]) -> list[Pending]:
    """Running entries out long enough to be backed up, longest out first: the ones whose
    kinds and backup markers `plan` needs."""
    return [p for p in sorted(running(pending, nodes), key=lambda p: -p.out_ms) if p.out_ms >= BACKUP_MIN_MS]


def any_room(nodes: Iterable[NodeView], held: dict[str, int], prefetch: int) -> bool:
    """Could `plan` do anything: some task is held, and some node has room for one more?"""
    return bool(held) and any(n.ready and held.get(n.consumer, 0) < n.slots + prefetch for n in nodes)


def plan(
    nodes: Sequence[NodeView],
    held: dict[str, int],
    newest_kind: dict[str, str],
    candidates: Sequence[Pending],
    backed_up: frozenset[str] | set[str],
    latencies_ms: Iterable[float],
    settings: TailSettings,
) -> list[Instruction]:
    """What to steal and back up now.

    `nodes`: the live nodes (in node id order); `held`: pending count per consumer (every
    consumer of the task group); `newest_kind`: the kind of the newest entry each consumer
    holds; `candidates`: `backup_candidates` with their kinds; `backed_up`: the entry ids
    that have a backup copy already; `latencies_ms`: recent task round trips.
    """
    views = [dataclasses.replace(n, held=held.get(n.consumer, 0)) for n in nodes]
    # stealing feeds nodes that ran out of work; a backup may also wait in the prefetch
    # queue of a node much faster than the holder (behind the task it just stole)
    idle = [n for n in views if n.ready and n.held < n.slots]
    idle_slots = sum(n.slots - n.held for n in idle)
    room = [n for n in views if n.ready and n.held < n.slots + settings.prefetch]
    if not room or not held:
        return []
    # a busy node with prefetch room, much faster than a holder, may queue its task: it
    # starts sooner there (never between nodes of like speed, which would ping-pong)
    busy = [n for n in room if n.held >= n.slots]
    busy_slots = sum(n.slots + settings.prefetch - n.held for n in busy)
    out: list[Instruction] = []
    stolen = 0
    for holder in sorted(views, key=lambda n: -n.held):
        queued = holder.held - holder.slots
        if queued <= 0 or not settings.stealing or idle_slots + busy_slots <= 0:
            continue
        kind = newest_kind.get(holder.consumer, "")
        if not kind or not worth_stealing(holder, queued, kind, views):
            continue
        if idle_slots > 0 and worth_moving(holder, idle, kind, STEAL_FACTOR, views):
            takers, free = idle, idle_slots
        elif busy_slots > 0 and worth_moving(holder, busy, kind, BUSY_STEAL_FACTOR, views):
            takers, free = busy, busy_slots
        else:
            continue
        if kind in settings.adaptive:
            # parts of one long task: the takers get their share by speed
            mine = holder.task_ms(kind, views) or 1.0
            theirs = [t for i in takers if (t := i.task_ms(kind, views)) is not None]
            share = _share(mine, min(theirs)) if theirs else 0.5
            n, used = min(queued, max(1, round(queued * share))), 1
        else:
            n = used = min(queued, free)
        if takers is idle:
            idle_slots -= used
        else:
            busy_slots -= used
        out.append(Steal(holder.consumer, n))
        stolen += n
    if settings.backups:
        backup_slots = sum(n.slots + settings.prefetch - n.held for n in room) - stolen
        out.extend(_backups(views, room, backup_slots, candidates, backed_up, typical_ms(latencies_ms), settings))
    return out


def worth_stealing(holder: NodeView, queued: int, kind: str, views: Sequence[NodeView]) -> bool:
    """Does the holder's queued work last long enough to move: `queued` entries (parts) at
    its time per part of `kind`, at least `STEAL_MIN_MS`? Unknown speed: `worth_moving` decides."""
    ms = holder.task_ms(kind, views)
    return ms is None or queued * ms >= STEAL_MIN_MS


def _share(mine: float, theirs: float) -> float:
    """The takers' share of a holder's queued parts, by speed: in [0, 1] whatever the task
    times are (an infinite or NaN one, as Redis may still hold, would make `round` raise)."""
    share = mine / (mine + theirs) if mine + theirs > 0 else 0.5
    return share if math.isfinite(share) else 0.5


def _backups(
    views: list[NodeView],
    room: list[NodeView],
    slots: int,
    candidates: Sequence[Pending],
    backed_up: frozenset[str] | set[str],
    typical: float,
    settings: TailSettings,
) -> list[Backup]:
    if slots <= 0:
        return []
    by_id = {n.node_id: n for n in views}
    stuck_ms = max(BACKUP_STUCK_MIN_MS, BACKUP_FACTOR * typical)
    out: list[Backup] = []
    for p in candidates:
        if len(out) >= slots or p.out_ms < BACKUP_MIN_MS:
            break
        holder = by_id.get(node_of_consumer(p.consumer))
        slower = holder is not None and worth_moving(holder, room, p.kind, BACKUP_SPEEDUP, views)
        # a later part of a task waits for the parts before it: allow a whole task's time
        stuck = max(stuck_ms, 1.5 * settings.target_task_s * 1000) if p.kind in settings.adaptive else stuck_ms
        if not (slower or p.out_ms >= stuck):
            continue
        if p.entry_id in backed_up or not p.kind:
            continue  # backed up already, or the entry is gone
        out.append(Backup(p.entry_id, node_of_consumer(p.consumer)))
    return out
