"""What the scheduler and aggregator share as long-running processes: a stop flag set by
SIGINT/SIGTERM (handlers restored on exit) and capped backoff with a warning per retry while
Redis is unreachable. Their liveness keys are `store.liveness`."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from .store.connection import UNAVAILABLE

log = logging.getLogger(__name__)


def instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class StopFlag:
    def __init__(self) -> None:
        self.stopping = False

    def set(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        self.stopping = True


@contextmanager
def captured_signals(flag: StopFlag) -> Iterator[None]:
    previous = {s: signal.signal(s, flag.set) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_forever(name: str, flag: StopFlag, step: Callable[[], Any], *, idle_s: float = 0.0) -> None:
    """Call `step` until the flag is set, riding out Redis outages with capped backoff."""
    delay = 0.1
    while not flag.stopping:
        try:
            step()
            delay = 0.1
        except UNAVAILABLE as exc:
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", name, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        if idle_s:
            time.sleep(idle_s)
