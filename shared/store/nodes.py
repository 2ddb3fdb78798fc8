"""Node connections as the scheduler reads them: live node views, dead connections, and the
recent task round trips (what a task typically takes)."""

from __future__ import annotations

import redis

from .. import keys
from ..capacity import NodeView
from ..core.replication import said_ready
from .streams import live_node_ids


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def live_nodes(client: redis.Redis, node_timeout_s: float) -> dict[str, NodeView]:
    """The live nodes by node id (in id order): slots, speeds, current connection."""
    ids = sorted(live_node_ids(client, node_timeout_s))
    pipe = client.pipeline(transaction=False)
    for node_id in ids:
        pipe.hgetall(keys.node(node_id))
    return {n: NodeView.of(n, h) for n, h in zip(ids, pipe.execute(), strict=True) if h}


def live_voters(client: redis.Redis, node_timeout_s: float) -> set[str]:
    """The voters (`core.dispatch.voter_key`, `voter` in a node's record; the node id where
    none is recorded) of the live nodes: who could still confirm a replicated subtask."""
    ids = sorted(live_node_ids(client, node_timeout_s))
    return set(voters_of(client, ids).values())


def voters_of(client: redis.Redis, node_ids: list[str]) -> dict[str, str]:
    """node id -> its voter, for the nodes that take work (`core.replication.said_ready`)."""
    pipe = client.pipeline(transaction=False)
    for node_id in node_ids:
        pipe.hmget(keys.node(node_id), "voter", "ready", "connection")
    return {
        n: (_text(v) if v else n)
        for n, (v, ready, conn) in zip(node_ids, pipe.execute(), strict=True)
        if said_ready(ready, conn)
    }


def connections(client: redis.Redis, *, silent_since: float) -> tuple[set[str], set[str]]:
    """(every registered connection, those silent since before `silent_since`): consumer
    names in `keys.NODES`, scored by their last heartbeat."""
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.NODES, 0, -1)
    pipe.zrangebyscore(keys.NODES, "-inf", silent_since)
    known, dead = pipe.execute()
    return {_text(c) for c in known}, {_text(c) for c in dead}


def forget_connections(client: redis.Redis, names: set[str]) -> None:
    if names:
        client.zrem(keys.NODES, *names)


def latencies_ms(client: redis.Redis) -> list[float]:
    """Recent task round trips (`keys.LATENCY`, written by the gateways)."""
    return [float(x) for x in client.lrange(keys.LATENCY, 0, -1)]
