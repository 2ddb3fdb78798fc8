"""A gateway's failure accounting: what `gateway/failures.py` records and reads to carry out
`core.failures` (failures are evidence about the node, not the task).

- `record_failure`: the node in the subtask's `keys.job_failures`, its tallies (`failed` in
  its record, `<node>:failed` in the job's `keys.job_tally`), an event; then, in the same
  round trip, what `core.failures` decides on (`FailureView`);
- `record_drops`: a dropped connection's subtasks, one drop each (`keys.job_drops`);
- `bench` / `unbench` / `benched`: `keys.node_bench`, no new tasks for a while;
- `request_ban`: the ban goes through the aggregators (a `ban` entry in the results stream).

The `ok` side of the tallies is written with the results (`handover.Handovers`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aredis

from .. import keys
from ..core.failures import Tally
from ..queue import TaskFields, live_since, node_ids
from .events import queue_event
from .expiry import RETURNED_TTL_S

FAILURES_TTL_S = 86_400  # how long a subtask's failures and drops, and a job's tally, are kept


@dataclass(frozen=True)
class FailureView:
    """What `core.failures` needs after a node reported a subtask failing, read with the record."""

    failed_on: dict[str, str]  # node -> message, for every node that failed the subtask
    live: set[str]
    total: Tally  # the node, over every job
    on_job: Tally  # the node, on this job
    peers: Tally  # the other nodes, on this job
    benches: int
    benched: bool


def _tally(raw: Mapping[bytes, bytes], node: str) -> tuple[Tally, Tally]:
    """The node's and its peers' tallies from a `keys.job_tally` hash."""
    mine, ok, failed = Tally(), 0, 0
    counts: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        who, _, what = field.decode().rpartition(":")
        counts.setdefault(who, {})[what] = int(value)
    for who, c in counts.items():
        if who == node:
            mine = Tally(failed=c.get("failed", 0), ok=c.get("ok", 0))
        else:
            ok, failed = ok + c.get("ok", 0), failed + c.get("failed", 0)
    return mine, Tally(failed=failed, ok=ok)


class FailureStore:
    """The failure side of a gateway's view of Redis (`GatewayStore.failures`)."""

    def __init__(self, client: aredis.Redis) -> None:
        self.r = client

    async def record_failure(
        self, fields: TaskFields, node_id: str, message: str, node_timeout_s: float, voter: str = ""
    ) -> FailureView:
        """Record that `node_id` failed subtask (job, index) with `message` (the subtask's
        `keys.job_failures`, the node's and the job's tallies), and read what
        `core.failures` decides on."""
        failures, tally, node_key = (
            keys.job_failures(fields.job, fields.index),
            keys.job_tally(fields.job),
            keys.node(node_id),
        )
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(failures, node_id, message)
        pipe.expire(failures, FAILURES_TTL_S)
        pipe.hincrby(node_key, "failed", 1)
        pipe.hincrby(tally, f"{node_id}:failed", 1)
        pipe.expire(tally, FAILURES_TTL_S)
        pipe.hgetall(failures)
        pipe.hgetall(tally)
        pipe.hmget(node_key, "returned", "benches")
        pipe.exists(keys.node_bench(node_id))
        pipe.zrangebyscore(keys.NODES, live_since(node_timeout_s), "+inf")
        if fields.replicated:  # like a rejected result: its voter returned the subtask, without a vote
            pipe.sadd(keys.job_returned(fields.job, fields.index), voter or node_id)
            pipe.expire(keys.job_returned(fields.job, fields.index), RETURNED_TTL_S)
        queue_event(
            pipe, "node", node_id=node_id, what="failed", detail=f"{fields.job}#{fields.index}: {message[:120]}"
        )
        (
            _set,
            _exp,
            total_failed,
            _inc,
            _exp2,
            failed_on,
            job_tally,
            (returned, benches),
            benched,
            conns,
            *_,
        ) = await pipe.execute()
        on_job, peers = _tally(job_tally, node_id)
        return FailureView(
            failed_on={n.decode(): m.decode(errors="replace") for n, m in failed_on.items()},
            live=node_ids(conns),
            total=Tally(failed=int(total_failed), ok=int(returned or 0)),
            on_job=on_job,
            peers=peers,
            benches=int(benches or 0),
            benched=bool(benched),
        )

    async def failed_here(self, job_id: str, index: int, node_id: str) -> bool:
        """Did the node report this subtask failing (it is not given it again)?"""
        return bool(await self.r.hexists(keys.job_failures(job_id, index), node_id))

    async def record_drops(self, node_id: str, subtasks: list[tuple[str, int]]) -> list[dict[str, int]]:
        """The node's connection dropped while holding these subtasks: count one drop each
        (`keys.job_drops`); node -> drops for each subtask, in order."""
        if not subtasks:
            return []
        pipe = self.r.pipeline(transaction=True)
        for job_id, index in subtasks:
            key = keys.job_drops(job_id, index)
            pipe.hincrby(key, node_id, 1)
            pipe.expire(key, FAILURES_TTL_S)
            pipe.hgetall(key)
        replies = await pipe.execute()
        return [{n.decode(): int(c) for n, c in replies[k + 2].items()} for k in range(0, len(replies), 3)]

    async def bench(self, node_id: str, seconds: float) -> None:
        """No new tasks for the node for `seconds` (its failures stand out)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(keys.node_bench(node_id), 1, px=max(1, int(seconds * 1000)))
        pipe.hincrby(keys.node(node_id), "benches", 1)
        pipe.hset(keys.node(node_id), "benched_until", time.time() + seconds)
        queue_event(pipe, "node", node_id=node_id, what="benched", detail=f"{seconds:.0f} s")
        await pipe.execute()

    async def unbench(self, *node_ids: str) -> None:
        """End the nodes' benches (they failed a job that turned out to be bad)."""
        if node_ids:
            await self.r.delete(*(keys.node_bench(n) for n in node_ids))

    async def benched(self, node_id: str) -> bool:
        return bool(await self.r.exists(keys.node_bench(node_id)))

    async def request_ban(self, node_id: str, fields: TaskFields) -> None:
        """Ask the aggregators to ban the node (a `ban` entry in the results stream, naming
        the task it last failed): one ban path, which also has what it merged redone."""
        entry = {**fields.to_redis(), "node": node_id, "output": b"", "elapsed_ms": 0, "ban": 1}
        await self.r.xadd(keys.RESULTS, entry)
