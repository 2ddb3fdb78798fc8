"""`processdistro up`: Redis (embedded unless PD_REDIS_URL is set), the three services as
supervised child processes (given the task repo, `--task-repo`/PD_TASK_REPO, if any), the
join link and its QR code; Ctrl-C stops all of it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import qrcode
from rich.console import Console

from .shared.redis_server import EmbeddedRedis, private_secret, redis_password, write_private
from .shared.settings import Settings
from .shared.store import client as store

log = logging.getLogger(__name__)

SERVICES = ("gateway", "scheduler", "aggregator")
OPERATOR_TOKEN_FILE = "operator.token"
STOP_GRACE_S = 6.0


def lan_address() -> str:
    """The address other devices on the LAN reach us at. Connecting a UDP socket sends no
    packet; it only asks the kernel which interface would route there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = 0.5
    log_path: Path | None = None
    _log: object = field(default=None, repr=False)

    def start(self) -> None:
        assert self.log_path is not None
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.started_at = time.monotonic()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()

    def reap(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._log:
            self._log.close()  # type: ignore[attr-defined]


def print_join(console: Console, join_url: str, gateway_url: str) -> None:
    qr = qrcode.QRCode(border=1)
    qr.add_data(join_url)
    qr.make(fit=True)
    console.print()
    console.print("[bold green]ProcessDistro is up.[/]")
    console.print(f"Join link (open it on any device on this network): [bold]{join_url}[/]")
    sys.stdout.flush()
    qr.print_ascii(out=sys.stdout, invert=True)
    sys.stdout.flush()
    console.print(f"Dashboard: {gateway_url}/dashboard   Metrics: {gateway_url}/metrics")
    cli = shutil.which("processdistro") or str(Path(sys.executable).parent / "processdistro")
    console.print(f"Submit work from another terminal, e.g.  {cli} submit mandelbrot -o m.png --wait")
    console.print("Press Ctrl-C to stop everything.")


def run_up(settings: Settings, *, console: Console, workers: int = 0) -> int:
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new home is ours alone
    logs = home / "logs"
    logs.mkdir(exist_ok=True, mode=0o700)
    embedded: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    if not redis_url:
        # with a password (kept in $PD_HOME/redis.password, 0600), passed on in the URL
        embedded = EmbeddedRedis(directory=home / "redis", password=redis_password(home))
        redis_url = embedded.start()
        console.print(
            f"Started embedded Redis on 127.0.0.1:{embedded.port} with a password (files in {home / 'redis'})"
        )

    # the operator's token: PD_OPERATOR_TOKEN, else one kept in $PD_HOME/operator.token (0600)
    operator_token = settings.operator_token or private_secret(home / OPERATOR_TOKEN_FILE)
    env = {
        **os.environ,
        "PD_OPERATOR_TOKEN": operator_token,
        "PD_REDIS_URL": redis_url,
        "PD_HOME": str(home),
        "PD_PORT": str(settings.port),
        "PD_HOST": settings.host,
    }
    if settings.task_repo is not None:
        # every service registers the repo's kinds (and the CLI run from this shell needs
        # PD_TASK_REPO too, to submit them)
        env["PD_TASK_REPO"] = str(settings.task_repo.expanduser().resolve())
    argv0 = [sys.executable, "-m", "processdistro"]
    children = [Child(n, [*argv0, n], env, log_path=logs / f"{n}.log") for n in SERVICES]

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for c in children:
            c.start()
        host = (
            settings.public_url
            or f"http://{lan_address() if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        )
        gateway_url = host.rstrip("/")
        join_code = _wait_for_gateway(redis_url, children[0], timeout=30)
        if join_code is None:
            console.print(f"[red]the gateway did not come up; see {children[0].log_path}[/]")
            return 1
        join_url = f"{gateway_url}/agent?code={join_code}"
        # local native workers join through loopback, like any other node
        local = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        local = f"[{local}]" if ":" in local else local
        for i in range(max(0, workers)):
            name = f"worker-{i + 1}"
            link = f"http://{local}:{settings.port}/agent?code={join_code}"
            worker = Child(name, [*argv0, "worker", link, "--cores", "1"], env, log_path=logs / f"{name}.log")
            worker.start()
            children.append(worker)
        info = {
            "redis_url": redis_url,
            "gateway_url": gateway_url,
            "join_url": join_url,
            "operator_token": operator_token,
            "pid": os.getpid(),
            "logs": str(logs),
        }
        # it holds the join link and the Redis URL with its password: this user's alone
        write_private(settings.controller_file, json.dumps(info, indent=2) + "\n")
        print_join(console, join_url, gateway_url)
        console.print(f"Operator token (dashboard actions, `processdistro result` from elsewhere): {operator_token}")
        if workers > 0:
            console.print(f"Started {workers} local native worker(s); logs in {logs}/worker-*.log")
        while not stopping:
            time.sleep(0.25)
            for c in children:
                if c.process is not None and c.process.poll() is not None and not stopping:
                    code = c.process.returncode
                    # restart quickly, but not in a tight loop if it keeps crashing
                    c.backoff = 0.5 if time.monotonic() - c.started_at > 30 else min(c.backoff * 2, 10.0)
                    console.print(
                        f"[yellow]{c.name} exited with {code}; restarting in {c.backoff:.1f}s (log: {c.log_path})[/]"
                    )
                    time.sleep(c.backoff)
                    c.restarts += 1
                    c.start()
        return 0
    finally:
        console.print("Stopping…")
        for c in reversed(children):
            c.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        for c in children:
            c.reap(deadline)
        if embedded is not None:
            embedded.stop()
        try:
            if json.loads(settings.controller_file.read_text()).get("pid") == os.getpid():
                settings.controller_file.unlink()
        except (OSError, ValueError):
            pass
        for s, h in previous.items():
            signal.signal(s, h)
        console.print("Stopped.")


def _wait_for_gateway(redis_url: str, gateway: Child, timeout: float) -> str | None:
    client = store.connect(redis_url, retry=False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if gateway.process is not None and gateway.process.poll() is not None:
                return None
            code = store.join_code(client)
            if code:
                return code
            time.sleep(0.1)
        return None
    finally:
        client.close()
