"""What the scheduler and aggregator share as long-running processes: a stop flag set by
SIGINT/SIGTERM (handlers restored on exit), capped backoff with a warning per retry while
Redis is unreachable, and the rule that one job's problem never stops a service.

A service meets two kinds of errors:
- a job's: its plugin raised (a wordlist moved after submit, a disk full in `merge`). The
  service fails that job, with `job_error` as its reason, and carries on with the others;
- anything else, outside any job (a bug, an unexpected reply): `run_forever` logs it with
  its traceback and backs off (capped), so the process neither exits nor spins.
Their liveness keys are `store.liveness`."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sysconfig
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from .store.connection import UNAVAILABLE

log = logging.getLogger(__name__)

#: The `TaskPlugin` methods a service calls: the first of them on an error's traceback
#: names the step that failed in the job's reason.
PLUGIN_STEPS = frozenset(
    {
        "parse_params",
        "count",
        "split",
        "entries",
        "limits",
        "verify",
        "confirm",
        "merge",
        "merge_result",
        "failure",
        "finished_early",
        "finalize",
        "clean_up",
    }
)
REASON_CHARS = 1000  # a job's error is read in a terminal
PAUSE_SLICE_S = 0.05  # how soon a backoff notices the stop flag


def instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StopFlag:
    def __init__(self) -> None:
        self.stopping = False

    def set(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        self.stopping = True

    def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less once the flag is set: a stop signal during a backoff ends
        it within `PAUSE_SLICE_S` (a plain sleep resumes after the handler, PEP 475, so a stop
        during a Redis outage waited out the whole 5 s backoff)."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, PAUSE_SLICE_S))


@contextmanager
def captured_signals(flag: StopFlag) -> Iterator[None]:
    previous = {s: signal.signal(s, flag.set) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def describe_error(exc: BaseException) -> str:
    """What went wrong, for an operator: the file problems a job meets after its submit
    (gone, a directory, unreadable, disk full) in words, anything else as `Type: message`."""
    if isinstance(exc, OSError):
        name = f" {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f"disk full: no space left writing{name or ' the job files'} ({exc.strerror})"
        if isinstance(exc, FileNotFoundError):
            return f"file{name} is gone (moved or deleted after the job was submitted)"
        if isinstance(exc, IsADirectoryError):
            return f"{name.strip() or 'a path'} is a directory, not a file"
        if isinstance(exc, PermissionError):
            return f"file{name} cannot be read or written: permission denied"
    return f"{type(exc).__name__}: {exc}"


_LIBRARIES = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")})
_OURS = str(Path(__file__).resolve().parent.parent)  # this package, wherever it is installed


def plugin_step(exc: BaseException) -> str | None:
    """The innermost `TaskPlugin` step (`PLUGIN_STEPS`) on the error's traceback, if any
    (frames of the standard library and other installed packages, e.g. numpy's `split`,
    are not steps)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.name not in PLUGIN_STEPS:
            continue
        library = frame.filename.startswith(_LIBRARIES)
        # ours: in this package (under the libraries only if the package itself is there),
        # or in no library at all (a task repo's plugin.py)
        if not library or (frame.filename.startswith(_OURS) and _OURS.startswith(_LIBRARIES)):
            return frame.name
    return None


def job_error(exc: BaseException, doing: str) -> str:
    """A job's failure reason for an error met while `doing` something for it, e.g.
    "merge of subtask 3 failed: disk full: ..."; names the plugin step when it raised."""
    step = plugin_step(exc)
    what = doing if step is None or step in doing else f"{doing} ({step})"
    return f"{what} failed: {describe_error(exc)}"[:REASON_CHARS]


def run_forever(name: str, flag: StopFlag, step: Callable[[], Any], *, idle_s: float = 0.0) -> None:
    """Call `step` until the flag is set, riding out Redis outages with capped backoff.

    Any other error is logged with its traceback and followed by the same capped backoff:
    a bug or a bad record slows the loop down; it never kills or spins the process."""
    delay = 0.1
    while not flag.stopping:
        try:
            step()
            delay = 0.1
        except UNAVAILABLE as exc:
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", name, exc, delay)
            flag.pause(delay)
            delay = min(delay * 2, 5.0)
        except Exception:
            log.exception("%s: unexpected error in its loop; carrying on in %.1fs", name, delay)
            flag.pause(delay)
            delay = min(delay * 2, 5.0)
        if idle_s:
            flag.pause(idle_s)
