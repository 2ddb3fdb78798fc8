"""The streams' consumer groups, and reads of the task stream that need a client."""

from __future__ import annotations

from typing import Any

import redis

from .. import keys
from ..queue import TaskFields, live_since, node_ids

# Every consumer group, with the stream it reads.
GROUPS = (
    (keys.COMMANDS, keys.SCHEDULER_GROUP),
    (keys.TASKS, keys.NODES_GROUP),
    (keys.RESULTS, keys.AGGREGATORS_GROUP),
)


def _exists_already(exc: Exception) -> bool:
    return "BUSYGROUP" in str(exc)


def ensure_groups(client: Any) -> None:
    """Create the consumer groups (idempotent), with a sync client."""
    for stream, group in GROUPS:
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not _exists_already(exc):
                raise


async def ensure_groups_async(client: Any) -> None:
    """The same with an asyncio client (the gateway)."""
    for stream, group in GROUPS:
        try:
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not _exists_already(exc):
                raise


def live_node_ids(r: redis.Redis, node_timeout_s: float) -> set[str]:
    """Nodes with a connection that has sent a frame within `node_timeout_s`."""
    return node_ids(r.zrangebyscore(keys.NODES, live_since(node_timeout_s), "+inf"))


def full_input(client: redis.Redis, task: TaskFields) -> bytes:
    """The module's input: inline bytes followed by the blocks (read from Redis)."""
    if not task.blocks:
        return task.input
    parts = client.mget([keys.block(task.job, b) for b in task.blocks])
    if any(p is None for p in parts):
        raise KeyError(f"a block of job {task.job} task {task.index} is gone")
    return task.input + b"".join(parts)
