"""The task stream as the scheduler uses it: feeding, requeueing, pending entries, backup
copies, parked copies and the consumers the reaper looks at.

Every call here is one round trip (pipelined where it reads many keys); what must happen
together is one transaction (a fed batch and the job's `next_index`) or one script
(`REQUEUE_LUA`, where XACK decides who requeues).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from .. import keys
from ..core.replication import CONTROLLER
from ..core.tail import Pending
from ..queue import TaskFields
from .scripts import HANDOVER_LUA, REQUEUE_LUA

BACKUP_MARKER_TTL_S = 3600
PENDING_SCAN = 1000  # pending entries read for the backup decision (oldest first)
CONSUMER_PENDING_MAX = 10_000  # pending entries of one consumer read at once


@dataclass(frozen=True)
class Consumer:
    """A consumer of the nodes group: a node's connection (or the parked consumer)."""

    name: str
    idle_s: float  #: since it last read or acked


@dataclass(frozen=True)
class ParkedCopy:
    """What decides the fate of a parked replicated copy: its task entry (None: gone),
    whether its index is merged, the nodes that returned a result for it, the votes in."""

    entry_id: str
    task: TaskFields | None
    merged: bool = False
    returned: frozenset[str] = frozenset()
    votes: int = 0
    waited_s: float = 0.0  # since it was parked


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TaskStream:
    """`keys.TASKS` and its group `keys.NODES_GROUP`, with a sync client."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._requeue = client.register_script(REQUEUE_LUA)
        self._handover = client.register_script(HANDOVER_LUA)

    # ------------------------------------------------------------------ feeding

    def backlog(self) -> int:
        """Entries no consumer has read yet."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(keys.TASKS)
        pipe.xpending(keys.TASKS, keys.NODES_GROUP)
        length, pending = pipe.execute()
        return int(length) - int(pending["pending"])

    def undelivered(self, count: int) -> list[TaskFields]:
        """Up to `count` entries after the group's last delivered one, in stream order."""
        groups = [g for g in self.r.xinfo_groups(keys.TASKS) if _text(g["name"]) == keys.NODES_GROUP]
        last = _text(groups[0]["last-delivered-id"]) if groups else "0-0"
        return [TaskFields.from_redis(f) for _id, f in self.r.xrange(keys.TASKS, f"({last}", "+", count=count)]

    def feed(self, job_id: str, entries: Sequence[TaskFields], next_index: int) -> None:
        """Add a job's task entries and move its `next_index` cursor, in one transaction, so
        a crash neither skips nor repeats a subtask."""
        pipe = self.r.pipeline(transaction=True)
        for fields in entries:
            pipe.xadd(keys.TASKS, fields.to_redis())
        pipe.hset(keys.job(job_id), "next_index", next_index)
        pipe.execute()

    # ------------------------------------------------------------------ pending entries

    def held(self) -> dict[str, int]:
        """Pending entries per consumer (what each connection holds)."""
        summary = self.r.xpending(keys.TASKS, keys.NODES_GROUP)
        return {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}

    def pending(self, consumer: str | None = None, count: int = PENDING_SCAN) -> list[Pending]:
        """Pending entries (of one consumer, or all), oldest first; kinds are not read."""
        extra = {"consumername": consumer} if consumer is not None else {}
        rows = self.r.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", count, **extra)
        return [Pending(_text(p["message_id"]), _text(p["consumer"]), int(p["time_since_delivered"])) for p in rows]

    def newest_kinds(self, consumers: Iterable[str]) -> dict[str, str]:
        """The kind of the newest entry each consumer holds ("" if it holds none)."""
        names = list(consumers)
        pipe = self.r.pipeline(transaction=False)
        for c in names:
            pipe.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", CONSUMER_PENDING_MAX, consumername=c)
        newest = {c: _text(rows[-1]["message_id"]) for c, rows in zip(names, pipe.execute(), strict=True) if rows}
        kinds = self.kinds(list(newest.values()))
        return {c: kinds.get(newest[c], "") if c in newest else "" for c in names}

    def kinds(self, entry_ids: Sequence[str]) -> dict[str, str]:
        """Task kind by entry id, for the entries still in the stream."""
        pipe = self.r.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xrange(keys.TASKS, entry_id, entry_id, count=1)
        found = zip(entry_ids, pipe.execute(), strict=True) if entry_ids else []
        return {i: e[0][1][b"kind"].decode() for i, e in found if e}

    def with_kinds(self, entries: Sequence[Pending]) -> list[Pending]:
        kinds = self.kinds([p.entry_id for p in entries])
        return [dataclasses.replace(p, kind=kinds.get(p.entry_id, "")) for p in entries]

    def entry(self, entry_id: str) -> TaskFields | None:
        entries = self.r.xrange(keys.TASKS, entry_id, entry_id)
        return TaskFields.from_redis(entries[0][1]) if entries else None

    def requeue(self, entry_ids: Sequence[str], *, attempt: bool) -> int:
        """Put entries back as fresh ones (`attempt`: counting one more attempt); returns
        how many this call requeued (a racing requeuer gets the others)."""
        if not entry_ids:
            return 0
        return int(self._requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, int(attempt), *entry_ids]))

    def count(self, stat: str, n: int) -> None:
        """Add to a cluster-wide counter (`keys.STATS`)."""
        self.r.hincrby(keys.STATS, stat, n)

    # ------------------------------------------------------------------ backups

    def backed_up(self, entry_ids: Sequence[str]) -> set[str]:
        """The entries that have a backup copy already."""
        pipe = self.r.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.exists(keys.backup_marker(entry_id))
        return {i for i, n in zip(entry_ids, pipe.execute(), strict=True) if n} if entry_ids else set()

    def add_backup(self, entry_id: str, backup_of: str) -> bool:
        """Queue a copy of the entry marked `backup_of=<holder node>`, once per entry (the
        marker is set first and wins once); False if it was backed up already or is gone."""
        if not self.r.set(keys.backup_marker(entry_id), 1, nx=True, ex=BACKUP_MARKER_TTL_S):
            return False
        original = self.entry(entry_id)
        if original is None:
            return False
        self.r.xadd(keys.TASKS, dataclasses.replace(original, backup_of=backup_of).to_redis())
        return True

    # ------------------------------------------------------------------ parked copies

    def parked(self) -> list[ParkedCopy]:
        """Every parked replicated copy, with what decides whether it may go back."""
        ids = [_text(i) for i in self.r.smembers(keys.PARKED)]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(keys.TASKS, entry_id, entry_id)
        tasks = [TaskFields.from_redis(e[0][1]) if e else None for e in pipe.execute()]
        parked_ms = {p.entry_id: p.out_ms for p in self.pending(keys.PARKED_CONSUMER, CONSUMER_PENDING_MAX)}
        for task in tasks:
            if task is not None:
                pipe.sismember(keys.job_done(task.job), task.index)
                pipe.smembers(keys.job_returned(task.job, task.index))
                pipe.hlen(keys.job_votes(task.job, task.index))
        reads = iter(pipe.execute())
        out = []
        for entry_id, task in zip(ids, tasks, strict=True):
            if task is None:
                out.append(ParkedCopy(entry_id, None))
                continue
            merged, returned, votes = next(reads), next(reads), next(reads)
            waited_s = parked_ms.get(entry_id, 0) / 1000
            returned_by = frozenset(_text(v) for v in returned)
            out.append(ParkedCopy(entry_id, task, bool(merged), returned_by, int(votes), waited_s))
        return out

    def drop_parked(self, entry_id: str) -> None:
        """A parked copy nobody needs any more leaves the stream."""
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(keys.PARKED, entry_id)
        pipe.xack(keys.TASKS, keys.NODES_GROUP, entry_id)
        pipe.xdel(keys.TASKS, entry_id)
        pipe.execute()

    def to_controller(self, entry_id: str, task: TaskFields, *, decide: bool = False) -> bool:
        """Hand a parked copy to the aggregators as a `resolve` entry: the controller computes
        the subtask itself (no live node may run it and the results disagree); `decide`: as a
        `decide` entry instead, which accepts the one result in (or the next) unconfirmed."""
        if not self.r.srem(keys.PARKED, entry_id):
            return False  # another process took it first
        what = "decide" if decide else "resolve"
        entry = {**task.to_redis(), "node": CONTROLLER, "output": b"", "elapsed_ms": 0, what: 1}
        flat = [x for kv in entry.items() for x in kv]
        self._handover(
            keys=[keys.TASKS, keys.RESULTS, keys.job_returned(task.job, task.index)],
            args=[keys.NODES_GROUP, entry_id, "", 0, *flat],
        )
        return True

    def release_parked(self, entry_id: str) -> int:
        """Send a parked copy back to the stream (unless another process took it first)."""
        if not self.r.srem(keys.PARKED, entry_id):
            return 0
        return self.requeue([entry_id], attempt=False)

    # ------------------------------------------------------------------ consumers

    def consumers(self) -> list[Consumer]:
        return [
            Consumer(_text(c["name"]), int(c["idle"]) / 1000)
            for c in self.r.xinfo_consumers(keys.TASKS, keys.NODES_GROUP)
        ]

    def release_consumer(self, consumer: str) -> int:
        """Requeue what a dead connection holds (no attempt spent) and drop the
        consumer once it holds nothing; returns how many tasks moved."""
        ids = [p.entry_id for p in self.pending(consumer, CONSUMER_PENDING_MAX)]
        n = self.requeue(ids, attempt=False)  # a dead connection spends no attempt (`core.failures`)
        if n:
            self.count("tasks_requeued", n)
        # DELCONSUMER drops pending entries silently: only once they are requeued
        if not self.pending(consumer, 1):
            self.r.xgroup_delconsumer(keys.TASKS, keys.NODES_GROUP, consumer)
        return n
