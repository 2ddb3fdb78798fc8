"""`NodeState`: every decision a node makes about its tasks, with no I/O.

The shape of dask/distributed's `WorkerState.handle_stimulus(*events) -> Instructions`: the
I/O layer (`worker/node.py`) feeds an `Event` (a socket opened, a frame arrived, a part
finished or failed, the heartbeat timer fired, the socket closed) to `NodeState.handle` and
carries out the `Instruction`s it returns, in order: send a frame, start running a part, stop
a running part. `tests/node_cases.json` is the behaviour table of this class; the browser
agent's `static/js/node_state.js` runs the same table.

The rules:

- A task is a queue of parts (`TaskAssign` and its `more`). A task waits in `queue` until a
  slot is free (`running` holds up to `slots` tasks); its parts then run one after the other
  in that slot, each reported (`result` / `task_failed`) as soon as it is done. Every part
  starts with the task's limits (`deadline_s`, `memory_mb`); the executor enforces them.
- `ready.free` is absolute: `slots + prefetch - queued - running` tasks, sent only when it is
  above zero and differs from the last one sent. A task assignment makes the last one stale
  (the gateway counted the task against it).
- Reports made while the node is not welcomed (socket down, or open but before `welcome`)
  wait in `outbox` and are sent right after the next `welcome`. `hello.running` lists the
  parts still held: running, waiting, and in the outbox.
- `cancel` drops parts: a waiting part is skipped, the running one is stopped (and the
  task's next part starts in its slot), a report in the outbox is dropped; unknown ids are
  ignored. A task with no part left frees its slot at once.
- A part id already held (an assignment repeated after a reconnect) is ignored; a task of
  only repeated parts is dropped, and `ready` is sent again (the gateway counted it).
- `done`/`failed` of a part that is not running (stopped by a cancel) is ignored.
- Reports travel several to a frame (`results`) when the gateway's `welcome` says how many
  it takes (`results_per_frame`): a report is held in `batch` while the node is busy with
  more parts, and the batch is sent at once when a `ready` is due (a task ended), when no
  part runs any more, when it is full (items, or the gateway's frame limit), or when the
  timer the first held report asked for (`Hold`, at most `RESULTS_HOLD_MS`) fires (`Flush`).
  So a lone or big task's result is never delayed by more than that, and trivial parts go
  many to a frame. A batch of one goes as a plain `result`/`task_failed` frame.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field
from typing import TypeAlias

from ..shared.protocol import (
    MAX_RESULTS_PER_FRAME,
    Base64Text,
    CancelTasks,
    Heartbeat,
    Hello,
    Leave,
    Ready,
    Results,
    ServerMessage,
    TaskAssign,
    TaskFailed,
    TaskPart,
    TaskResult,
    Welcome,
    frame_chars,
    pack_reports,
    result_too_large,
)

MAX_LISTED = 1024  # protocol caps: Hello.running, Ready.free, Heartbeat.running
MAX_FRAME_CHARS = 1 << 24  # a `results` frame's size when the gateway names no limit
RESULTS_HOLD_MS = 10  # a report waits at most this long for others to share its frame

Report: TypeAlias = TaskResult | TaskFailed
Outgoing: TypeAlias = Hello | Ready | Heartbeat | TaskResult | TaskFailed | Results | Leave


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Connected:
    """A new socket is open (before `welcome`)."""


@dataclass(frozen=True)
class Received:
    """A validated frame from the gateway."""

    message: ServerMessage


@dataclass(frozen=True)
class PartDone:
    task_id: str
    output: bytes
    elapsed_ms: float


@dataclass(frozen=True)
class PartFailed:
    task_id: str
    message: str


@dataclass(frozen=True)
class Tick:
    """The heartbeat timer fired."""


@dataclass(frozen=True)
class Disconnected:
    """The socket is gone."""


@dataclass(frozen=True)
class Flush:
    """The timer a `Hold` asked for fired: send the held reports."""


@dataclass(frozen=True)
class Undelivered:
    """A report (or several) handed out in a `Send` could not be written (the socket closed under it)."""

    message: Report | Results


Event: TypeAlias = Connected | Received | PartDone | PartFailed | Tick | Flush | Disconnected | Undelivered


# ---------------------------------------------------------------------------- instructions


@dataclass(frozen=True)
class Send:
    message: Outgoing


@dataclass(frozen=True)
class Start:
    """Run one part: fetch the module, assemble the input, execute; then `PartDone` or
    `PartFailed` with its id."""

    task_id: str
    job_id: str
    kind: str
    module_sha256: str
    module_url: str
    input_b64: str
    blocks: tuple[str, ...]
    #: the task's limits (`TaskAssign.deadline_s`, `.memory_mb`); None: the executor's own
    deadline_s: float | None = None
    memory_mb: int | None = None


@dataclass(frozen=True)
class Stop:
    """Abort the running part `task_id` (its result, if any, is not wanted)."""

    task_id: str


@dataclass(frozen=True)
class Hold:
    """Feed `Flush` in `ms` milliseconds (reports are held for company meanwhile)."""

    ms: int


Instruction: TypeAlias = Send | Start | Stop | Hold


# ---------------------------------------------------------------------------- state


@dataclass(eq=False)
class Work:
    """One task on this node: its parts not yet started, and the one running."""

    #: the first part's id (names the task)
    key: str
    job_id: str
    kind: str
    module_sha256: str
    module_url: str
    #: parts not started yet, in order
    waiting: deque[TaskPart]
    #: the part running now (None while queued, or between parts)
    current: str | None = None
    #: limits every part of the task runs under (None: the executor's own)
    deadline_s: float | None = None
    memory_mb: int | None = None

    def held(self) -> list[str]:
        return ([self.current] if self.current else []) + [p.task_id for p in self.waiting]


@dataclass
class NodeState:
    """A node's tasks and what it owes the gateway. `handle` is the only mutator."""

    slots: int = 1
    prefetch: int = 0
    #: the gateway's frame limit (`Welcome.max_message_bytes`): a bigger result is a failure
    max_message_bytes: int | None = None
    #: reports the gateway takes in one `results` frame (`Welcome.results_per_frame`); None: one
    results_per_frame: int | None = None
    #: a socket is open and the gateway said `welcome` on it: frames may be sent
    welcomed: bool = False
    #: tasks waiting for a slot, oldest first
    queue: deque[Work] = field(default_factory=deque)
    #: tasks holding a slot (at most `slots` of them, unless `welcome` lowered `slots`)
    running: list[Work] = field(default_factory=list)
    #: part id -> report made while not welcomed, sent after the next `welcome`
    outbox: dict[str, Report] = field(default_factory=dict)
    #: reports made while welcomed, held to share one `results` frame
    batch: list[Report] = field(default_factory=list)
    #: the `free` of the last `ready` sent on this connection (-1: none, or made stale)
    last_ready: int = -1
    #: parts completed / failed since start
    done: int = 0
    failed: int = 0

    @property
    def free(self) -> int:
        return max(0, self.slots + self.prefetch - len(self.queue) - len(self.running))

    def held(self) -> list[str]:
        """Part ids this node still holds: running and waiting parts, then unsent reports."""
        ids = [tid for w in (*self.running, *self.queue) for tid in w.held()]
        return list(dict.fromkeys([*ids, *(r.task_id for r in self.batch), *self.outbox]))[:MAX_LISTED]

    def running_parts(self) -> list[str]:
        return [w.current for w in self.running if w.current is not None]

    # ------------------------------------------------------------------ the one entry point

    def handle(self, event: Event) -> list[Instruction]:
        """Take in one event; return what to do, in order."""
        if isinstance(event, Connected):
            self._unsent()
            self.last_ready = -1
            return [Send(Hello(running=self.held()))]
        if isinstance(event, Received):
            return self._received(event.message)
        if isinstance(event, PartDone):
            output_b64 = Base64Text(base64.b64encode(event.output).decode(), event.output)  # not decoded again
            if (too_large := result_too_large(len(output_b64), self.max_message_bytes)) is not None:
                return self._finished(event.task_id, TaskFailed(task_id=event.task_id, message=too_large))
            return self._finished(
                event.task_id,
                TaskResult(task_id=event.task_id, output_b64=output_b64, elapsed_ms=max(0.0, event.elapsed_ms)),
            )
        if isinstance(event, PartFailed):
            return self._finished(event.task_id, TaskFailed(task_id=event.task_id, message=event.message[:2000]))
        if isinstance(event, Tick):
            if not self.welcomed:
                return []
            return [Send(Heartbeat(running=min(len(self.running), MAX_LISTED), done=self.done))]
        if isinstance(event, Flush):
            return self._flush()
        if isinstance(event, Disconnected):
            self._unsent()
            self.last_ready = -1
            return []
        if isinstance(event, Undelivered):
            for report in event.message.items if isinstance(event.message, Results) else [event.message]:
                self.outbox[report.task_id] = report
            return []
        raise TypeError(f"expected a node event, got {event!r}")

    # ------------------------------------------------------------------ frames

    def _received(self, m: ServerMessage) -> list[Instruction]:
        out: list[Instruction] = []
        if isinstance(m, Welcome):
            self.welcomed = True
            self.slots, self.prefetch = m.slots, m.prefetch
            self.max_message_bytes = m.max_message_bytes
            self.results_per_frame = m.results_per_frame
            reports = list(self.outbox.values())
            out += [Send(frame) for frame in pack_reports(reports, self._per_frame(), self._cap())]
            self.outbox.clear()
            self.last_ready = -1
            out += self._pump()
            out += self._ready()
        elif isinstance(m, TaskAssign):
            self.last_ready = -1  # the gateway counted this task against our last Ready
            work = self._take(m)
            if work is None:
                out += self._ready()
            else:
                self.queue.append(work)
                out += self._pump()
        elif isinstance(m, CancelTasks):
            out += self._cancel(set(m.task_ids))
            out += self._pump()
            out += self._ready()
        # TokenRefresh is the I/O layer's business; ErrorMessage (e.g. unknown_task after a
        # reconnect: the gateway gave the task away) changes nothing here.
        return out

    def _take(self, m: TaskAssign) -> Work | None:
        held = set(self.held()) | set(self.outbox)
        parts: list[TaskPart] = []
        for p in (TaskPart(task_id=m.task_id, input_b64=m.input_b64, blocks=m.blocks), *m.more):
            if p.task_id not in held:
                held.add(p.task_id)
                parts.append(p)
        if not parts:
            return None
        return Work(
            parts[0].task_id,
            m.job_id,
            m.kind,
            m.module_sha256,
            m.module_url,
            deque(parts),
            deadline_s=m.deadline_s,
            memory_mb=m.memory_mb,
        )

    def _cancel(self, ids: set[str]) -> list[Instruction]:
        for task_id in ids:
            self.outbox.pop(task_id, None)
        self.batch = [r for r in self.batch if r.task_id not in ids]
        for work in (*self.running, *self.queue):
            work.waiting = deque(p for p in work.waiting if p.task_id not in ids)
        self.queue = deque(w for w in self.queue if w.waiting)
        out: list[Instruction] = []
        for work in list(self.running):
            if work.current is not None and work.current in ids:
                out.append(Stop(work.current))
                work.current = None
                out += self._advance(work)
        return out

    # ------------------------------------------------------------------ parts

    def _finished(self, task_id: str, report: Report) -> list[Instruction]:
        work = next((w for w in self.running if w.current == task_id), None)
        if work is None:
            return []  # stopped by a cancel, or never ours
        work.current = None
        if isinstance(report, TaskResult):
            self.done += 1
        else:
            self.failed += 1
        out: list[Instruction] = []
        if not self.welcomed:
            self.outbox[task_id] = report
        elif self._per_frame() <= 1:
            out.append(Send(report))
        else:
            if self.batch and frame_chars([*self.batch, report]) > self._cap():
                out += self._flush()  # it would not fit beside them
            self.batch.append(report)
        after = self._advance(work)
        ready: list[Instruction] = []
        if work not in self.running:  # its last part: the slot is free
            after += self._pump()
            ready = self._ready()
        if self.batch:
            if ready or not self.running_parts() or len(self.batch) >= self._per_frame():
                out += self._flush()  # before the ready: the gateway counts the tasks by their reports
            elif len(self.batch) == 1:
                after.append(Hold(RESULTS_HOLD_MS))
        return out + after + ready

    # ------------------------------------------------------------------ several reports to a frame

    def _per_frame(self) -> int:
        return min(self.results_per_frame or 1, MAX_RESULTS_PER_FRAME)

    def _cap(self) -> int:
        return self.max_message_bytes if self.max_message_bytes is not None else MAX_FRAME_CHARS

    def _flush(self) -> list[Instruction]:
        """The held reports, as one frame."""
        batch, self.batch = self.batch, []
        return [Send(frame) for frame in pack_reports(batch, self._per_frame(), self._cap())]

    def _unsent(self) -> None:
        """The socket is gone (or new): held reports wait in the outbox for the next welcome."""
        self.welcomed = False
        for report in self.batch:
            self.outbox[report.task_id] = report
        self.batch = []

    def _advance(self, work: Work) -> list[Instruction]:
        """Start `work`'s next part in its slot, or end the task (freeing the slot)."""
        if not work.waiting:
            self.running.remove(work)
            return []
        part = work.waiting.popleft()
        work.current = part.task_id
        return [self._start(work, part)]

    def _pump(self) -> list[Instruction]:
        out: list[Instruction] = []
        while self.queue and len(self.running) < self.slots:
            work = self.queue.popleft()
            self.running.append(work)
            out += self._advance(work)
        return out

    @staticmethod
    def _start(work: Work, part: TaskPart) -> Start:
        return Start(
            task_id=part.task_id,
            job_id=work.job_id,
            kind=work.kind,
            module_sha256=work.module_sha256,
            module_url=work.module_url,
            input_b64=part.input_b64,
            blocks=tuple(part.blocks),
            deadline_s=work.deadline_s,
            memory_mb=work.memory_mb,
        )

    def _ready(self) -> list[Instruction]:
        free = self.free
        if not self.welcomed or free <= 0 or free == self.last_ready:
            return []
        self.last_ready = free
        return [Send(Ready(free=min(free, MAX_LISTED)))]
