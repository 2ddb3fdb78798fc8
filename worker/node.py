"""`WorkerNode`: a native edge node that speaks exactly the browser agent's protocol
(`shared/protocol.py`, `static/js/agent.js`).

Life cycle: benchmark (one core, under a second, which also puts the mandelbrot module in the
module cache) -> `POST /node-report` with the join code -> `WS /ws?token=...` -> Hello ->
Welcome -> Ready{free} / TaskAssign / TaskResult ... Heartbeats every `heartbeat_interval_s`.

- `free` in Ready is absolute: `slots + prefetch - queued - running`, sent when it changes.
- A lost connection is retried with capped exponential backoff and jitter, keeping the node's
  identity; close code 4001 (token refused) first re-reports with the join code.
- 4004 (banned) and 4002 (replaced by a newer connection of the same identity) stop the
  worker for good: `Banned` / `Replaced` are raised to `main`.
- A task may have parts (`TaskAssign.more`): they run one after the other in the task's
  slot and each part's result is sent as soon as it is done (the task's checkpoints).
- Tasks survive a reconnect on this side (Hello lists their unreported parts; the gateway
  cancels those it already gave away). CancelTasks drops parts: a waiting one is skipped, a
  running one is stopped by killing its process, and the task's other parts carry on.
- SIGINT/SIGTERM: Leave, close 1000, stop the executor processes, return.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
import signal
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import websockets
from pydantic import ValidationError

from ..shared.exceptions import ConfigError
from ..shared.protocol import (
    PROTOCOL_VERSION,
    CancelTasks,
    CloseCode,
    ErrorMessage,
    Heartbeat,
    Hello,
    Leave,
    NodeAccepted,
    NodeReport,
    Ready,
    TaskAssign,
    TaskFailed,
    TaskPart,
    TaskResult,
    TokenRefresh,
    Welcome,
    server_message_adapter,
)
from .device import Identity, benchmark, claim_identity, describe
from .exceptions import Banned, JoinRefused, Replaced, TaskError
from .fetch import BlockCache, ModuleStore
from .pool import ExecutorPool
from .runtime import Limits, ModuleRunner

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 10.0
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
MAX_FRAME_BYTES = 256 * 1024 * 1024  # a task frame carries its input; the gateway caps its own side


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, decided by `main` (flags and `Settings`)."""

    join_url: str
    cores: int
    home: Path
    name: str | None = None
    limits: Limits = field(default_factory=Limits)
    run_benchmark: bool = True
    throttle: float = 1.0  # >= 1: after each task sleep (throttle - 1) x its run time (a slower device)


def parse_join_url(url: str) -> tuple[str, str]:
    """`http://host:port/agent?code=CODE` -> (`http://host:port`, `CODE`)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"expected a join link like http://HOST:PORT/agent?code=CODE, got {url!r}")
    code = parse_qs(parts.query).get("code", [""])[0]
    if not code:
        raise ConfigError(f"the join link {url!r} has no join code (?code=...): copy the link the controller printed")
    return f"{parts.scheme}://{parts.netloc}", code


def backoff_s(attempt: int) -> float:
    """Capped exponential backoff with "equal jitter" (as agent.js): never below half."""
    base: float = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(attempt, 16))
    return base / 2 + random.random() * (base / 2)


Outgoing: TypeAlias = Hello | Ready | Heartbeat | TaskResult | TaskFailed | Leave


class WorkerNode:
    def __init__(self, *, config: WorkerConfig) -> None:
        self.config = config
        self.base_url, self.join_code = parse_join_url(config.join_url)
        self.node_id = ""
        self.token = ""
        self.slots = 1
        self.prefetch = 0
        self.heartbeat_interval_s = 2.0
        self.ws_path = "/ws"
        self.score: float | None = None
        self.done = 0
        self.failed = 0
        self.pool: ExecutorPool | None = None
        self._identity: Identity | None = None
        self._http: httpx.AsyncClient | None = None
        self._modules: ModuleStore | None = None
        self._blocks: BlockCache | None = None
        self._ws: Any = None
        self._welcomed = False
        self._queue: deque[Work] = deque()
        self._running: dict[Work, asyncio.Task[None]] = {}
        self._outbox: dict[str, TaskResult | TaskFailed] = {}
        self._last_ready = -1
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ life cycle

    def stop(self) -> None:
        """Ask the worker to leave and return from `run` (safe from the loop's thread)."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Join and work until stopped (returns) or told to stop for good (`WorkerStopped`)."""
        self._identity = claim_identity(self.config.home, self.config.name)
        self.node_id = self._identity.device_id
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for s in signals:
            loop.add_signal_handler(s, self._on_signal, s)
        try:
            async with httpx.AsyncClient(timeout=30.0) as http:
                self._http = http
                self._modules = ModuleStore(directory=self.config.home / "modules", base_url=self.base_url, http=http)
                self._blocks = BlockCache(base_url=self.base_url, http=http, token=lambda: self.token)
                try:
                    await self._serve()
                finally:
                    await self._shutdown()
        finally:
            for s in signals:
                loop.remove_signal_handler(s)
            self._identity.release()

    def _on_signal(self, signum: int) -> None:
        log.info("node %s: %s received; leaving", self.node_id, signal.Signals(signum).name)
        self._stop.set()

    async def _serve(self) -> None:
        log.info(
            "node %s: worker %r joining %s with %d cores",
            self.node_id,
            self._identity.name if self._identity else "",
            self.base_url,
            self.config.cores,
        )
        if self.config.run_benchmark:
            self.score = await self._benchmark()
        attempt = 0
        need_report = True
        while not self._stop.is_set():
            if need_report:
                accepted = await self._report()
                if accepted is None:
                    return
                need_report = False
            code, reason, welcomed = await self._session()
            if self._stop.is_set():
                return
            if welcomed:
                attempt = 0
            why = f"{code} {reason}".strip() if code is not None else reason
            if code == CloseCode.BANNED:
                raise Banned(f"node {self.node_id}: banned by the controller ({why})")
            if code == CloseCode.REPLACED:
                raise Replaced(
                    f"node {self.node_id}: the same identity connected again elsewhere ({why}); "
                    "another worker uses this identity (a copied PD_HOME?)"
                )
            if code == CloseCode.BAD_TOKEN:
                need_report = True
            delay = backoff_s(attempt)
            attempt += 1
            log.warning("node %s: connection closed (%s); reconnecting in %.1fs", self.node_id, why, delay)
            await self._sleep(delay)

    async def _shutdown(self) -> None:
        self._stop.set()
        if self.pool is not None:
            self.pool.begin_close()
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()
        self._queue.clear()
        if self.pool is not None:
            await self.pool.close()
        log.info("node %s: stopped (%d tasks done, %d failed)", self.node_id, self.done, self.failed)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _unless_stopped(self, aw: Awaitable[T]) -> T | None:
        """`aw`'s result, or None (and `aw` cancelled) if the worker is stopped first."""
        task = asyncio.ensure_future(aw)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return None
        return task.result()

    # ------------------------------------------------------------------ benchmark and report

    async def _benchmark(self) -> float | None:
        assert self._http is not None and self._modules is not None
        try:
            resp = await self._http.get(f"{self.base_url}/api/modules")
            resp.raise_for_status()
            entry = resp.json().get("mandelbrot")
            if not entry:
                log.info("node %s: no mandelbrot module on the gateway; joining without a score", self.node_id)
                return None
            sha, url = str(entry["sha256"]), str(entry["url"])
            path = await self._modules.get(sha, url)
            score = await asyncio.to_thread(self._benchmark_blocking, sha, path)
        except (httpx.HTTPError, ValueError, KeyError, TaskError) as exc:
            log.warning("node %s: benchmark failed (%s); joining without a score", self.node_id, exc)
            return None
        log.info("node %s: benchmark %.1f M iterations/s per core", self.node_id, score / 1e6)
        return score

    def _benchmark_blocking(self, sha: str, path: Path) -> float:
        runner = ModuleRunner(limits=self.config.limits)
        try:
            return benchmark(runner, sha, path)
        finally:
            runner.close()

    async def _report(self) -> NodeAccepted | None:
        """Trade the join code for a session token; retry while the gateway is unreachable."""
        assert self._http is not None
        info = describe()
        report = NodeReport(
            join_code=self.join_code,
            device_id=self.node_id,
            cores=self.config.cores,
            memory_gb=info.memory_gb,
            browser=info.runtime,
            os=info.os,
            benchmark_score=self.score,
            simd=info.simd,
            kind="native",
        )
        attempt = 0
        while not self._stop.is_set():
            try:
                resp = await self._unless_stopped(
                    self._http.post(
                        f"{self.base_url}/node-report",
                        content=report.model_dump_json(),
                        headers={"content-type": "application/json"},
                    )
                )
            except httpx.HTTPError as exc:
                resp, problem = None, f"{type(exc).__name__}: {exc}"
            else:
                if resp is None:
                    return None
                problem = f"HTTP {resp.status_code}"
            if resp is not None and resp.status_code == 200:
                return self._accept(resp)
            if resp is not None and resp.status_code not in (429,) and resp.status_code < 500:
                raise self._refusal(resp)
            delay = backoff_s(attempt)
            attempt += 1
            log.warning("node %s: node report failed (%s); retrying in %.1fs", self.node_id, problem, delay)
            await self._sleep(delay)
        return None

    def _accept(self, resp: httpx.Response) -> NodeAccepted:
        try:
            accepted = NodeAccepted.model_validate_json(resp.content)
        except ValidationError as exc:
            raise JoinRefused(f"the gateway's answer to the node report is not a NodeAccepted: {exc}") from None
        if accepted.protocol != PROTOCOL_VERSION:
            raise JoinRefused(
                f"the gateway speaks protocol {accepted.protocol}, this worker {PROTOCOL_VERSION}: "
                "upgrade processdistro"
            )
        self.node_id = accepted.node_id
        self.token = accepted.token
        self.ws_path = accepted.ws_path
        self._set_capacity(accepted.slots, accepted.prefetch, accepted.heartbeat_interval_s)
        log.info("node %s: registered, %d slots, prefetch %d", self.node_id, self.slots, self.prefetch)
        return accepted

    def _refusal(self, resp: httpx.Response) -> Exception:
        try:
            body = resp.json()
            error = str(body.get("error", "")) if isinstance(body, dict) else ""
            problems = body.get("problems") if isinstance(body, dict) else None
        except ValueError:
            error, problems = resp.text[:200], None
        detail = error + (f" ({'; '.join(map(str, problems))})" if problems else "")
        if resp.status_code == 403 and "banned" in error:
            return Banned(f"node {self.node_id}: {error}")
        if resp.status_code == 403:
            return JoinRefused(f"join code refused: {detail or 'HTTP 403'}")
        return JoinRefused(f"node report refused (HTTP {resp.status_code}): {detail}")

    def _set_capacity(self, slots: int, prefetch: int, heartbeat_interval_s: float) -> None:
        self.slots = slots
        self.prefetch = prefetch
        self.heartbeat_interval_s = heartbeat_interval_s
        if self.pool is None:
            self.pool = ExecutorPool(size=slots, limits=self.config.limits)
        elif self.pool.size != slots:
            self.pool.resize(slots)

    # ------------------------------------------------------------------ the socket

    async def _session(self) -> tuple[int | None, str, bool]:
        """One connection, from connect to close: (close code, reason, whether welcomed)."""
        scheme = "wss" if self.base_url.startswith("https:") else "ws"
        url = f"{scheme}{self.base_url[self.base_url.index(':') :]}{self.ws_path}?token={quote(self.token, safe='')}"
        try:
            ws = await self._unless_stopped(
                websockets.connect(
                    url, max_size=MAX_FRAME_BYTES, open_timeout=CONNECT_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S
                )
            )
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            return None, f"cannot connect: {type(exc).__name__}: {exc}", False
        if ws is None:
            return None, "stopped", False
        self._ws = ws
        self._welcomed = False
        welcomed = False
        leaver = asyncio.create_task(self._leave_on_stop(ws))
        heartbeat: asyncio.Task[None] | None = None
        try:
            await ws.send(Hello(running=self._held()).model_dump_json())
            async for frame in ws:
                message = self._parse(frame)
                if isinstance(message, Welcome):
                    welcomed = True
                    if heartbeat is None:
                        heartbeat = asyncio.create_task(self._heartbeats())
                if message is not None:
                    await self._on_message(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._welcomed = False
            for t in (leaver, heartbeat):
                if t is not None:
                    t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
        return ws.close_code, ws.close_reason or "", welcomed

    async def _leave_on_stop(self, ws: Any) -> None:
        await self._stop.wait()
        with contextlib.suppress(Exception):
            await ws.send(Leave().model_dump_json())
            await asyncio.wait_for(ws.close(CloseCode.NORMAL, "leave"), CLOSE_TIMEOUT_S)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(max(0.1, self.heartbeat_interval_s))
            await self._send(Heartbeat(running=min(len(self._running), 1024), done=self.done))

    def _parse(self, frame: str | bytes) -> object | None:
        try:
            message: object = server_message_adapter.validate_json(frame)
            return message
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            log.warning("node %s: ignored a frame the gateway sent (%s)", self.node_id, problems)
            return None

    async def _send(self, message: Outgoing) -> bool:
        ws = self._ws
        if ws is None or not self._welcomed:
            return False
        try:
            await ws.send(message.model_dump_json())
        except websockets.ConnectionClosed:
            return False
        return True

    async def _on_message(self, m: object) -> None:
        if isinstance(m, Welcome):
            self._welcomed = True
            self.node_id = m.node_id
            self._set_capacity(m.slots, m.prefetch, m.heartbeat_interval_s)
            log.info("node %s: connected (%d slots)", self.node_id, self.slots)
            for task_id, message in list(self._outbox.items()):
                if await self._send(message):
                    self._outbox.pop(task_id, None)
            self._last_ready = -1
            self._pump()
            await self._send_ready()
        elif isinstance(m, TaskAssign):
            if m.task_id in self._outbox or m.task_id in self._held():
                return
            self._queue.append(Work.of(m))
            self._last_ready = -1  # the gateway counted this task against our last Ready
            self._pump()
        elif isinstance(m, CancelTasks):
            for task_id in m.task_ids:
                self._cancel(task_id)
            self._pump()
            await self._send_ready()
        elif isinstance(m, TokenRefresh):
            self.token = m.token
        elif isinstance(m, ErrorMessage):
            # unknown_task after a reconnect: the gateway gave the task away; nothing to do
            log.info("node %s: gateway error %s: %s", self.node_id, m.code.value, m.message)

    async def _send_ready(self) -> None:
        free = max(0, self.slots + self.prefetch - len(self._queue) - len(self._running))
        if free > 0 and free != self._last_ready and await self._send(Ready(free=min(free, 1024))):
            self._last_ready = free

    # ------------------------------------------------------------------ tasks

    def _held(self) -> list[str]:
        ids = [tid for w in (*self._running, *self._queue) for tid in w.unreported()]
        return list(dict.fromkeys([*ids, *self._outbox]))[:1024]

    def _pump(self) -> None:
        while self._queue and len(self._running) < self.slots and not self._stop.is_set():
            work = self._queue.popleft()
            self._running[work] = asyncio.create_task(self._execute(work), name=f"task-{work.key}")

    def _cancel(self, task_id: str) -> None:
        self._outbox.pop(task_id, None)
        for work in (*self._running, *self._queue):
            work.waiting = deque(p for p in work.waiting if p.task_id != task_id)
            if work.current == task_id and work.current_run is not None:
                work.current_run.cancel()  # kills its executor process
                log.info("node %s: task %s cancelled", self.node_id, task_id)
        self._queue = deque(w for w in self._queue if w.waiting)

    async def _execute(self, work: Work) -> None:
        """Run a task's parts in order, reporting each as it finishes."""
        me = asyncio.current_task()
        try:
            while work.waiting and not self._stop.is_set():
                part = work.waiting.popleft()
                work.current = part.task_id
                work.current_run = asyncio.create_task(self._run_part(work, part))
                try:
                    message = await work.current_run
                except asyncio.CancelledError:
                    if me is not None and me.cancelling():
                        raise  # the worker is stopping
                    continue  # this part was cancelled; the task's other parts carry on
                finally:
                    work.current, work.current_run = None, None
                if not await self._send(message):
                    self._outbox[part.task_id] = message
        finally:
            if self._running.get(work) is me:
                del self._running[work]
        self._pump()
        await self._send_ready()

    async def _run_part(self, work: Work, part: TaskPart) -> TaskResult | TaskFailed:
        assert self._modules is not None and self._blocks is not None and self.pool is not None
        task_id = part.task_id
        message: TaskResult | TaskFailed
        try:
            path = await self._modules.get(work.module_sha256, work.module_url)
            data = await self._blocks.assemble(
                work.job_id, base64.b64decode(part.input_b64, validate=True), part.blocks
            )
            output, elapsed_ms = await self.pool.run(task_id, work.module_sha256, path, data)
            if self.config.throttle > 1:  # act like a device `throttle` times slower
                await asyncio.sleep((self.config.throttle - 1) * elapsed_ms / 1000)
                elapsed_ms *= self.config.throttle
            message = TaskResult(task_id=task_id, output_b64=base64.b64encode(output).decode(), elapsed_ms=elapsed_ms)
            self.done += 1
        except (TaskError, OSError, httpx.HTTPError, binascii.Error) as exc:
            if isinstance(exc, TaskError):
                text = f"{type(exc).__name__}: {exc}"
            else:
                text = f"could not assemble the task's input: {type(exc).__name__}: {exc}"
            message = TaskFailed(task_id=task_id, message=text[:2000])
            self.failed += 1
            log.warning("node %s: task %s (job %s) failed: %s", self.node_id, task_id, work.job_id, text)
        return message


@dataclass(eq=False)
class Work:
    """One task on this node: its parts not yet started, and the one running."""

    key: str  # the first part's id
    job_id: str
    module_sha256: str
    module_url: str
    waiting: deque[TaskPart]
    current: str | None = None
    current_run: asyncio.Task[TaskResult | TaskFailed] | None = None

    @classmethod
    def of(cls, m: TaskAssign) -> Work:
        first = TaskPart(task_id=m.task_id, input_b64=m.input_b64, blocks=m.blocks)
        return cls(m.task_id, m.job_id, m.module_sha256, m.module_url, deque([first, *m.more]))

    def unreported(self) -> list[str]:
        return ([self.current] if self.current else []) + [p.task_id for p in self.waiting]


def run_worker(config: WorkerConfig) -> None:
    """Run a worker in this thread until SIGINT/SIGTERM (returns) or a `WorkerStopped`."""
    asyncio.run(WorkerNode(config=config).run())
