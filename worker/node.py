"""`WorkerNode`: a native edge node that speaks exactly the browser agent's protocol
(`shared/protocol.py`, `static/js/agent.js`). This is the I/O layer: every decision about
tasks is `NodeState`'s (`state.py`); the node feeds it events and carries out what it says.

Life cycle: benchmark (it also caches the mandelbrot module) -> `POST /node-report` ->
`WS /ws?token=...` -> Hello -> Welcome -> Ready / TaskAssign / TaskResult ... Heartbeats.
The device id and its secret go in every node report; a new identity in the answer is
adopted and kept. A lost connection is retried with capped exponential backoff and jitter,
keeping the identity; 4001 (token refused) first re-reports; 4002 (replaced by another
connection of this identity) after a longer backoff, so two copies of one home take turns.
Only 4004 (banned) stops the worker for good (`Banned`). One writer per connection sends
frames in `NodeState`'s order; a report the socket took down goes back to its outbox. A
`Hold` arms one timer, which feeds `Flush`. A cancelled part's run is cancelled (its
process killed). SIGINT/SIGTERM: Leave, close, return."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import websockets
from pydantic import ValidationError

from ..shared.protocol import (
    CloseCode,
    ErrorMessage,
    Leave,
    NodeAccepted,
    Results,
    ServerMessage,
    TaskFailed,
    TaskResult,
    TokenRefresh,
    Welcome,
    server_message_adapter,
)
from .device import Identity, claim_identity
from .exceptions import Banned
from .executor import Executor, WasmExecutor, run_part
from .fetch import BlockCache, ModuleStore
from .join import WorkerConfig, accepted, backoff_s, measure, node_report, parse_join_url, refusal, within_means
from .state import (
    Connected,
    Disconnected,
    Event,
    Flush,
    Hold,
    Instruction,
    NodeState,
    Outgoing,
    PartFailed,
    Received,
    Send,
    Start,
    Stop,
    Tick,
    Undelivered,
)

__all__ = ["WorkerConfig", "WorkerNode", "run_worker"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
REPLACED_ATTEMPT = 3  # after a 4002 the backoff starts here (2-4 s) and grows with each one in a row
MAX_FRAME_BYTES = 256 * 1024 * 1024  # a task frame carries its input; the gateway caps its own side


class WorkerNode:
    """One node: joins, keeps a connection, runs parts with `executor` (default: wasmtime
    processes, `WasmExecutor`). `on_frame` sees every validated frame from the gateway."""

    def __init__(
        self,
        *,
        config: WorkerConfig,
        executor: Executor | None = None,
        on_frame: Callable[[ServerMessage], None] | None = None,
    ) -> None:
        self.config = config
        self.base_url, self.join_code = parse_join_url(config.join_url)
        self.node_id = ""
        self.token = ""
        self.heartbeat_interval_s = 2.0
        self.ws_path = "/ws"
        self.score: float | None = config.score
        self.state = NodeState()
        self.executor = executor
        #: connections opened after the first
        self.reconnects = 0
        self._on_frame = on_frame
        self._identity: Identity | None = None
        self._http: httpx.AsyncClient | None = None
        self._modules: ModuleStore | None = None
        self._blocks: BlockCache | None = None
        self._outq: asyncio.Queue[Outgoing | None] | None = None
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None  # armed by `Hold`, feeds `Flush`
        self._stop = asyncio.Event()

    @property
    def done(self) -> int:
        """Parts completed since start."""
        return self.state.done

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
            async with httpx.AsyncClient(timeout=30.0, verify=self.config.tls or True) as http:
                self._http = http
                self._modules = ModuleStore(directory=self.config.home / "modules", base_url=self.base_url, http=http)
                self._blocks = BlockCache(base_url=self.base_url, http=http, token=lambda: self.token)
                if self.executor is None:
                    self.executor = WasmExecutor(limits=self.config.limits, modules=self._modules)
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
            assert self._http is not None and self._modules is not None
            self.score = await measure(self._http, self.base_url, self._modules, self.config.limits, self.node_id)
        attempt = 0
        replaced = 0  # 4002s in a row
        need_report = True
        sessions = 0
        while not self._stop.is_set():
            if need_report:
                if await self._report() is None:
                    return
                need_report = False
            if sessions:
                self.reconnects += 1
            sessions += 1
            code, reason, welcomed = await self._session()
            if self._stop.is_set():
                return
            if welcomed:
                attempt = 0
            why = f"{code} {reason}".strip() if code is not None else reason
            if code == CloseCode.BANNED:
                raise Banned(f"node {self.node_id}: banned by the controller ({why})")
            if code == CloseCode.BAD_TOKEN:
                need_report = True
            if code == CloseCode.REPLACED:
                replaced += 1  # another holder of this identity's secret (a copied home?): take turns
                delay = backoff_s(REPLACED_ATTEMPT + replaced - 1)
                log.warning("node %s: replaced by another connection of this identity (%s)", self.node_id, why)
            else:
                replaced = 0
                delay = backoff_s(attempt)
                attempt += 1
            log.warning("node %s: connection closed (%s); reconnecting in %.1fs", self.node_id, why, delay)
            await self._sleep(delay)

    async def _shutdown(self) -> None:
        self._stop.set()
        if self.executor is not None:
            self.executor.begin_close()
        runs = list(self._runs.values())
        self._runs.clear()
        for t in runs:
            t.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        if self.executor is not None:
            await self.executor.close()
        log.info("node %s: stopped (%d tasks done, %d failed)", self.node_id, self.state.done, self.state.failed)

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

    async def _report(self) -> NodeAccepted | None:
        """Trade the join code for a session token; retry while the gateway is unreachable."""
        assert self._http is not None
        report = node_report(self.config, join_code=self.join_code, device_id=self.node_id, score=self.score)
        if self._identity is not None and self._identity.secret is not None:
            report = report.model_copy(update={"node_secret": self._identity.secret})
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
                return self._accept(within_means(accepted(resp), self.config.cores, who=self.node_id))
            if resp is not None and resp.status_code not in (429,) and resp.status_code < 500:
                raise refusal(resp, self.node_id)
            delay = backoff_s(attempt)
            attempt += 1
            log.warning("node %s: node report failed (%s); retrying in %.1fs", self.node_id, problem, delay)
            await self._sleep(delay)
        return None

    def _accept(self, answer: NodeAccepted) -> NodeAccepted:
        if answer.node_secret is not None and self._identity is not None:
            log.info("node %s: the controller issued identity %s", self._identity.device_id, answer.node_id)
            self._identity.keep(answer.node_id, answer.node_secret)
        self.node_id = answer.node_id
        self.token = answer.token
        self.ws_path = answer.ws_path
        self._set_capacity(answer.slots, answer.heartbeat_interval_s)
        log.info("node %s: registered, %d slots, prefetch %d", self.node_id, answer.slots, answer.prefetch)
        return answer

    def _set_capacity(self, slots: int, heartbeat_interval_s: float) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        assert self.executor is not None
        self.executor.resize(slots)

    # ------------------------------------------------------------------ the socket

    async def _session(self) -> tuple[int | None, str, bool]:
        """One connection, from connect to close: (close code, reason, whether welcomed)."""
        scheme = "wss" if self.base_url.startswith("https:") else "ws"
        url = f"{scheme}{self.base_url[self.base_url.index(':') :]}{self.ws_path}?token={quote(self.token, safe='')}"
        try:
            ws = await self._unless_stopped(
                websockets.connect(
                    url,
                    max_size=MAX_FRAME_BYTES,
                    compression=None,  # permessage-deflate: more CPU than it saves bytes on a LAN
                    open_timeout=CONNECT_TIMEOUT_S,
                    close_timeout=CLOSE_TIMEOUT_S,
                    ssl=self.config.tls,  # pinned to the join link's fp=: WorkerConfig.tls
                )
            )
        except (OSError, TimeoutError, websockets.WebSocketException) as exc:
            return None, f"cannot connect: {type(exc).__name__}: {exc}", False
        if ws is None:
            return None, "stopped", False
        outq: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self._outq = outq
        writer = asyncio.create_task(self._write(ws, outq))
        leaver = asyncio.create_task(self._leave_on_stop(outq))
        heartbeat: asyncio.Task[None] | None = None
        welcomed = self._binary = False
        try:
            self._feed(Connected())
            async for frame in ws:
                message = self._parse(frame)
                if message is None:
                    continue
                if self._on_frame is not None:
                    self._on_frame(message)
                if isinstance(message, Welcome):
                    welcomed, self._binary = True, bool(message.binary_results)  # results as bytes
                    self.node_id = message.node_id
                    self._set_capacity(message.slots, message.heartbeat_interval_s)
                    log.info("node %s: connected (%d slots)", self.node_id, message.slots)
                    if heartbeat is None:
                        heartbeat = asyncio.create_task(self._heartbeats())
                elif isinstance(message, TokenRefresh):
                    self.token = message.token
                elif isinstance(message, ErrorMessage):
                    # unknown_task after a reconnect: the gateway gave the task away; nothing to do
                    log.info("node %s: gateway error %s: %s", self.node_id, message.code.value, message.message)
                self._feed(Received(message))
        except websockets.ConnectionClosed:
            pass
        finally:
            self._outq = None
            for t in (leaver, heartbeat):
                if t is not None:
                    t.cancel()
            outq.put_nowait(None)  # the writer hands back what it could not send, then ends
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT_S)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_TIMEOUT_S)
            writer.cancel()
            while not outq.empty():
                self._undelivered(outq.get_nowait())
            self._feed(Disconnected())
        return ws.close_code, ws.close_reason or "", welcomed

    async def _write(self, ws: Any, outq: asyncio.Queue[Outgoing | None]) -> None:
        """Send frames in order; after a `Leave`, close; reports not sent go back to the outbox."""
        open_ = True
        while (message := await outq.get()) is not None:
            if not open_:
                self._undelivered(message)
                continue
            try:
                await ws.send((self._binary and message.binary_frame()) or message.model_dump_json())
            except websockets.ConnectionClosed:
                open_ = False
                self._undelivered(message)
                continue
            if isinstance(message, Leave):
                open_ = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(CloseCode.NORMAL, "leave"), CLOSE_TIMEOUT_S)

    def _undelivered(self, message: Outgoing | None) -> None:
        if isinstance(message, TaskResult | TaskFailed | Results):
            self._feed(Undelivered(message))

    async def _leave_on_stop(self, outq: asyncio.Queue[Outgoing | None]) -> None:
        await self._stop.wait()
        self._feed(Flush())  # reports held for a batch go out before we leave
        outq.put_nowait(Leave())

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(max(0.1, self.heartbeat_interval_s))
            self._feed(Tick())

    def _parse(self, frame: str | bytes) -> ServerMessage | None:
        try:
            message = server_message_adapter.validate_json(frame)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            log.warning("node %s: ignored a frame the gateway sent (%s)", self.node_id, problems)
            return None
        return within_means(message, self.config.cores, who=self.node_id)  # slots never above our cores

    # ------------------------------------------------------------------ carrying out decisions

    def _feed(self, event: Event) -> None:
        if isinstance(event, Flush):
            self._flush_timer = None
        for instruction in self.state.handle(event):
            self._carry_out(instruction)

    def _carry_out(self, instruction: Instruction) -> None:
        if isinstance(instruction, Send):
            if self._outq is not None:
                self._outq.put_nowait(instruction.message)
            else:
                self._undelivered(instruction.message)
        elif isinstance(instruction, Start):
            if not self._stop.is_set():
                run = asyncio.create_task(self._run_part(instruction), name=f"task-{instruction.task_id}")
                self._runs[instruction.task_id] = run
        elif isinstance(instruction, Stop):
            stopped = self._runs.pop(instruction.task_id, None)
            if stopped is not None:
                stopped.cancel()  # WasmExecutor kills the process running it
                log.info("node %s: task %s cancelled", self.node_id, instruction.task_id)
        elif isinstance(instruction, Hold) and self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(instruction.ms / 1000, self._feed, Flush())

    async def _run_part(self, part: Start) -> None:
        assert self._blocks is not None and self.executor is not None
        event = await run_part(part, blocks=self._blocks, executor=self.executor, throttle=self.config.throttle)
        if isinstance(event, PartFailed):
            log.warning("node %s: task %s (job %s) failed: %s", self.node_id, part.task_id, part.job_id, event.message)
        if self._runs.get(part.task_id) is asyncio.current_task():
            del self._runs[part.task_id]
        self._feed(event)


def run_worker(config: WorkerConfig) -> None:
    """Run a worker in this thread until SIGINT/SIGTERM (returns) or a `WorkerStopped`."""
    asyncio.run(WorkerNode(config=config).run())
