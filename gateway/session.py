"""One node's WebSocket connection: frames in -> decisions (`shared/core/dispatch.py`) ->
store (`shared/store/gateway.py`); frames out.

Invariant: what this connection holds (sent to the node, and `spare`: entries read along with
a task's parts that could not join it, kept in stream order for the node's next `ready`
rather than requeued behind later work) is exactly the pending entries of its stream consumer
(`queue.consumer_name(node, connection)`); on close every one of them is requeued at once,
and a silent node (no frame for `node_timeout_s`) is closed, which does the same.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..shared.capacity import EWMA_PREFIX
from ..shared.core import dispatch
from ..shared.core.dispatch import Held
from ..shared.core.failures import FailureOutcome
from ..shared.logs import safe_text
from ..shared.modules import Module, ModuleRegistry
from ..shared.protocol import (
    MULTIPART_SINCE,
    AgentLog,
    CancelTasks,
    CloseCode,
    ErrorCode,
    ErrorMessage,
    Heartbeat,
    Hello,
    Leave,
    Ready,
    TaskFailed,
    TaskResult,
    TokenRefresh,
)
from ..shared.queue import TaskFields, consumer_name
from ..shared.settings import Settings
from ..shared.store.gateway import GatewayStore
from ..shared.store.handover import Handovers
from ..shared.tasks import PLUGINS
from . import agent_log, failures
from .auth import TokenSigner
from .frames import NodeFrame, Refusal, Reports, parse_frame, task_frame, welcome
from .metrics import GatewayMetrics
from .results import take_results
from .screening import usable

log = logging.getLogger(__name__)

UNPARK_LOOK = 16  # parked copies a dispatch looks at
READ_BLOCK_MS = 1000  # how long a dispatch waits for new entries before it looks again
BENCH_LOOK_S = 1.0  # how often a benched node's dispatch looks whether its bench is over
BACKPRESSURE_LOOK_S = 0.05  # how often a dispatch held back by waiting results looks again
SPARE_KEEP_S = 1.0  # entries read along with a task's parts wait this long for the node's next `ready`


class NodeSession:
    """One connection of one node. The hub (`gateway/hub.py`) calls `give_back`,
    `drop_copies`, `cancel_job` and `close` on control messages."""

    def __init__(
        self,
        ws: WebSocket,
        node_id: str,
        slots: int,
        *,
        store: GatewayStore,
        settings: Settings,
        modules: ModuleRegistry,
        metrics: GatewayMetrics,
        signer: TokenSigner,
        voter: str = "",
    ) -> None:
        self.ws = ws
        self.node_id = node_id
        #: who this node is for replicated subtasks (`dispatch.voter_key`): its address, or itself
        self.voter = voter or node_id
        self.store = store
        self.settings = settings
        self.modules = modules
        self.metrics = metrics
        self.signer = signer
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
        self.dropped = False  # the node went away without leaving (counted per held subtask)
        self._send_lock = asyncio.Lock()
        self.ewma: dict[str, float] = {}  # "ewma_ms:<kind>" -> observed task time
        self.peak: dict[str, float] = {}  # kind -> slowest recent part time (`dispatch.peak`)
        self.handovers = Handovers(store.r)
        self.simd = False
        self.multipart = False
        self.given_back: dict[str, None] = {}  # recent tasks taken back (stolen, or another copy won)
        self.spare: list[tuple[str, TaskFields]] = []  # read, not sent: served first (see the invariant)
        self.spare_since = 0.0
        self.said_ready = False  # recorded once as `ready` (`core.replication.said_ready`)

    # ------------------------------------------------------------------ frames out

    async def send(self, message: object) -> None:
        text = message.model_dump_json()  # type: ignore[attr-defined]
        async with self._send_lock:
            if self.ws.application_state is WebSocketState.CONNECTED:
                await self.ws.send_text(text)

    async def refuse(self, code: ErrorCode, message: str) -> None:
        self.metrics.messages_rejected.labels(code.value).inc()
        log.info("node %s: refused a frame (%s): %s", self.node_id, code.value, safe_text(message, 500))
        await self.send(ErrorMessage(code=code, message=message))

    async def close(self, code: int, reason: str) -> None:
        self.closing = True
        async with self._send_lock:
            if self.ws.application_state is WebSocketState.CONNECTED:
                await self.ws.close(code, reason)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        await self._touch(state="connected", voter=self.voter)
        known = await self.store.node(self.node_id)  # a reconnect keeps the node's speed record
        self.simd = known.get(b"simd") == b"1"
        self.ewma = {k.decode(): float(v) for k, v in known.items() if k.startswith(EWMA_PREFIX) and v}
        helpers = [
            asyncio.create_task(self._dispatch(), name=f"dispatch-{self.consumer}"),
            asyncio.create_task(self._watchdog(), name=f"watchdog-{self.consumer}"),
        ]
        try:
            await self.send(welcome(self.node_id, self.slots, self.settings))
            await self._receive_loop()
        finally:
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self.dropped:
                await failures.on_drop(self.store, self.node_id, [h.fields for h in self.held.values()])
            await self._release()
            await self.store.node_left(self.node_id)
            log.info("node %s: connection %s closed, %d tasks done", self.node_id, self.connection, self.done)

    async def _release(self) -> None:
        """Requeue everything this connection holds (`GatewayStore.release`)."""
        try:
            n = await self.store.release(self.consumer)
            if n:
                log.info("node %s: requeued %d tasks at once", self.node_id, n)
        except Exception:  # the scheduler's reaper requeues whatever we could not
            log.exception("node %s: cleanup failed; the reaper will requeue its tasks", self.node_id)

    async def _touch(self, **extra: str | int | float) -> None:
        await self.store.touch(self.node_id, self.consumer, self.connection, **extra)

    async def _watchdog(self) -> None:
        timeout = self.settings.node_timeout_s
        refresh_every = self.settings.token_ttl_s / 2
        next_refresh = time.monotonic() + refresh_every
        last_touch = 0.0
        while True:
            # wake only when something is due (silence, the next touch, a token refresh):
            # about once a second per connection, not four times (bench/simnodes.py)
            due = min(self.last_seen + timeout, last_touch + 1.0, next_refresh)
            await asyncio.sleep(max(0.01, due - time.monotonic()))
            now = time.monotonic()
            if now - self.last_seen > timeout:
                log.warning("node %s: silent for %.1fs; closing", self.node_id, now - self.last_seen)
                self.dropped = True
                await self.close(CloseCode.SILENT, "no heartbeat")
                return
            if self.spare and now - self.spare_since >= SPARE_KEEP_S:
                await self._requeue_spare(len(self.spare))  # not taken soon (busy, or benched): others may
            if now - last_touch >= 1.0:
                # the connection's liveness in Redis: the scheduler's reaper acts on it only
                # if this gateway itself dies (we close silent nodes ourselves)
                await self._touch()
                last_touch = now
            if now > next_refresh:
                token, expires = self.signer.issue(self.node_id)
                await self.send(TokenRefresh(token=token, token_expires_at=expires))
                next_refresh = now + refresh_every

    # ------------------------------------------------------------------ frames in

    async def _receive_loop(self) -> None:
        while not self.closing:
            try:
                msg = await self.ws.receive()
            except WebSocketDisconnect:
                self.dropped = not self.closing
                return
            if msg["type"] == "websocket.disconnect":
                self.dropped = not self.closing
                return
            self.last_seen = time.monotonic()
            frame = parse_frame(msg.get("text"), self.settings.max_message_bytes, msg.get("bytes"))
            if isinstance(frame, Refusal):
                await self.refuse(frame.code, frame.message)
                if frame.close:
                    await self.close(CloseCode.TOO_BIG, "frame too large")
                    return
                continue
            await self._handle(frame)

    async def _handle(self, m: NodeFrame | Reports) -> None:
        match m:
            case Reports():  # several reports: each taken on its own
                for refusal in m.refused:
                    await self.refuse(refusal.code, refusal.message)
                await take_results(self, [r for r in m.items if isinstance(r, TaskResult)])
                for failed in m.items:
                    if isinstance(failed, TaskFailed):
                        await self._failed(failed)
            case Ready():
                await self._mark_ready()
                self.want = dispatch.want_after_ready(
                    free=m.free,
                    slots=self.slots,
                    prefetch=self.settings.prefetch,
                    assigned=dispatch.assignments(self.held),
                )
                if self.want:
                    self.wake.set()
            case TaskResult():
                await take_results(self, [m])
            case Heartbeat():
                await self._touch(running=m.running, done=m.done)
            case TaskFailed():
                await self._failed(m)
            case Hello():
                self.multipart = m.protocol >= MULTIPART_SINCE  # an older agent gets one part per task
                if m.running:  # back after a reconnect, busy: it says `ready` only once a slot frees
                    await self._mark_ready()
                if unknown := dispatch.unknown_running(self.held, m.running):
                    await self.send(CancelTasks(task_ids=unknown))
            case Leave():
                await self.close(CloseCode.NORMAL, "left")
            case AgentLog():  # a notable event on the node, for the controller's log
                await agent_log.AGENT_LOGS.receive(self.store, self.node_id, m)

    async def _mark_ready(self) -> None:
        """From now on the node counts as a taker and a voter (`core.replication.said_ready`)."""
        if not self.said_ready:
            self.said_ready = True
            await self._touch(ready=self.connection)

    async def _failed(self, m: TaskFailed) -> None:
        held = self.held.pop(m.task_id, None)
        if held is None:
            if m.task_id not in self.given_back:
                await self.refuse(ErrorCode.UNKNOWN_TASK, f"task {m.task_id} is not held by this connection")
            return
        # evidence about this node (logged there); the job fails only once two distinct nodes agree
        outcome = await failures.on_failure(
            self.store, self.settings, self.node_id, held.fields, m.message, self.voter, task_id=m.task_id
        )
        if outcome is FailureOutcome.FAIL_JOB:
            await self.store.drop(m.task_id)  # the scheduler fails the job
        else:  # for another node: `screening.usable` parks it when this node reads it again
            await self.store.requeue([m.task_id], bump=1)

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self) -> None:
        while True:
            await self.wake.wait()
            while self.want > 0 and not self.closing:
                await self._unpark()  # a benched node may still confirm (or fail) a parked copy
                if self.want <= 0:
                    break
                if await self.store.failures.benched(self.node_id):  # its failures stood out: no new tasks
                    await asyncio.sleep(BENCH_LOOK_S)
                    continue
                while self.spare and self.want > 0:  # read before anything still in the stream
                    await self._assign(*self.spare.pop(0))
                if self.want <= 0:
                    break
                if await self.store.results_waiting() >= self.settings.results_backlog:
                    # the aggregators are behind: more results would only queue (in Redis), and a
                    # later job of higher priority would wait behind them
                    await asyncio.sleep(BACKPRESSURE_LOOK_S)
                    continue
                for task_id, fields in await self.store.read(self.consumer, self.want, block_ms=READ_BLOCK_MS):
                    await self._assign_or_keep(task_id, fields)
            self.wake.clear()

    async def _unpark(self) -> None:
        """Take parked copies this node may run (it has neither run nor holds their
        subtask): they go before the stream."""
        found = await self.store.parked(UNPARK_LOOK)
        returned = await self.store.returned_flags(self.voter, [f for _tid, f in found], self.node_id)
        for (task_id, fields), ran in zip(found, returned, strict=True):
            if self.want <= 0:
                return
            if not dispatch.may_take_replica(
                holds=dispatch.holds(self.held, fields.job, fields.index), returned_here=ran
            ):
                continue
            if await self.store.unpark(task_id, self.consumer):
                await self._assign(task_id, fields)

    async def _assign(self, task_id: str, fields: TaskFields) -> None:
        if not await usable(self, task_id, fields):
            return
        module = dispatch.pick_module(self.modules.by_sha, self.modules.by_name, fields.module, simd=self.simd)
        if module is None and await self.store.module_stored(fields.module):
            module = Module.uploaded(fields.module)  # a job's own module: nodes fetch it from Redis through us
        if module is None:
            log.error("task %s needs unknown module %s; requeueing", task_id, fields.module)
            await self.store.requeue([task_id], bump=1)
            return
        parts = [(task_id, fields)]
        others: list[tuple[str, TaskFields]] = []
        plugin = PLUGINS.get(fields.kind)
        wanted = dispatch.parts_wanted(
            fields,
            adaptive=plugin is not None and plugin.adaptive,
            multipart=self.multipart,
            part_ms=self.ewma.get(EWMA_PREFIX.decode() + fields.kind),
            target_task_s=self.settings.target_task_s,
            peak_ms=self.peak.get(fields.kind),
            small_task_s=self.settings.small_task_ms / 1000,
        )
        if (more := wanted - 1 - len(self.spare)) > 0:
            # the next entries of the same job become further parts of this task (fewer while
            # entries of another job wait as spare: they must not pile up out of others' reach)
            for eid, extra in await self.store.read(self.consumer, more, block_ms=None):
                (parts if dispatch.bundles_with(fields, extra) else others).append((eid, extra))
        group = next(self._groups)
        now = time.monotonic()
        for tid, f in parts:
            self.held[tid] = Held(f, now, group)
        self.want -= 1
        await self.send(task_frame(parts, module))
        if len(parts) > 1:
            await self.store.count("parts_bundled", len(parts) - 1)
        for tid, f in others:  # read along with the parts but of another job (or a copy)
            await self._assign_or_keep(tid, f)

    async def _assign_or_keep(self, task_id: str, fields: TaskFields) -> None:
        """Send a task read for the node while it wants one, else keep it `spare` (requeued, it
        would go behind every later entry: a job of higher priority would wait for them)."""
        if self.want > 0:
            await self._assign(task_id, fields)
            return
        if not self.spare:
            self.spare_since = time.monotonic()
        self.spare.append((task_id, fields))

    async def _requeue_spare(self, count: int) -> int:
        """Give back up to `count` spare entries (the latest read first)."""
        ids = [tid for tid, _f in self.spare[-count:]] if count > 0 else []
        del self.spare[len(self.spare) - len(ids) :]
        return await self.store.requeue(ids, bump=0) if ids else 0

    # ------------------------------------------------------------------ control (from the hub)

    async def give_back(self, count: int) -> None:
        """Requeue up to `count` of the task entries this node has not started, for idle
        nodes (`dispatch.to_give_back` chooses them)."""
        n = await self._requeue_spare(count)  # never sent: nothing to cancel at the node
        ids = dispatch.to_give_back(self.held, slots=self.slots, count=count - n)
        for tid in ids:
            self.held.pop(tid, None)
            dispatch.remember(self.given_back, tid)
        if ids:
            await self.send(CancelTasks(task_ids=ids))
            n += await self.store.requeue(ids, bump=0)
        if not n:
            return
        await self.store.count("tasks_stolen", n)
        log.info("node %s: gave back %d waiting tasks for idle nodes", self.node_id, n)

    async def drop_copies(self, job_id: str, index: int, winner: str) -> None:
        """Another copy of task `index` delivered its result first: stop ours."""
        ids = dispatch.copies_to_drop(self.held, job_id=job_id, index=index, winner=winner)
        for tid in ids:
            self.held.pop(tid, None)
            dispatch.remember(self.given_back, tid)
            await self.store.drop(tid)
        if ids:
            await self.store.count("copies_cancelled", len(ids))
            await self.send(CancelTasks(task_ids=ids))

    async def cancel_job(self, job_id: str) -> None:
        """The job is over: stop its tasks on the node and drop their entries."""
        ids = dispatch.of_job(self.held, job_id)
        spare = [tid for tid, f in self.spare if f.job == job_id]
        self.spare = [(tid, f) for tid, f in self.spare if f.job != job_id]
        for tid in spare:
            await self.store.drop(tid)
        for tid in ids:
            self.held.pop(tid, None)
            await self.store.drop(tid)
        if ids:
            await self.send(CancelTasks(task_ids=ids))
