"""A gateway's liveness touches, coalesced: one pipeline a second for every connected node.

Each session says "still here" on every heartbeat and once a second from its watchdog. Sent
one by one, that is two pipelines (a ZADD, an HSET and two EXPIREs each) per node per
second: with 2,000 nodes, ~4,000 round trips a second and most of a core of the gateway's
event loop in redis-py (bench/simnodes.py). Here a touch only records the node's figures in
memory, and one flush a `FLUSH_S` writes every node touched since, each once:

- `keys.NODES`: ZADD XX, so a consumer that was released meanwhile (its entry removed by
  `GatewayStore.release`) is never added back; the first touch of a connection, which adds
  it, is written at once by `GatewayStore.touch`;
- the node's record: `last_seen`, `connection` and the figures of its last heartbeat; its
  keys' TTL (`expiry.node_seen`, a week) once a `TTL_EVERY_S` per node, not every second
  (HSET keeps a key's TTL; two EXPIREs per node a second were half of a flush's cost).

What this delays is bounded by `FLUSH_S` (a second), against `node_timeout_s` (4 s by
default) for anything that reads liveness: the scheduler's reaper, replica views, metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aredis

from .. import keys
from .expiry import node_seen

log = logging.getLogger(__name__)

FLUSH_S = 1.0
#: figures a heartbeat carries: a touch with only these (or none) may wait for the flush
BATCHED_FIELDS = frozenset({"running", "done"})
CHUNK = 1000  # nodes per pipeline, so one flush never holds Redis long
TTL_EVERY_S = 60.0  # a node's keys' TTL is refreshed this often by heartbeats
TTL_KEPT = 100_000  # nodes whose last TTL refresh is remembered (then all are refreshed again)


class TouchBatcher:
    """Touches of one gateway's connections, written together every `every_s`."""

    def __init__(self, client: aredis.Redis, every_s: float = FLUSH_S) -> None:
        self.r = client
        self.every_s = every_s
        #: consumer -> (node id, connection, figures): touched since the last flush
        self._pending: dict[str, tuple[str, str, dict[str, str | int | float]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ttl_at: dict[str, float] = {}  # node id -> when its TTL was last refreshed here

    def touch(self, node_id: str, consumer: str, connection: str, **figures: str | int | float) -> None:
        """Record that the connection is alive (written at the next flush)."""
        entry = self._pending.get(consumer)
        if entry is None:
            self._pending[consumer] = (node_id, connection, dict(figures))
        else:
            entry[2].update(figures)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="touches")

    def forget(self, consumer: str) -> None:
        """The connection is gone: drop its unwritten touch."""
        self._pending.pop(consumer, None)

    async def flush(self) -> None:
        """Write every touch recorded since the last flush."""
        batch, self._pending = self._pending, {}
        items = list(batch.items())
        now = time.time()
        if len(self._ttl_at) > TTL_KEPT:
            self._ttl_at.clear()
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            pipe = self.r.pipeline(transaction=False)
            pipe.zadd(keys.NODES, {consumer: now for consumer, _ in chunk}, xx=True)
            for _consumer, (node_id, connection, figures) in chunk:
                pipe.hset(keys.node(node_id), mapping={"last_seen": now, "connection": connection, **figures})
                if now - self._ttl_at.get(node_id, 0.0) >= TTL_EVERY_S:
                    node_seen(pipe, node_id)
                    self._ttl_at[node_id] = now
            await pipe.execute()

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self.every_s)
            try:
                await self.flush()
            except Exception as exc:  # liveness only: the next touches are written next time
                log.warning("gateway: writing %d liveness touches failed: %s", len(self._pending), exc)

    async def aclose(self) -> None:
        """Stop flushing, after writing what is pending (best effort: Redis may be gone)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception as exc:
            log.warning("gateway: the last liveness touches were not written: %s", exc)


__all__ = ["BATCHED_FIELDS", "FLUSH_S", "TouchBatcher"]
