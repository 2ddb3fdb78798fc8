"""`ExecutorPool`: one spawned OS process per slot, each running modules with a `ModuleRunner`.

Why processes of our own rather than `ProcessPoolExecutor`: a cancelled task, or one that
blew its deadline, is stopped by killing the one process that runs it, and only that process
is replaced; a `ProcessPoolExecutor` treats a killed process as a broken pool. The processes
are fresh interpreters (`python -m processdistro.worker.pool FD LIMITS`, like the "spawn"
start method) talking over a `multiprocessing` socket pair: unlike `multiprocessing.Process`
this never re-imports the caller's `__main__` and starts no resource-tracker process.

Each process serves requests from its end of a pipe, one at a time. The parent waits for the
answer in a thread (so the event loop never blocks), and **the parent enforces the deadline**:
the processes run wasmtime's default configuration (`ModuleRunner(interruptible=False)`), with
no deadline check inside the compiled code, which made compute-bound kernels twice as slow.
The clock starts when the request is sent to a process that has the module compiled already,
or when a process that had to compile it first says `ready` (a fresh interpreter's start-up
and the compile get `GUARD_GRACE_S` on top); a process that has not answered `deadline +
KILL_SLACK_S` after that is killed and the run fails with `DeadlineExceeded`. A process that
hit its memory cap answers and then exits; the pool starts a fresh one in place of either.

`measure_speed` runs the join benchmark the same way, in a process of its own under the same
engine, so the score a node reports is the speed its executors have.

Processes ignore SIGINT: Ctrl-C reaches the whole process group, and the parent decides how to
stop (Leave first, then `close`). They exit when the parent goes away (EOF on the pipe, or a
changed parent pid noticed by a watchdog thread while a long run is in progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .exceptions import (
    DeadlineExceeded,
    ExecutorCrashed,
    MemoryCapReached,
    TaskError,
    task_error,
)
from .runtime import Limits, ModuleRunner

log = logging.getLogger(__name__)

MAX_PROCESSES = 1024  # whatever the caller asks (the CLI's --cores bound); issue 9.9
GUARD_GRACE_S = 10.0  # a fresh process's start-up (interpreter, wasmtime) and the compile
KILL_SLACK_S = 0.05  # how late past its deadline a run is killed, at least
BENCH_TIMEOUT_S = 60.0  # the join benchmark: start-up, compile, ~0.5 s of runs
STOP_GRACE_S = 2.0
# failures after which the process that reported them exits (and is replaced)
RETIRING = {DeadlineExceeded.__name__, MemoryCapReached.__name__, ExecutorCrashed.__name__}


# One request on the pipe: (task id, module sha256, module file, input bytes, the run's limits
# as (deadline_s, memory_bytes)); BenchRequest: ("bench", sha256, module file); None = exit.
Request = tuple[str, str, str, bytes, tuple[float, int]]
BenchRequest = tuple[str, str, str]


# ---------------------------------------------------------------------------- child side


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)  # the parent is gone: nobody will read our answer


def _serve(conn: Connection, limits: Limits) -> None:
    """Entry point of an executor process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), name="watch-parent", daemon=True).start()
    runner = ModuleRunner(limits=limits, interruptible=False)  # the parent kills an overrun
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        if len(request) == 3:
            _bench(conn, runner, request)
            continue
        _task_id, sha256, path, data, (deadline_s, memory_bytes) = request
        try:
            if not runner.compiled(sha256):
                runner.kind(sha256, Path(path))  # compile now: the deadline starts after `ready`
                conn.send(("ready",))
            started = time.perf_counter()
            output = runner.run(sha256, Path(path), data, Limits(deadline_s=deadline_s, memory_bytes=memory_bytes))
        except TaskError as exc:
            name = type(exc).__name__
            conn.send(("error", name, str(exc)))
            if name in RETIRING:
                return
            continue
        except Exception as exc:  # a bug on our side, not the module's: start afresh
            conn.send(("error", ExecutorCrashed.__name__, f"executor error: {exc!r}"))
            return
        conn.send(("ok", output, (time.perf_counter() - started) * 1000.0))


def _bench(conn: Connection, runner: ModuleRunner, request: BenchRequest) -> None:
    from .device import benchmark  # numpy: only a benchmarking process needs it

    _, sha256, path = request
    try:
        conn.send(("ok", benchmark(runner, sha256, Path(path))))
    except TaskError as exc:
        conn.send(("error", type(exc).__name__, str(exc)))


# ---------------------------------------------------------------------------- parent side


class _Proc:
    def __init__(self, index: int, limits: Limits) -> None:
        ours, theirs = multiprocessing.Pipe()
        fd = theirs.fileno()
        self.index = index
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(fd), json.dumps(asdict(limits))],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.conn: Connection = ours
        self.task_id: str | None = None
        #: modules this process has compiled (it said `ready` or answered): their runs' clock
        #: starts at the send
        self.compiled: set[str] = set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(max(0.0, timeout))

    def call(self, request: Request | BenchRequest, deadline_s: float) -> tuple[Any, ...]:
        """Blocking: send one request, wait for its answer (in a pool thread). `("timeout",
        seconds run)` when the run took longer than `deadline_s` (+ `KILL_SLACK_S`), counted
        from the send to a process that has the module compiled, else from its `ready` (the
        send to `ready`: `GUARD_GRACE_S` more, for start-up and the compile)."""
        sha256 = request[1]
        try:
            started = time.monotonic()
            self.conn.send(request)
            grace = KILL_SLACK_S if sha256 in self.compiled else GUARD_GRACE_S
            while True:
                if not self.conn.poll(max(0.0, started + deadline_s + grace - time.monotonic())):
                    return ("timeout", time.monotonic() - started)
                reply = tuple(self.conn.recv())
                if reply[0] != "ready":
                    if reply[0] == "ok":
                        self.compiled.add(sha256)
                    return reply
                self.compiled.add(sha256)
                started, grace = time.monotonic(), KILL_SLACK_S
        except (EOFError, OSError):
            self.wait(1.0)
            return ("died", self.process.returncode)

    def reap(self) -> None:
        """Make sure the process is gone and its pipe closed (never while `call` runs)."""
        if self.alive():
            self.process.kill()
        self.wait(STOP_GRACE_S)
        self.conn.close()


class ExecutorPool:
    """Up to `size` tasks at once, each in a process of its own. Use from one event loop."""

    def __init__(self, *, size: int, limits: Limits) -> None:
        self.limits = limits
        self._threads = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="pd-exec-wait")
        self._idle: asyncio.Queue[_Proc] = asyncio.Queue()
        self._procs: set[_Proc] = set()
        self._target = 0
        self._spawned = 0
        self._closed = False
        self.resize(size)

    @property
    def size(self) -> int:
        return self._target

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def resize(self, size: int) -> None:
        """Grow at once; shrink by stopping idle processes now and busy ones when they finish."""
        self._target = max(1, min(size, MAX_PROCESSES))
        while len(self._procs) < self._target and not self._closed:
            self._spawn()
        while len(self._procs) > self._target and not self._idle.empty():
            self._drop(self._idle.get_nowait())

    def _drop(self, proc: _Proc) -> None:
        """Stop an idle process (no thread is waiting on its pipe)."""
        self._procs.discard(proc)
        if self._closed:
            proc.conn.close()  # `close` terminates and reaps the process itself
        else:
            self._threads.submit(proc.reap)

    def _spawn(self) -> None:
        self._spawned += 1
        proc = _Proc(self._spawned, self.limits)
        self._procs.add(proc)
        self._idle.put_nowait(proc)

    async def run(
        self, task_id: str, sha256: str, path: Path, data: bytes, *, limits: Limits | None = None
    ) -> tuple[bytes, float]:
        """Run one task: `(output, elapsed_ms)`, or a `TaskError`. `limits` are this run's (a
        task's own, lowered by `Limits.within`; None: the pool's). Cancelling the awaiting
        task kills the process that runs it (and starts a replacement)."""
        if self._closed:
            raise ExecutorCrashed("the executor pool is closed")
        limits = limits or self.limits
        proc = await self._idle.get()
        proc.task_id = task_id
        request: Request = (task_id, sha256, str(path), data, (limits.deadline_s, limits.memory_bytes))
        call: Future[tuple[Any, ...]] = self._threads.submit(proc.call, request, limits.deadline_s)
        retire = True
        try:
            reply = await asyncio.wrap_future(call)
            kind = reply[0]
            if kind == "ok":
                retire = False
                return bytes(reply[1]), float(reply[2])
            if kind == "error":
                retire = reply[1] in RETIRING
                raise task_error(reply[1], reply[2])
            if kind == "timeout":
                raise DeadlineExceeded(
                    f"task ran past its {limits.deadline_s:g}s deadline (stopped after {reply[1]:.1f}s); "
                    "executor process killed"
                )
            raise ExecutorCrashed(f"executor process died (exit code {reply[1]}) while running the task")
        finally:
            proc.task_id = None
            if retire:
                self._retire(proc, call)
            elif self._closed or len(self._procs) > self._target:
                self._drop(proc)
            else:
                self._idle.put_nowait(proc)

    def _retire(self, proc: _Proc, call: Future[tuple[Any, ...]]) -> None:
        if proc.alive():
            proc.process.kill()  # unblocks `call`: its pipe reaches EOF
        self._procs.discard(proc)
        # close the pipe only once the waiting thread is done with it
        call.add_done_callback(lambda _f: proc.reap())
        if not self._closed and len(self._procs) < self._target:
            log.info("executor process %s (pid %s) replaced", proc.index, proc.pid)
            self._spawn()

    def begin_close(self) -> None:
        """From now on, start no runs and replace no process (runs cancelled next stay dead)."""
        self._closed = True

    async def close(self) -> None:
        """Stop every process: SIGTERM, a short grace, then SIGKILL."""
        self._closed = True
        procs = list(self._procs)
        self._procs.clear()
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.process.terminate()

        def reap_all() -> None:
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in procs:
                proc.wait(deadline - time.monotonic())
                if proc.alive():
                    proc.process.kill()
                    proc.wait(1.0)

        await asyncio.get_running_loop().run_in_executor(None, reap_all)
        while not self._idle.empty():
            self._idle.get_nowait().conn.close()
        self._threads.shutdown(wait=False, cancel_futures=True)


def measure_speed(sha256: str, path: Path, limits: Limits, *, timeout_s: float = BENCH_TIMEOUT_S) -> float:
    """Blocking: the join benchmark's score (worker/device.py `benchmark`) for module `sha256`,
    measured in an executor process of its own (the engine tasks run on), which is killed if
    it takes longer than `timeout_s`. Raises a `TaskError` when the module fails or overruns."""
    proc = _Proc(0, limits)
    reply: tuple[Any, ...] = ("died", None)
    try:
        reply = proc.call(("bench", sha256, str(path)), timeout_s)
        if reply[0] == "ok":
            return float(reply[1])
        if reply[0] == "error":
            raise task_error(reply[1], reply[2])
        if reply[0] == "timeout":
            raise DeadlineExceeded(f"the benchmark took longer than {timeout_s:g}s; executor process killed")
        raise ExecutorCrashed(f"benchmark process died (exit code {reply[1]})")
    finally:
        if reply[0] in ("ok", "error"):  # idle: let it exit on its own
            with contextlib.suppress(OSError):
                proc.conn.send(None)
            proc.wait(STOP_GRACE_S)
        proc.reap()  # kills it if it is still there (an overrun, or no exit in time)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), Limits(**json.loads(sys.argv[2])))
