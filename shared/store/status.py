"""Reading the operator's view (`core.status`) out of Redis: nodes, jobs, recent events,
the cluster counters. Two round trips per frame, with either client: the gateway's dashboard
feed reads with its asyncio client (`StatusReader.aread`), `processdistro top` with a sync
one (`StatusReader.read`).

A reader is kept between frames: it holds the rate samples (`core.status.Rates`), the
throughput history and the nodes that left lately (they vanish from `keys.NODES` when
their socket closes, and the view keeps them a while as `left` or `banned`).
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

from .. import keys
from ..core import status as core
from ..queue import node_of_consumer

#: Jobs a frame shows, newest first.
JOBS_SHOWN = 20
#: Events a frame shows, newest first.
EVENTS_SHOWN = 30


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _hash(raw: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in (raw or {}).items()}


class StatusReader:
    """Frames of the operator's view. Not thread-safe; one per feed."""

    def __init__(self, node_timeout_s: float, *, jobs_shown: int = JOBS_SHOWN, events_shown: int = EVENTS_SHOWN):
        self.node_timeout_s = node_timeout_s
        self.jobs_shown = jobs_shown
        self.events_shown = events_shown
        self.rates = core.Rates()
        self.history: deque[tuple[float, float]] = deque()
        self._seen: dict[str, float] = {}  # node id -> when it was last live

    # ---------------------------------------------------------------- the two round trips

    def _first(self, pipe: Any) -> None:
        pipe.zrange(keys.NODES, 0, -1, withscores=True)
        pipe.zrevrange(keys.JOBS, 0, self.jobs_shown - 1)
        pipe.xrevrange(keys.EVENTS, count=self.events_shown)
        pipe.hgetall(keys.STATS)
        pipe.xlen(keys.TASKS)
        pipe.xpending(keys.TASKS, keys.NODES_GROUP)

    def _second(self, pipe: Any, node_ids: list[str], job_ids: list[str]) -> None:
        for n in node_ids:
            pipe.hgetall(keys.node(n))
        for j in job_ids:
            pipe.hgetall(keys.job(j))
            pipe.hgetall(keys.job_tally(j))
            pipe.hgetall(keys.job_stats(j))

    def _plan(self, first: list[Any], now: float) -> tuple[set[str], list[str], list[str]]:
        connections, jobs = (x if not isinstance(x, Exception) else [] for x in first[:2])
        since = now - self.node_timeout_s
        live = {node_of_consumer(_text(c)) for c, score in connections if score >= since}
        for n in live:
            self._seen[n] = now
        for n, t in list(self._seen.items()):
            if t < now - core.KEEP_LEFT_S:
                del self._seen[n]
        return live, sorted(self._seen), [_text(j) for j in jobs]

    def _frame(
        self, first: list[Any], second: list[Any], live: set[str], node_ids: list[str], job_ids: list[str], now: float
    ) -> core.ClusterStatus:
        # before any service made the streams and groups, their reads fail: empty figures
        events_raw, stats_raw, stream_length, pending = (None if isinstance(x, Exception) else x for x in first[2:6])
        events_raw, stream_length = events_raw or [], stream_length or 0
        nodes = []
        for n, raw in zip(node_ids, second[: len(node_ids)], strict=True):
            h = _hash(raw)
            if h.get("id"):
                nodes.append(core.node_row(h, live=n in live, now=now, rates=self.rates))
        jobs = []
        rest = second[len(node_ids) :]
        for i, _job in enumerate(job_ids):
            h, tally, stats = (_hash(x) for x in rest[3 * i : 3 * i + 3])
            if h.get("id"):
                jobs.append(core.job_row(h, tally=tally, stats=stats, now=now, rates=self.rates))
        events = []
        for _id, fields in events_raw:
            try:
                payload = json.loads(_text(_hash(fields).get("event", "{}")))
            except ValueError:
                continue
            if isinstance(payload, dict):
                events.append(core.event_row(payload))
        stats = _hash(stats_raw)
        completed = float(stats.get("tasks_completed", 0) or 0)
        self.rates.observe("cluster", now, completed)
        throughput = self.rates.rate("cluster")
        self.history.append((now, round(throughput, 2)))
        while self.history and self.history[0][0] < now - core.HISTORY_S:
            self.history.popleft()
        self.rates.forget(
            ["cluster", *("node:" + r.id for r in nodes), *("job:" + r.id for r in jobs if r.state != "done")]
        )
        held = int(pending.get("pending", 0)) if isinstance(pending, dict) else 0
        totals = {
            "nodes_live": float(len(live)),
            "slots": float(sum(r.slots for r in nodes if r.state not in ("left", "banned"))),
            "tasks_running": float(held),
            "tasks_queued": float(max(0, int(stream_length) - held)),
            "tasks_completed": completed,
            "throughput": round(throughput, 2),
            "jobs_active": float(sum(1 for j in jobs if j.state in ("queued", "running", "finalizing"))),
        }
        nodes.sort(key=lambda r: (r.state in ("left", "banned"), r.id))
        return core.ClusterStatus(
            now=now, nodes=nodes, jobs=jobs, events=events, totals=totals, throughput=list(self.history)
        )

    # ---------------------------------------------------------------- sync and async

    def read(self, client: Any, now: float | None = None) -> core.ClusterStatus:
        """A frame, with a sync client."""
        now = time.time() if now is None else now
        pipe = client.pipeline(transaction=False)
        self._first(pipe)
        first = pipe.execute(raise_on_error=False)
        live, node_ids, job_ids = self._plan(first, now)
        pipe = client.pipeline(transaction=False)
        self._second(pipe, node_ids, job_ids)
        second = pipe.execute() if node_ids or job_ids else []
        return self._frame(first, second, live, node_ids, job_ids, now)

    async def aread(self, client: Any, now: float | None = None) -> core.ClusterStatus:
        """A frame, with an asyncio client."""
        now = time.time() if now is None else now
        pipe = client.pipeline(transaction=False)
        self._first(pipe)
        first = await pipe.execute(raise_on_error=False)
        live, node_ids, job_ids = self._plan(first, now)
        pipe = client.pipeline(transaction=False)
        self._second(pipe, node_ids, job_ids)
        second = await pipe.execute() if node_ids or job_ids else []
        return self._frame(first, second, live, node_ids, job_ids, now)


async def ajob(client: Any, job_id: str) -> dict[str, str]:
    """A job's record as text ({} if there is none), with an asyncio client: what the
    dashboard's actions (cancel, the preview) check before they act."""
    return _hash(await client.hgetall(keys.job(job_id)))
