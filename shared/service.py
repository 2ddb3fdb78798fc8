"""What the scheduler and aggregator share as long-running processes: a stop flag set by
SIGINT/SIGTERM (handlers restored on exit), a liveness key in Redis for health checks, and
capped backoff with a warning per retry while Redis is unreachable."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import redis

from . import keys

log = logging.getLogger(__name__)

HEARTBEAT_TTL_S = 15


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


def beat(client: redis.Redis, service: str, instance: str) -> None:
    client.set(keys.service_heartbeat(service, instance), str(time.time()), ex=HEARTBEAT_TTL_S)


def start_beating(client: redis.Redis, service: str, instance: str, every_s: float = 2.0) -> threading.Event:
    """Beat from a thread: the process counts as alive while it runs, even while its main
    loop is busy with a long step (an aggregator finalizing a large job). Set the returned
    event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                beat(client, service, instance)
            except redis.RedisError as exc:
                log.warning("%s %s: heartbeat failed: %s", service, instance, exc)
            stop.wait(every_s)

    threading.Thread(target=loop, name=f"{service}-beat", daemon=True).start()
    return stop


def instance_alive(client: redis.Redis, service: str, instance: str) -> bool:
    return bool(client.exists(keys.service_heartbeat(service, instance)))


def service_alive(client: redis.Redis, service: str) -> bool:
    return any(True for _ in client.scan_iter(match=keys.service_heartbeat_pattern(service), count=100))


def run_forever(name: str, flag: StopFlag, step: Callable[[], Any], *, idle_s: float = 0.0) -> None:
    """Call `step` until the flag is set, riding out Redis outages with capped backoff."""
    delay = 0.1
    while not flag.stopping:
        try:
            step()
            delay = 0.1
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("%s: redis unavailable (%s); retrying in %.1fs", name, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        if idle_s:
            time.sleep(idle_s)
