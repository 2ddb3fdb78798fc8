"""`processdistro up`: Redis (embedded unless PD_REDIS_URL is set), the three services as
supervised child processes (forked from `up` on Linux: `launch.py`; given the task repo,
`--task-repo`/PD_TASK_REPO, if any), the join link and its QR code; with `--https` the
gateway serves TLS (`tls.py`: a self-signed certificate kept in $PD_HOME/tls, or
`--cert/--key`) and the join link carries the certificate's fingerprint. Ctrl-C (or
SIGTERM) stops the workers and services, then Redis."""

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

from rich.console import Console

from .launch import ForkedProcess, can_fork, fork_service, preload
from .shared.exceptions import ConfigError
from .shared.redis_server import EmbeddedRedis, private_secret, redis_password, write_private
from .shared.settings import Settings
from .shared.store import client as store
from .tls import Certificate, ensure_certificate, load

log = logging.getLogger(__name__)

SERVICES = ("gateway", "scheduler", "aggregator")
OPERATOR_TOKEN_FILE = "operator.token"
STOP_GRACE_S = 6.0
JOIN_CODE_POLL_S = 0.02  # the gateway sets it as it becomes ready: one GET a poll
WORKERS_READY_S = 120.0  # local workers not all joined by then: say so (they may still come)


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
    process: subprocess.Popen[bytes] | ForkedProcess | None = None
    fork: bool = False  # a service forked from `up` (launch.py), else a spawned `argv`
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = 0.5
    log_path: Path | None = None
    _log: object = field(default=None, repr=False)

    def start(self) -> None:
        assert self.log_path is not None
        self._log = out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        if self.fork:
            try:
                self.process = fork_service(self.name, self.env, out)
                self.started_at = time.monotonic()
                return
            except RuntimeError as exc:  # a thread in `up` (none is started before): spawn
                log.warning("%s: %s", self.name, exc)
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
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
    import qrcode  # imported by `run_up` as the services start, not before they can

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


def certificate(settings: Settings, *, cert: Path | None, key: Path | None) -> Certificate:
    """The operator's own certificate (`--cert/--key`), else the self-signed one in
    $PD_HOME/tls for the address the join link names (regenerated if that changed)."""
    if cert is not None and key is not None:
        try:
            return load(cert.expanduser(), key.expanduser())
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"cannot use --cert {cert} --key {key}: {exc}") from None
    address = lan_address() if settings.host in ("0.0.0.0", "::", "") else settings.host
    return ensure_certificate(settings.home_dir / "tls", address)


def run_up(
    settings: Settings,
    *,
    console: Console,
    workers: int = 0,
    https: bool = False,
    cert: Path | None = None,
    key: Path | None = None,
) -> int:
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
    tls: Certificate | None = None
    if https or cert is not None:
        tls = certificate(settings, cert=cert, key=key)
        env.update({"PD_TLS_CERT": str(tls.cert), "PD_TLS_KEY": str(tls.key)})
        made = "generated" if tls.generated else "using"
        console.print(f"HTTPS: {made} certificate {tls.cert} (sha256 fingerprint {tls.fingerprint})")
    scheme, pin = ("https", f"&fp={tls.fingerprint}") if tls else ("http", "")
    if settings.task_repo is not None:
        # every service registers the repo's kinds (and the CLI run from this shell needs
        # PD_TASK_REPO too, to submit them)
        env["PD_TASK_REPO"] = str(settings.task_repo.expanduser().resolve())
    argv0 = [sys.executable, "-m", "processdistro"]
    fork = can_fork()
    if fork:
        preload()  # what every service imports, imported once (launch.py)
    children = [Child(n, [*argv0, n], env, fork=fork, log_path=logs / f"{n}.log") for n in SERVICES]

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for c in children:
            c.start()
        import qrcode  # noqa: F401 - for `print_join`: imported while the services start

        host = (
            settings.public_url
            or f"{scheme}://{lan_address() if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        )
        gateway_url = host.rstrip("/")
        join_code = _wait_for_gateway(redis_url, children[0], timeout=30)
        if join_code is None:
            console.print(f"[red]the gateway did not come up; see {children[0].log_path}[/]")
            return 1
        join_url = f"{gateway_url}/agent?code={join_code}{pin}"
        # local native workers join through loopback, like any other node
        local = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        local = f"[{local}]" if ":" in local else local
        workers_started = time.time()
        for i in range(max(0, workers)):
            name = f"worker-{i + 1}"
            link = f"{scheme}://{local}:{settings.port}/agent?code={join_code}{pin}"
            worker = Child(name, [*argv0, "worker", link, "--cores", "1"], env, log_path=logs / f"{name}.log")
            worker.start()
            children.append(worker)
        info = {
            "redis_url": redis_url,
            "gateway_url": gateway_url,
            "join_url": join_url,
            "operator_token": operator_token,
            "tls_fingerprint": tls.fingerprint if tls else "",
            "pid": os.getpid(),
            "logs": str(logs),
        }
        # it holds the join link and the Redis URL with its password: this user's alone
        write_private(settings.controller_file, json.dumps(info, indent=2) + "\n")
        print_join(console, join_url, gateway_url)
        console.print(f"Operator token (dashboard actions, `processdistro result` from elsewhere): {operator_token}")
        console.print(
            f"Dashboard as the operator (keep this link to yourself): {gateway_url}/dashboard#token={operator_token}"
        )
        if tls is not None:
            console.print(f"Certificate fingerprint (workers pin it; in the join link as fp=): {tls.fingerprint}")
        if workers > 0:
            console.print(f"Starting {workers} local native worker(s); logs in {logs}/worker-*.log")
        console.print("Press Ctrl-C to stop everything.")
        waiting = (
            LocalWorkers(redis_url, workers, settings.node_timeout_s, since=workers_started) if workers > 0 else None
        )
        while not stopping:
            time.sleep(0.25)
            if waiting is not None and (said := waiting.poll()) is not None:
                console.print(said)
                sys.stdout.flush()
                waiting = None
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


class LocalWorkers:
    """Watches for `up --workers N` to have joined: N live native nodes in Redis that joined
    since this `up` started (an external Redis may know other workers)."""

    def __init__(self, redis_url: str, count: int, node_timeout_s: float, *, since: float) -> None:
        self.redis_url = redis_url
        self.count = count
        self.node_timeout_s = node_timeout_s
        self.started = time.monotonic()
        self.since = since  # time.time() before the workers started
        self.next_check = 0.0

    def poll(self) -> str | None:
        """What to say once (they are ready, or still not after `WORKERS_READY_S`), else None."""
        now = time.monotonic()
        if now < self.next_check:
            return None
        self.next_check = now + 0.5
        client = store.connect(self.redis_url, retry=False)
        try:
            live = sum(
                1
                for n in store.list_nodes(client, self.node_timeout_s)
                if n.get("live") == "yes" and n.get("kind") == "native" and float(n.get("joined") or 0) >= self.since
            )
        except Exception as exc:  # Redis busy or restarting, a record half written: next time
            log.debug("counting local workers: %s", exc)
            return None
        finally:
            client.close()
        if live >= self.count:
            return f"{self.count} local worker(s) ready ({time.monotonic() - self.started:.1f}s)"
        if now - self.started > WORKERS_READY_S:
            return f"[yellow]only {live} of {self.count} local workers joined so far; see their logs[/]"
        return None


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
            time.sleep(JOIN_CODE_POLL_S)
        return None
    finally:
        client.close()
