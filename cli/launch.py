"""How `up` starts its three services: forked from `up` itself (Linux), so that the Python
they all need is imported once, not once per process (issue 11, goal 5).

A fresh `python -m processdistro gateway` spends most of its start importing (pydantic and
its models, redis, starlette, numpy, ...); three of them at once on two cores, after `up`
itself, made `up` -> ready take seconds. Here `up` imports what every service imports
(`preload`) while nothing else runs, then `fork_service` forks a child that carries on as
`processdistro <name>` would: its own pid, process group membership, environment, log file
(stdout and stderr), signals as a fresh interpreter has them, and `main([name])`, which
imports the rest of its service and never returns (`os._exit`). `up` supervises, restarts
and stops it exactly as a spawned one (`ForkedProcess` is the part of `subprocess.Popen` it
uses).

Forking is safe here because `up` forks before it has any thread, event loop or open Redis
connection of its own (`fork_service` refuses otherwise and `up` spawns instead), and the
embedded Redis is a separate program. Elsewhere (macOS, where libraries may not survive a
fork) `up` spawns each service as before: `can_fork`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

#: What every service imports (the CLI's entry, settings, the messages, the store); a
#: service's own modules (uvicorn, rq, numpy, ...) the child imports itself, the three of
#: them in parallel on the cores there are.
PRELOAD = (
    "processdistro.main",
    "processdistro.shared.settings",
    "processdistro.shared.protocol",
    "processdistro.shared.messages",
    "processdistro.shared.service",
    "processdistro.shared.modules",
    "processdistro.shared.store.connection",  # redis and redis.asyncio
    "processdistro.shared.store.jobs",
    "processdistro.shared.store.streams",
    "processdistro.shared.store.liveness",
    "processdistro.shared.tasks",
)
WAIT_SLICE_S = 0.005  # how often `ForkedProcess.wait` looks at a child with a timeout


def can_fork() -> bool:
    """Fork the services (Linux), or spawn them (elsewhere)."""
    return sys.platform == "linux" and hasattr(os, "fork")


def preload() -> None:
    """Import what every service imports, once, before the services are forked."""
    for name in PRELOAD:
        importlib.import_module(name)


class ForkedProcess:
    """A forked service as `up` sees it: the part of `subprocess.Popen`'s interface it uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already (cannot happen: only we wait for it)
                self.returncode = -1
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N: killed by signal N, as Popen
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(WAIT_SLICE_S)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_service(name: str, env: dict[str, str], log: BinaryIO) -> ForkedProcess:
    """Fork `processdistro <name>` (a service command) with environment `env`, its stdout and
    stderr appended to `log`, stdin from /dev/null. Raises RuntimeError if this process has a
    thread besides the main one (a fork would copy its locks, not the thread)."""
    if threading.active_count() > 1:
        raise RuntimeError("not forking a service: this process has threads")
    for stream in (sys.stdout, sys.stderr):  # what is buffered would be written twice
        stream.flush()
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # blocked across the fork: a Ctrl-C in between reaches the child once its handlers are
    # a fresh interpreter's, not `up`'s (which would only set `up`'s flag, in the child)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:  # pragma: no cover - the child; tests see it through its behaviour
        _run_child(name, env, log, mask)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return ForkedProcess(pid)


def _run_child(name: str, env: dict[str, str], log: BinaryIO, mask: Iterable[int]) -> None:
    """The forked child: become `processdistro <name>`, run it, and leave by `os._exit`
    whatever happens (never back into `up`'s code, which would stop `up`'s Redis)."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [sys.argv[0], name]
        set_title(f"processdistro {name}")
        from .main import main

        main([name])  # a service command leaves by os._exit itself
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def set_title(title: str) -> None:
    """Show `title` as this process's command line (`ps`, `pgrep -f`, /proc/PID/cmdline):
    written over the memory of the original argv, as setproctitle does, NUL between words.
    A forked service would show `up`'s command line otherwise. Best effort: Linux only, and
    cut to the length of the original command line."""
    try:
        import ctypes

        # /proc/PID/stat: fields 48 and 49 (from 1) are arg_start and arg_end; the name in
        # field 2 may hold spaces and parentheses, so count from its closing parenthesis
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
        size = end - start
        if size <= 1:
            return
        data = title.replace(" ", "\0").encode()[: size - 1]
        ctypes.memmove(start, data + b"\0" * (size - len(data)), size)
    except (OSError, ValueError, IndexError, ImportError):
        return
