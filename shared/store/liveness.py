"""Liveness keys of the controller's services (health checks, the finalizer's owner check)."""

from __future__ import annotations

import logging
import threading
import time

import redis

from .. import keys

log = logging.getLogger(__name__)

HEARTBEAT_TTL_S = 15


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
