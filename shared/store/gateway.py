"""Every Redis call a gateway makes, with an asyncio client.

- auth: the token secret (and the previous one after a rotation), the join code, per-address
  rate limits, node secrets (`claim_node`), address bans;
- nodes: a node's record (`keys.node`), its connection's liveness (`keys.NODES`), speed figures;
- the task stream: read for a connection's consumer, hand a result over (`HANDOVER_LUA`),
  requeue (`REQUEUE_LUA`), park and unpark replicated copies, drop, release a closed
  connection's pending entries;
- jobs: whether a job is over (cached for a second), whether an index is merged, a
  replicated subtask's returned set and votes;
- messages: `DropCopies` published on `keys.CONTROL`, commands to the scheduler, and the
  control channel itself (`control_messages`);
- the figures `/metrics` reads.

What nodes failed, their drops, benches and ban requests are in `failures.py`
(`GatewayStore.failures`); results handed over in batches in `handover.py`.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis

from .. import keys
from ..core.replication import said_ready
from ..exceptions import ProcessDistroError
from ..jobs import JobRecord, JobState
from ..messages import Ban, Cancel, CancelJob, DropCopies, Fail, Steal, Submit
from ..queue import TaskFields, live_since, node_ids
from .connection import async_client
from .events import queue_event
from .expiry import RETURNED_TTL_S, node_seen
from .failures import FailureStore
from .scripts import HANDOVER_LUA, REQUEUE_LUA
from .streams import ensure_groups_async
from .touches import BATCHED_FIELDS, TouchBatcher

log = logging.getLogger(__name__)

JOB_STATE_TTL_S = 1.0  # how long a gateway trusts what it read of a job's state
RESULTS_LOOK_S = 0.05  # how long a gateway trusts what it read of the results stream's length
LATENCY_KEPT = 200  # recent task times in `keys.LATENCY`
RELEASE_MAX = 10_000  # pending entries one connection's cleanup requeues


class ChannelLost(ProcessDistroError):
    """The control channel's connection is gone (subscribe again)."""


@dataclass(frozen=True)
class ClusterFigures:
    """What `/metrics` reads of the cluster, as stored."""

    live_nodes: list[str]
    scores: list[float]  # benchmark scores of the live nodes that reported one
    stream_length: int
    pending: int
    stats: dict[str, int]
    active_jobs: int
    latencies_ms: list[float]


def _entries(resp: Any) -> list[tuple[str, TaskFields]]:
    return [(eid.decode(), TaskFields.from_redis(raw)) for _s, es in resp or [] for eid, raw in es]


class GatewayStore:
    """A gateway's view of Redis. One per gateway process, shared by its sessions."""

    def __init__(self, client: aredis.Redis) -> None:
        self.r = client
        self._requeue = client.register_script(REQUEUE_LUA)
        self._handover = client.register_script(HANDOVER_LUA)
        self._job_over: dict[str, tuple[float, bool]] = {}  # job id -> (read at, over)
        self._results_waiting = (0.0, 0)  # (read at, results stream length)
        self.touches = TouchBatcher(client)  # heartbeats' liveness, written once a second
        self.failures = FailureStore(client)  # what nodes failed, their drops, benches and bans

    @classmethod
    def connect(cls, url: str | None) -> GatewayStore:
        return cls(async_client(url))

    async def start(self) -> None:
        await ensure_groups_async(self.r)

    async def aclose(self) -> None:
        await self.touches.aclose()
        await self.r.aclose()

    async def ping(self) -> None:
        await self.r.ping()

    # ------------------------------------------------------------------ auth

    async def ensure_secret(self, candidate: str) -> bytes:
        """The token secret every gateway shares (`candidate` if none was set yet)."""
        await self.r.set(keys.TOKEN_SECRET, candidate, nx=True)
        return bytes(await self.r.get(keys.TOKEN_SECRET))

    async def ensure_join_code(self, candidate: str) -> str:
        await self.r.set(keys.JOIN_CODE, candidate, nx=True)
        return bytes(await self.r.get(keys.JOIN_CODE)).decode()

    async def join_code(self) -> str:
        """The join code now (`rotate-code` may have changed it since start)."""
        code = await self.r.get(keys.JOIN_CODE)
        return bytes(code).decode() if code else ""

    async def token_secrets(self) -> tuple[bytes | None, bytes | None]:
        """(the token secret, the previous one while its grace period lasts)."""
        current, previous = await self.r.mget([keys.TOKEN_SECRET, keys.TOKEN_SECRET_PREVIOUS])
        return (bytes(current) if current else None), (bytes(previous) if previous else None)

    async def rotate(self, *, join_code: str, token_secret: str | None, grace_s: float) -> None:
        """`processdistro rotate-code`: a new join code and, if given, a new token secret (the
        current one stays valid `grace_s` as the previous)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(keys.JOIN_CODE, join_code)
        if token_secret is not None:
            current = await self.r.get(keys.TOKEN_SECRET)
            if current and grace_s > 0:
                pipe.set(keys.TOKEN_SECRET_PREVIOUS, current, px=max(1, int(grace_s * 1000)))
            else:
                pipe.delete(keys.TOKEN_SECRET_PREVIOUS)
            pipe.set(keys.TOKEN_SECRET, token_secret)
        await pipe.execute()

    async def claim_node(self, node_id: str, digest: str) -> bool:
        """May the holder of the secret with sha256 `digest` be node `node_id`? Yes if that
        is the node's secret, or if no node has the id (it is bound to `digest` now, once:
        HSETNX, so two first joins racing for one id cannot both win). A record without a
        secret (written before secrets existed) is never handed out."""
        key = keys.node(node_id)
        stored = await self.r.hget(key, "secret_sha256")
        if stored is None:
            if await self.r.exists(key):
                return False
            if await self.r.hsetnx(key, "secret_sha256", digest):
                return True
            stored = await self.r.hget(key, "secret_sha256")
        return stored is not None and hmac.compare_digest(bytes(stored), digest.encode())

    async def proves(self, node_id: str, digest: str) -> bool:
        """Is `digest` the sha256 of joined node `node_id`'s secret? (Never claims a free id.)"""
        stored = await self.r.hget(keys.node(node_id), "secret_sha256")
        return stored is not None and hmac.compare_digest(bytes(stored), digest.encode())

    async def ban_address(self, address: str, ttl_s: float) -> None:
        await self.r.set(keys.banned_address(address), 1, px=max(1, int(ttl_s * 1000)))

    async def address_banned(self, address: str) -> bool:
        return bool(await self.r.exists(keys.banned_address(address)))

    async def within_rate(self, bucket: str, who: str, per_minute: int) -> bool:
        """Count one more request of `who` this minute; False once over `per_minute`."""
        key = keys.rate(bucket, who) + f":{int(time.time() // 60)}"
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = await pipe.execute()
        return int(count) <= per_minute

    async def block(self, job_id: str, sha: str) -> bytes | None:
        data = await self.r.get(keys.block(job_id, sha))
        return None if data is None else bytes(data)

    async def module(self, sha: str) -> bytes | None:
        """An uploaded module's bytes (`store.modules`); None if no job needs it any more."""
        data = await self.r.get(keys.module_blob(sha))
        return None if data is None else bytes(data)

    async def module_stored(self, sha: str) -> bool:
        """Is uploaded module `sha` in Redis (a task of a job that brought its own module)?"""
        return bool(await self.r.exists(keys.module_blob(sha)))

    # ------------------------------------------------------------------ nodes

    async def node(self, node_id: str) -> dict[bytes, bytes]:
        """A node's record (empty if it never joined)."""
        return dict(await self.r.hgetall(keys.node(node_id)))

    async def banned(self, node_id: str) -> bool:
        banned = await self.r.hget(keys.node(node_id), "banned")
        return bool(banned) and banned != b"0"

    async def save_node(self, node_id: str, fields: Mapping[str, str | int | float]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.node(node_id), mapping=dict(fields))
        node_seen(pipe, node_id)  # a report that never connects leaves no record for ever
        what = " ".join(str(fields[f]) for f in ("kind", "browser", "os") if fields.get(f))
        queue_event(pipe, "node", node_id=node_id, what="joined", detail=what[:120])
        await pipe.execute()

    async def touch(self, node_id: str, consumer: str, connection: str, **extra: str | int | float) -> None:
        """The connection is alive (its score in `keys.NODES`), with figures for the record.
        A heartbeat's touch (no figures but `BATCHED_FIELDS`) is coalesced (`TouchBatcher`)."""
        if extra.keys() <= BATCHED_FIELDS:
            self.touches.touch(node_id, consumer, connection, **extra)
            return
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(keys.NODES, {consumer: now})
        pipe.hset(keys.node(node_id), mapping={"last_seen": now, "connection": connection, **extra})
        node_seen(pipe, node_id)
        await pipe.execute()

    async def node_left(self, node_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.node(node_id), mapping={"state": "disconnected", "last_seen": time.time()})
        node_seen(pipe, node_id)  # its keys go NODE_KEEP_S after it left
        queue_event(pipe, "node", node_id=node_id, what="left")
        await pipe.execute()

    async def note_job(self, job_id: str, note: str) -> None:
        """Say why a running job does not progress (its record's `note`, and an event)."""
        payload = {"type": "job_note", "ts": time.time(), "job": job_id, "note": note}
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.job(job_id), "note", note)
        pipe.xadd(keys.EVENTS, {"event": json.dumps(payload)}, maxlen=keys.EVENTS_MAXLEN, approximate=True)
        await pipe.execute()

    async def count(self, stat: str, n: int) -> None:
        """Add `n` to a cluster-wide counter (`keys.STATS`)."""
        await self.r.hincrby(keys.STATS, stat, n)

    # ------------------------------------------------------------------ the task stream

    async def read(self, consumer: str, count: int, *, block_ms: int | None) -> list[tuple[str, TaskFields]]:
        """New entries for `consumer` (pending for it from now on)."""
        resp = await self.r.xreadgroup(keys.NODES_GROUP, consumer, {keys.TASKS: ">"}, count=count, block=block_ms)
        return _entries(resp)

    async def requeue(self, ids: list[str], *, bump: int) -> int:
        """Requeue entries as fresh ones (`bump` 1: one more attempt; 0: given back unstarted)."""
        if not ids:
            return 0
        return int(await self._requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, bump, *ids]))

    async def hand_over(
        self,
        task_id: str,
        fields: TaskFields,
        *,
        node_id: str,
        output: bytes,
        elapsed_ms: float,
        returned: bool,
        **extra: str | int | float,
    ) -> None:
        """Move a task entry into the results stream as `node_id`'s result (HANDOVER_LUA);
        `returned` also records the node's voter (`extra["voter"]`, else the node id) in the
        subtask's `keys.job_returned`."""
        entry = {**fields.to_redis(), "node": node_id, "output": output, "elapsed_ms": elapsed_ms, **extra}
        flat: list[object] = [x for kv in entry.items() for x in kv]
        marker = str(extra.get("voter") or node_id) if returned else ""  # the set holds voters
        await self._handover(
            keys=[keys.TASKS, keys.RESULTS, keys.job_returned(fields.job, fields.index)],
            args=[keys.NODES_GROUP, task_id, marker, RETURNED_TTL_S, *flat],
        )

    async def drop(self, task_id: str) -> None:
        """Remove an entry whose task is not needed any more."""
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(keys.TASKS, keys.NODES_GROUP, task_id)
        pipe.xdel(keys.TASKS, task_id)
        await pipe.execute()

    async def release(self, consumer: str) -> int:
        """Requeue everything a closed connection holds (its consumer's pending entries: an
        XREADGROUP cut short by the close may have delivered entries nobody saw) and forget
        the consumer. The number requeued."""
        self.touches.forget(consumer)
        pending = await self.r.xpending_range(
            keys.TASKS, keys.NODES_GROUP, "-", "+", RELEASE_MAX, consumername=consumer
        )
        ids = [p["message_id"] for p in pending]
        n = 0
        if ids:
            n = await self.requeue(ids, bump=0)  # a dropped socket spends no attempt (`core.failures`)
            await self.count("tasks_requeued", n)
        await self.r.xgroup_delconsumer(keys.TASKS, keys.NODES_GROUP, consumer)
        await self.r.zrem(keys.NODES, consumer)
        return n

    async def park(self, task_id: str) -> None:
        """Keep a copy (replicated, or a backup read by its own straggler's node) pending for
        a consumer that never reads, until a node that may run it asks for work: at the
        stream's end it would wait for everything."""
        await self.r.xclaim(keys.TASKS, keys.NODES_GROUP, keys.PARKED_CONSUMER, 0, [task_id])
        await self.r.sadd(keys.PARKED, task_id)

    async def parked(self, look: int) -> list[tuple[str, TaskFields]]:
        """Up to `look` parked copies, at random (forgetting ids whose entry is gone)."""
        ids = [i.decode() for i in await self.r.srandmember(keys.PARKED, look) or []]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.xrange(keys.TASKS, task_id, task_id)
        found = [
            (tid, TaskFields.from_redis(es[0][1])) for tid, es in zip(ids, await pipe.execute(), strict=True) if es
        ]
        if gone := set(ids) - {tid for tid, _ in found}:
            await self.r.srem(keys.PARKED, *gone)
        return found

    async def unpark(self, task_id: str, consumer: str) -> bool:
        """Take a parked copy for `consumer`; False if another node took it first."""
        if await self.r.srem(keys.PARKED, task_id) != 1:
            return False
        return bool(await self.r.xclaim(keys.TASKS, keys.NODES_GROUP, consumer, 0, [task_id]))

    # ------------------------------------------------------------------ jobs and replicas

    async def job_is_over(self, job_id: str) -> bool:
        """Is the job no longer live (`JobState.live`)? Read at most once a second per job."""
        now = time.monotonic()
        cached = self._job_over.get(job_id)
        if cached and now - cached[0] < JOB_STATE_TTL_S:
            return cached[1]
        state = await self.r.hget(keys.job(job_id), "state")
        try:
            over = state is None or not JobState(state.decode()).live
        except ValueError:
            over = True
        self._job_over[job_id] = (now, over)
        return over

    async def results_waiting(self) -> int:
        """Results not yet committed by an aggregator (the results stream's length), read at
        most every `RESULTS_LOOK_S` for all of this gateway's sessions."""
        now = time.monotonic()
        if now - self._results_waiting[0] >= RESULTS_LOOK_S:
            self._results_waiting = (now, int(await self.r.xlen(keys.RESULTS)))
        return self._results_waiting[1]

    def forget_job(self, job_id: str) -> None:
        """Read the job's state afresh next time (a `cancel_job` came)."""
        self._job_over.pop(job_id, None)

    async def index_done(self, job_id: str, index: int) -> bool:
        """Is the subtask merged already?"""
        return bool(await self.r.sismember(keys.job_done(job_id), index))

    async def has_returned(self, job_id: str, index: int, voter: str) -> bool:
        return bool(await self.r.sismember(keys.job_returned(job_id, index), voter))

    async def returned_flags(self, voter: str, tasks: list[TaskFields], node_id: str = "") -> list[bool]:
        """For several subtasks in one round trip: did the node's voter return a result for
        it, or did the node (`node_id`, default the voter) report it failing
        (`keys.job_failures`)? Either way it is not given that copy."""
        if not tasks:
            return []
        pipe = self.r.pipeline(transaction=False)
        for fields in tasks:
            pipe.sismember(keys.job_returned(fields.job, fields.index), voter)
            pipe.hexists(keys.job_failures(fields.job, fields.index), node_id or voter)  # failed here: never again
        flags = [bool(x) for x in await pipe.execute()]
        return [a or b for a, b in zip(flags[::2], flags[1::2], strict=True)]

    async def replica_view(self, job_id: str, index: int, node_timeout_s: float) -> tuple[set[str], int, set[str]]:
        """A replicated subtask's returned voters and vote count, and the live voters
        (`core.dispatch.voter_key`, kept as `voter` in each node's record) of the nodes that
        take work (`core.replication.said_ready`)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(keys.job_returned(job_id, index))
        pipe.hlen(keys.job_votes(job_id, index))
        pipe.zrangebyscore(keys.NODES, live_since(node_timeout_s), "+inf")
        returned, votes, conns = await pipe.execute()
        live = sorted(node_ids(conns))
        pipe = self.r.pipeline(transaction=False)
        for n in live:
            pipe.hmget(keys.node(n), "voter", "ready", "connection")
        records = zip(live, await pipe.execute(), strict=True)
        voters = {(v.decode() if v else n) for n, (v, ready, conn) in records if said_ready(ready, conn)}
        return {n.decode() for n in returned}, int(votes), voters

    # ------------------------------------------------------------------ messages

    async def publish(self, message: CancelJob | Ban | Steal | DropCopies) -> None:
        """Tell every gateway (this one too) on `keys.CONTROL`."""
        await self.r.publish(keys.CONTROL, message.encode())

    async def send_command(self, command: Submit | Cancel | Fail) -> None:
        """A command for the scheduler (`keys.COMMANDS`)."""
        await self.r.xadd(keys.COMMANDS, {"command": command.encode()})

    async def control_messages(self) -> AsyncGenerator[bytes, None]:
        """The raw messages on `keys.CONTROL` from now on. Raises `ChannelLost` when the
        connection goes (or the subscription ends); a consumer that stops iterating should
        `aclose()` the iterator, which unsubscribes."""
        pubsub = self.r.pubsub()
        try:
            await pubsub.subscribe(keys.CONTROL)
            async for msg in pubsub.listen():
                if msg.get("type") == "message":
                    yield bytes(msg["data"])
            raise ChannelLost("subscription ended")
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ChannelLost(str(exc) or type(exc).__name__) from exc
        finally:
            try:
                await pubsub.aclose()
            except (redis.RedisError, OSError):  # the connection is gone anyway
                log.debug("control channel: close failed", exc_info=True)

    # ------------------------------------------------------------------ metrics

    async def cluster_figures(self, node_timeout_s: float) -> ClusterFigures:
        pipe = self.r.pipeline(transaction=False)
        pipe.zrangebyscore(keys.NODES, live_since(node_timeout_s), "+inf")
        pipe.xlen(keys.TASKS)
        pipe.xpending(keys.TASKS, keys.NODES_GROUP)
        pipe.hgetall(keys.STATS)
        pipe.zcard(keys.ACTIVE_JOBS)
        pipe.lrange(keys.LATENCY, 0, -1)
        conns, length, pending, stats, active, lat = await pipe.execute()
        live = sorted(node_ids(conns))
        scores: list[float] = []
        if live:
            pipe = self.r.pipeline(transaction=False)
            for n in live:
                pipe.hget(keys.node(n), "score")
            scores = [float(s) for s in await pipe.execute() if s]
        return ClusterFigures(
            live_nodes=live,
            scores=scores,
            stream_length=int(length),
            pending=int(pending["pending"]) if pending else 0,
            stats={k.decode(): int(v) for k, v in stats.items()},
            active_jobs=int(active),
            latencies_ms=[float(x) for x in lat],
        )

    # ------------------------------------------------------------------ outputs (gateway/outputs.py)

    async def job_record(self, job_id: str) -> JobRecord | None:
        """A job's record (its outputs: what `GET /jobs/<id>/outputs/<name>` may serve)."""
        raw = await self.r.hgetall(keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None
