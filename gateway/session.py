"""One node's WebSocket connection: pull-based dispatch, results, heartbeats, cleanup.

Invariant: what this connection holds is exactly the pending entries of its stream consumer
(`queue.consumer_name(node, connection)`); on close every one of them is requeued at once,
and a silent node (no frame for `node_timeout_s`) is closed, which does the same.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..shared import keys
from ..shared.capacity import parts_per_task
from ..shared.protocol import (
    MULTIPART_SINCE,
    CancelTasks,
    CloseCode,
    ErrorCode,
    ErrorMessage,
    Heartbeat,
    Hello,
    Leave,
    Ready,
    TaskAssign,
    TaskFailed,
    TaskPart,
    TaskResult,
    TokenRefresh,
    Welcome,
    node_message_adapter,
)
from ..shared.queue import MAX_TASK_ATTEMPTS, TaskFields, consumer_name, live_since, node_ids
from ..shared.tasks import PLUGINS

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.3  # weight of the newest task time in a node's average
UNPARK_LOOK = 16  # parked copies a dispatch looks at
GIVEN_BACK_KEPT = 4096  # task ids taken back from a node that it may still answer
RETURNED_TTL_S = 86_400  # how long a replicated subtask remembers who returned it


@dataclass(slots=True)
class Held:
    """A task entry this connection holds: sent at `sent` as part of assignment `group`."""

    fields: TaskFields
    sent: float
    group: int


class NodeSession:
    def __init__(self, gw: Gateway, ws: WebSocket, node_id: str, slots: int) -> None:
        self.gw = gw
        self.ws = ws
        self.node_id = node_id
        self.connection = secrets.token_hex(4)
        self.consumer = consumer_name(node_id, self.connection)
        self.slots = slots
        self.held: dict[str, Held] = {}  # task entry id -> what and when (insertion order = part order)
        self._groups = itertools.count()
        self.want = 0
        self.wake = asyncio.Event()
        self.last_seen = time.monotonic()
        self.done = 0
        self.closing = False
        self._send_lock = asyncio.Lock()
        self.ewma: dict[str, float] = {}
        self.simd = False
        self.multipart = False
        self.given_back: dict[str, None] = {}  # recent tasks taken back (stolen, or another copy won)

    # ------------------------------------------------------------------ frames out

    async def send(self, message: object) -> None:
        text = message.model_dump_json()  # type: ignore[attr-defined]
        async with self._send_lock:
            if self.ws.application_state is WebSocketState.CONNECTED:
                await self.ws.send_text(text)

    async def refuse(self, code: ErrorCode, message: str) -> None:
        self.gw.metrics.messages_rejected.labels(code.value).inc()
        log.info("node %s: refused a frame (%s): %s", self.node_id, code.value, message)
        await self.send(ErrorMessage(code=code, message=message))

    async def close(self, code: int, reason: str) -> None:
        self.closing = True
        async with self._send_lock:
            if self.ws.application_state is WebSocketState.CONNECTED:
                await self.ws.close(code, reason)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        r = self.gw.r
        await self._touch(state="connected")
        known = await r.hgetall(keys.node(self.node_id))  # a reconnect keeps the node's speed record
        self.simd = known.get(b"simd") == b"1"
        self.ewma = {k.decode(): float(v) for k, v in known.items() if k.startswith(b"ewma_ms:") and v}
        helpers = [
            asyncio.create_task(self._dispatch(), name=f"dispatch-{self.consumer}"),
            asyncio.create_task(self._watchdog(), name=f"watchdog-{self.consumer}"),
        ]
        try:
            await self.send(
                Welcome(
                    node_id=self.node_id,
                    slots=self.slots,
                    prefetch=self.gw.settings.prefetch,
                    heartbeat_interval_s=self.gw.settings.heartbeat_interval_s,
                )
            )
            await self._receive_loop()
        finally:
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._release()
            await r.hset(keys.node(self.node_id), mapping={"state": "disconnected", "last_seen": time.time()})
            log.info("node %s: connection %s closed, %d tasks done", self.node_id, self.connection, self.done)

    async def _release(self) -> None:
        """Requeue everything this connection holds (pending entries, not just `held`:
        an XREADGROUP cut short by the close may have delivered entries we never saw)."""
        r = self.gw.r
        try:
            pending = await r.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", 10_000, consumername=self.consumer)
            ids = [p["message_id"] for p in pending]
            if ids:
                n = await self.gw.requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, 1, *ids])
                await r.hincrby(keys.STATS, "tasks_requeued", int(n))
                log.info("node %s: requeued %d tasks at once", self.node_id, int(n))
            await r.xgroup_delconsumer(keys.TASKS, keys.NODES_GROUP, self.consumer)
            await r.zrem(keys.NODES, self.consumer)
        except Exception:  # the scheduler's reaper requeues whatever we could not
            log.exception("node %s: cleanup failed; the reaper will requeue its tasks", self.node_id)

    async def _touch(self, **extra: object) -> None:
        now = time.time()
        pipe = self.gw.r.pipeline(transaction=False)
        pipe.zadd(keys.NODES, {self.consumer: now})
        pipe.hset(keys.node(self.node_id), mapping={"last_seen": now, "connection": self.connection, **extra})
        await pipe.execute()

    async def _watchdog(self) -> None:
        timeout = self.gw.settings.node_timeout_s
        refresh_every = self.gw.settings.token_ttl_s / 2
        next_refresh = time.monotonic() + refresh_every
        last_touch = 0.0
        while True:
            await asyncio.sleep(min(0.25, timeout / 8))
            now = time.monotonic()
            if now - self.last_seen > timeout:
                log.warning("node %s: silent for %.1fs; closing", self.node_id, now - self.last_seen)
                await self.close(CloseCode.SILENT, "no heartbeat")
                return
            if now - last_touch >= 1.0:
                # the connection's liveness in Redis: the scheduler's reaper acts on it only
                # if this gateway itself dies (we close silent nodes ourselves)
                await self._touch()
                last_touch = now
            if now > next_refresh:
                token, expires = self.gw.signer.issue(self.node_id)
                await self.send(TokenRefresh(token=token, token_expires_at=expires))
                next_refresh = now + refresh_every

    # ------------------------------------------------------------------ frames in

    async def _receive_loop(self) -> None:
        cap = self.gw.settings.max_message_bytes
        while not self.closing:
            try:
                msg = await self.ws.receive()
            except WebSocketDisconnect:
                return
            if msg["type"] == "websocket.disconnect":
                return
            self.last_seen = time.monotonic()
            text = msg.get("text")
            if text is None:
                await self.refuse(ErrorCode.MALFORMED, "expected a JSON text frame, got a binary frame")
                continue
            if len(text) > cap:
                await self.refuse(ErrorCode.TOO_LARGE, f"frame of {len(text)} bytes exceeds the {cap}-byte cap")
                await self.close(CloseCode.TOO_BIG, "frame too large")
                return
            try:
                raw = json.loads(text)
            except ValueError as exc:
                await self.refuse(ErrorCode.MALFORMED, f"expected JSON, got a parse error: {exc}")
                continue
            if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
                await self.refuse(ErrorCode.MALFORMED, "expected an object with a string 'type'")
                continue
            try:
                message = node_message_adapter.validate_python(raw)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
                await self.refuse(ErrorCode.INVALID, f"invalid {raw['type']!r} message: {problems}")
                continue
            await self._handle(message)

    async def _handle(self, m: object) -> None:
        if isinstance(m, Ready):
            self.want = max(0, min(m.free, self.slots + self.gw.settings.prefetch - self.assignments()))
            if self.want:
                self.wake.set()
        elif isinstance(m, TaskResult):
            await self._result(m)
        elif isinstance(m, Heartbeat):
            await self._touch(running=m.running, done=m.done)
        elif isinstance(m, TaskFailed):
            await self._failed(m)
        elif isinstance(m, Hello):
            self.multipart = m.protocol >= MULTIPART_SINCE  # an older agent gets one part per task
            unknown = [t for t in m.running if t not in self.held]
            if unknown:  # requeued when the old connection closed: results would be duplicates
                await self.send(CancelTasks(task_ids=unknown))
        elif isinstance(m, Leave):
            await self.close(CloseCode.NORMAL, "left")

    async def _result(self, m: TaskResult) -> None:
        held = self.held.get(m.task_id)
        if held is None:
            if m.task_id in self.given_back:  # it had started after all: another node has it now
                return
            await self.refuse(ErrorCode.UNKNOWN_TASK, f"task {m.task_id} is not held by this connection")
            return
        fields, sent = held.fields, held.sent
        try:
            output = base64.b64decode(m.output_b64, validate=True)
        except (binascii.Error, ValueError):  # the model validated it; belt and braces
            await self.refuse(ErrorCode.INVALID, "output_b64 is not base64")
            return
        elapsed = time.monotonic() - sent
        # a replicated copy stays in `held` until the handover has also recorded that this
        # node returned it, so the node never takes the other copy in between
        await self._hand_over(m.task_id, fields, output, m.elapsed_ms, returned=fields.replicated)
        self.held.pop(m.task_id, None)
        self.done += 1
        self.gw.metrics.latency.observe(elapsed)
        # observed speed per kind: an exponentially weighted average of task time
        field = f"ewma_ms:{fields.kind}"
        previous = self.ewma.get(field)
        sample = m.elapsed_ms if m.elapsed_ms > 0 else elapsed * 1000  # a part's own run time
        self.ewma[field] = sample if previous is None else EWMA_ALPHA * sample + (1 - EWMA_ALPHA) * previous
        pipe = self.gw.r.pipeline(transaction=False)
        pipe.lpush(keys.LATENCY, round(sample, 2))
        pipe.ltrim(keys.LATENCY, 0, 199)
        pipe.hset(keys.node(self.node_id), field, round(self.ewma[field], 2))
        pipe.exists(keys.backup_marker(m.task_id))
        backed_up = (await pipe.execute())[-1]
        if fields.backup_of or backed_up:
            # a task with a backup copy: whichever copy is first, the others stop
            control = {"type": "drop_copies", "job_id": fields.job, "index": fields.index, "winner": m.task_id}
            await self.gw.r.publish(keys.CONTROL, json.dumps(control))

    async def _failed(self, m: TaskFailed) -> None:
        held = self.held.pop(m.task_id, None)
        if held is None:
            if m.task_id not in self.given_back:
                await self.refuse(ErrorCode.UNKNOWN_TASK, f"task {m.task_id} is not held by this connection")
            return
        fields = held.fields
        log.warning(
            "node %s: task %s (job %s #%d) failed: %s",
            self.node_id,
            m.task_id,
            fields.job,
            fields.index,
            m.message[:200],
        )
        await self.gw.r.hincrby(keys.node(self.node_id), "failed", 1)
        if fields.attempt + 1 < MAX_TASK_ATTEMPTS:
            await self.gw.requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, 1, m.task_id])
            return
        # the scheduler owns job states: ask it to fail the job
        await self.gw.drop_task(m.task_id)
        reason = f"subtask {fields.index} failed {MAX_TASK_ATTEMPTS} times; last error: {m.message[:500]}"
        await self.gw.r.xadd(
            keys.COMMANDS, {"command": json.dumps({"type": "fail", "job_id": fields.job, "reason": reason})}
        )

    # ------------------------------------------------------------------ dispatch

    def assignments(self) -> int:
        """Tasks this node holds, a task of several parts counting once (as in `ready.free`)."""
        return len({h.group for h in self.held.values()})

    def parts_for(self, kind: str) -> int:
        return parts_per_task(self.ewma.get(f"ewma_ms:{kind}"), self.gw.settings.target_task_s)

    async def _dispatch(self) -> None:
        r = self.gw.r
        while True:
            await self.wake.wait()
            while self.want > 0 and not self.closing:
                await self._unpark()
                if self.want <= 0:
                    break
                resp = await r.xreadgroup(
                    keys.NODES_GROUP, self.consumer, {keys.TASKS: ">"}, count=self.want, block=1000
                )
                entries = [(eid.decode(), TaskFields.from_redis(raw)) for _s, es in resp or [] for eid, raw in es]
                for task_id, fields in entries:
                    await self._assign(task_id, fields)
            self.wake.clear()

    async def _unpark(self) -> None:
        """Take parked replicated copies this node may run (it has neither run nor holds
        their subtask): they go before the stream."""
        r = self.gw.r
        ids = [i.decode() for i in await r.srandmember(keys.PARKED, UNPARK_LOOK) or []]
        if not ids:
            return
        pipe = r.pipeline(transaction=False)
        for task_id in ids:
            pipe.xrange(keys.TASKS, task_id, task_id)
        found = [
            (tid, TaskFields.from_redis(es[0][1])) for tid, es in zip(ids, await pipe.execute(), strict=True) if es
        ]
        if gone := set(ids) - {tid for tid, _ in found}:
            await r.srem(keys.PARKED, *gone)
        pipe = r.pipeline(transaction=False)
        for _tid, fields in found:
            pipe.sismember(keys.job_returned(fields.job, fields.index), self.node_id)
        returned = await pipe.execute() if found else []
        for (task_id, fields), ran in zip(found, returned, strict=True):
            if self.want <= 0:
                return
            if ran or self._holds(fields):
                continue
            if await r.srem(keys.PARKED, task_id) != 1:
                continue  # another node took it first
            if await r.xclaim(keys.TASKS, keys.NODES_GROUP, self.consumer, 0, [task_id]):
                await self._assign(task_id, fields)

    def _holds(self, fields: TaskFields) -> bool:
        return any(h.fields.job == fields.job and h.fields.index == fields.index for h in self.held.values())

    async def _holds_or_returned(self, fields: TaskFields) -> bool:
        if self._holds(fields):
            return True
        return bool(await self.gw.r.sismember(keys.job_returned(fields.job, fields.index), self.node_id))

    async def _usable(self, task_id: str, fields: TaskFields) -> bool:
        """Drop what must not run here (job over; a backup for its own straggler, or whose
        original is in); False if the task is not to be sent."""
        if await self.gw.job_is_over(fields.job):
            await self.gw.drop_task(task_id)
            return False
        if fields.backup_of and (
            fields.backup_of == self.node_id or await self.gw.r.sismember(keys.job_done(fields.job), fields.index)
        ):
            await self.gw.drop_task(task_id)
            return False
        if fields.replicated:
            return await self._may_replicate(task_id, fields)
        return True

    async def _may_replicate(self, task_id: str, fields: TaskFields) -> bool:
        """A copy of a replicated subtask goes only to a node that has neither returned nor
        holds a copy of it. If no other live node could take it: with at most one valid
        result (vote), the aggregator is told to accept that one (`decide`); with a tie, the
        copy waits for a node. A rejected result leaves its node returned, but not a voter."""
        r = self.gw.r
        if await r.sismember(keys.job_done(fields.job), fields.index):
            await self.gw.drop_task(task_id)
            return False
        if not await self._holds_or_returned(fields):
            return True
        pipe = r.pipeline(transaction=False)
        pipe.smembers(keys.job_returned(fields.job, fields.index))
        pipe.hlen(keys.job_votes(fields.job, fields.index))
        pipe.zrangebyscore(keys.NODES, live_since(self.gw.settings.node_timeout_s), "+inf")
        returned, votes, conns = await pipe.execute()
        if node_ids(conns) - {n.decode() for n in returned} - {self.node_id} or votes >= 2:
            # park it (pending for a consumer that never reads) until a node that may run it
            # asks for work: at the stream's end it would wait for everything else
            await r.xclaim(keys.TASKS, keys.NODES_GROUP, keys.PARKED_CONSUMER, 0, [task_id])
            await r.sadd(keys.PARKED, task_id)
            return False
        await self._hand_over(task_id, fields, b"", 0, decide=1)
        return False

    async def _hand_over(
        self,
        task_id: str,
        fields: TaskFields,
        output: bytes,
        elapsed_ms: float,
        *,
        returned: bool = False,
        **extra: object,
    ) -> None:
        """Move a task entry into the results stream as this node's result (HANDOVER_LUA);
        `returned` also records the node in the subtask's `keys.job_returned`."""
        entry = {**fields.to_redis(), "node": self.node_id, "output": output, "elapsed_ms": elapsed_ms, **extra}
        flat: list[object] = [x for kv in entry.items() for x in kv]
        marker = self.node_id if returned else ""
        await self.gw.handover(
            keys=[keys.TASKS, keys.RESULTS, keys.job_returned(fields.job, fields.index)],
            args=[keys.NODES_GROUP, task_id, marker, RETURNED_TTL_S, *flat],
        )

    async def _assign(self, task_id: str, fields: TaskFields) -> None:
        if not await self._usable(task_id, fields):
            return
        module = self.gw.modules.by_sha.get(fields.module)
        if module is not None and self.simd:
            # a node with SIMD128 gets the SIMD build where there is one (same bytes out)
            module = self.gw.modules.by_name.get(f"{module.name}_simd", module)
        if module is None:
            log.error("task %s needs unknown module %s; requeueing", task_id, fields.module)
            await self.gw.requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, 1, task_id])
            return
        parts = [(task_id, fields)]
        others: list[tuple[str, TaskFields]] = []
        plugin = PLUGINS.get(fields.kind)
        adaptive = (
            plugin is not None and plugin.adaptive and self.multipart and not fields.backup_of and not fields.replicated
        )
        wanted = self.parts_for(fields.kind) if adaptive else 1
        if wanted > 1:
            # the next entries of the same job become further parts of this task
            resp = await self.gw.r.xreadgroup(
                keys.NODES_GROUP, self.consumer, {keys.TASKS: ">"}, count=wanted - 1, block=None
            )
            for _s, es in resp or []:
                for eid, raw in es:
                    extra = TaskFields.from_redis(raw)
                    same = (
                        extra.job == fields.job
                        and extra.module == fields.module
                        and not (extra.backup_of or extra.replicated)
                    )
                    (parts if same else others).append((eid.decode(), extra))
        group = next(self._groups)
        now = time.monotonic()
        for tid, f in parts:
            self.held[tid] = Held(f, now, group)
        self.want -= 1
        (first_id, first), rest = parts[0], parts[1:]
        await self.send(
            TaskAssign(
                task_id=first_id,
                job_id=first.job,
                kind=first.kind,
                module_sha256=module.sha256,
                module_url=module.url,
                input_b64=base64.b64encode(first.input).decode(),
                blocks=list(first.blocks),
                more=[
                    TaskPart(task_id=tid, input_b64=base64.b64encode(f.input).decode(), blocks=list(f.blocks))
                    for tid, f in rest
                ],
            )
        )
        if rest:
            await self.gw.r.hincrby(keys.STATS, "parts_bundled", len(rest))
        for tid, f in others:  # read along with the parts but of another job
            if self.want > 0:
                await self._assign(tid, f)
            else:
                await self.gw.requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, 0, tid])

    async def give_back(self, count: int) -> None:
        """Requeue up to `count` of the task entries this node has not started, for idle
        nodes: it runs its tasks in the order sent, `slots` at a time, and a task's parts one
        after the other, so all but the first unreported part of its first `slots` tasks
        and everything of later tasks is still waiting."""
        groups: dict[int, list[str]] = {}
        for tid, h in self.held.items():
            groups.setdefault(h.group, []).append(tid)
        waiting: list[str] = []
        for n, group in enumerate(sorted(groups)):
            ids = groups[group]
            waiting += ids if n >= self.slots else ids[1:]
        # a replicated copy may be meant for this very node (the others ran the first one)
        waiting = [tid for tid in waiting if not self.held[tid].fields.replicated]
        ids = waiting[-count:] if count > 0 else []
        if not ids:
            return
        for tid in ids:
            self.held.pop(tid, None)
            self._forget(tid)
        await self.send(CancelTasks(task_ids=ids))
        n = await self.gw.requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, 0, *ids])
        await self.gw.r.hincrby(keys.STATS, "tasks_stolen", int(n))
        log.info("node %s: gave back %d waiting tasks for idle nodes", self.node_id, int(n))

    def _forget(self, task_id: str) -> None:
        self.given_back[task_id] = None
        while len(self.given_back) > GIVEN_BACK_KEPT:
            del self.given_back[next(iter(self.given_back))]

    async def drop_copies(self, job_id: str, index: int, winner: str) -> None:
        """Another copy of task `index` delivered its result first: stop ours."""
        ids = [
            tid for tid, h in self.held.items() if h.fields.job == job_id and h.fields.index == index and tid != winner
        ]
        for tid in ids:
            self.held.pop(tid, None)
            self._forget(tid)
            await self.gw.drop_task(tid)
        if ids:
            await self.gw.r.hincrby(keys.STATS, "copies_cancelled", len(ids))
            await self.send(CancelTasks(task_ids=ids))

    async def cancel_job(self, job_id: str) -> None:
        ids = [tid for tid, h in self.held.items() if h.fields.job == job_id]
        for tid in ids:
            self.held.pop(tid, None)
            await self.gw.drop_task(tid)
        if ids:
            await self.send(CancelTasks(task_ids=ids))
