"""A gateway hands a node's results over several at a time (`HANDOVER_MANY_LUA`).

The results of one `results` frame (or a single `result`) go into the results stream in one
script call, each with what `HANDOVER_LUA` does for one: the result entry added, the task
entry acknowledged and deleted, and for a replicated subtask the node's voter marked as
having returned it. The node's figures for them travel in the same round trip: its tallies
(`returned`, and `<node>:ok` in each job's `keys.job_tally`), the cluster's recent part
times (`keys.LATENCY`), its average per kind, and whether each task has a backup copy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aredis
from redis.exceptions import NoScriptError

from .. import keys
from ..queue import TaskFields
from .expiry import RETURNED_TTL_S
from .failures import FAILURES_TTL_S
from .gateway import LATENCY_KEPT
from .scripts import HANDOVER_MANY_LUA


@dataclass(frozen=True)
class Handover:
    """One result of a node, checked and ready to leave the gateway."""

    task_id: str
    fields: TaskFields
    output: bytes
    elapsed_ms: float
    #: the part's time (`core.dispatch.sample_ms`), kept in the cluster's recent list
    sample_ms: float


class Handovers:
    """The gateway's side of handing results over in batches."""

    def __init__(self, client: aredis.Redis) -> None:
        self.r = client
        self._many = client.register_script(HANDOVER_MANY_LUA)

    async def hand_over(
        self, node_id: str, voter: str, items: Sequence[Handover], averages: dict[str, float]
    ) -> list[bool]:
        """Move `items` into the results stream as `node_id`'s results, marking `voter` as
        having returned each replicated one; count them in the node's tallies, keep their
        times and the node's averages per kind (`averages`: record field -> ms). For each
        item: does its task entry have a backup copy?"""
        if not items:
            return []
        returned_keys: list[str] = []
        args: list[object] = [keys.NODES_GROUP, RETURNED_TTL_S]
        for item in items:
            f = item.fields
            # the voter travels with the result: the aggregator counts replicas one vote per voter
            entry = {
                **f.to_redis(),
                "node": node_id,
                "output": item.output,
                "elapsed_ms": item.elapsed_ms,
                "voter": voter or node_id,
            }
            flat = [x for kv in entry.items() for x in kv]
            returned_keys.append(keys.job_returned(f.job, f.index))
            args += [item.task_id, (voter or node_id) if f.replicated else "", len(flat), *flat]
        script_keys = [keys.TASKS, keys.RESULTS, *returned_keys]
        pipe = self.r.pipeline(transaction=False)
        # EVALSHA itself: a script call through the pipeline would cost a SCRIPT EXISTS round trip each time
        pipe.evalsha(self._many.sha, len(script_keys), *script_keys, *args)
        node_key = keys.node(node_id)
        pipe.hincrby(node_key, "returned", len(items))
        for job, n in Counter(item.fields.job for item in items).items():
            pipe.hincrby(keys.job_tally(job), f"{node_id}:ok", n)
            pipe.expire(keys.job_tally(job), FAILURES_TTL_S)
        pipe.lpush(keys.LATENCY, *(round(item.sample_ms, 2) for item in items))
        pipe.ltrim(keys.LATENCY, 0, LATENCY_KEPT - 1)
        pipe.hset(node_key, mapping={k: round(v, 2) for k, v in averages.items()})
        if len(items) > 1:
            pipe.hincrby(keys.STATS, "results_batched", len(items) - 1)
        for item in items:
            pipe.exists(keys.backup_marker(item.task_id))
        replies = await pipe.execute(raise_on_error=False)
        if isinstance(replies[0], NoScriptError):  # a Redis that forgot it (restarted): load it, hand over
            await self._many(keys=script_keys, args=args)
        for reply in replies[1 if isinstance(replies[0], NoScriptError) else 0 :]:
            if isinstance(reply, Exception):
                raise reply
        return [bool(x) for x in replies[-len(items) :]]
