"""Test fixtures: one real Redis per session (a testcontainers Redis when a Docker engine
answers and has a Redis image, else the embedded server; the header of the run says which),
flushed per test; real service processes; real Chromium."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from processdistro.shared import keys
from processdistro.shared.redis_server import EmbeddedRedis, free_port
from processdistro.shared.store.connection import Client, plain_client

CHROMIUM = os.environ.get("PD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Redis images for the testcontainers path, in order: the registry's, then the one
# services/local-images.sh builds from Debian's packages where the registry is unreachable.
TEST_REDIS_IMAGES = ("redis:7", "processdistro/redis:7")


def _docker(*args: str, timeout: float = 10) -> bool:
    try:
        return subprocess.run(["docker", *args], capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _docker_engine_answers() -> bool:
    return shutil.which("docker") is not None and _docker("info")


@functools.cache
def redis_provider() -> tuple[str, str]:
    """Which Redis this session uses: ("container", IMAGE) or ("embedded", WHY).

    `PD_TEST_REDIS=embedded` forces the embedded server, `PD_TEST_REDIS_IMAGE` names the image
    (and fails the session if it cannot be had). Otherwise a Docker engine (`DOCKER_HOST` is
    respected) runs the first of TEST_REDIS_IMAGES it has or can pull; a registry that
    cannot be reached costs one failed pull, then the embedded server serves."""
    if os.environ.get("PD_TEST_REDIS") == "embedded":
        return "embedded", "PD_TEST_REDIS=embedded"
    if not _docker_engine_answers():
        return "embedded", "no Docker engine answers"
    if image := os.environ.get("PD_TEST_REDIS_IMAGE"):
        return "container", image
    for image in TEST_REDIS_IMAGES:
        if _docker("image", "inspect", image):
            return "container", image
    if _docker("pull", TEST_REDIS_IMAGES[0], timeout=180):
        return "container", TEST_REDIS_IMAGES[0]
    return "embedded", (
        f"a Docker engine answers but has none of {', '.join(TEST_REDIS_IMAGES)} and cannot pull"
        " them (services/local-images.sh builds the second from Debian's packages)"
    )


def pytest_report_header(config: pytest.Config) -> str:
    kind, detail = redis_provider()
    if kind == "container":
        return f"redis: testcontainers, image {detail}"
    return f"redis: embedded server ({detail})"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    kind, image = redis_provider()
    if kind == "container":
        from testcontainers.community.redis import RedisContainer
        from testcontainers.core.config import testcontainers_config

        # Ryuk (the reaper of containers a crashed session leaves) is an image of its own;
        # without it this fixture's own teardown is what removes the container.
        ryuk = testcontainers_config.ryuk_image
        if not (_docker("image", "inspect", ryuk) or _docker("pull", ryuk, timeout=180)):
            testcontainers_config.ryuk_disabled = True
        with RedisContainer(image) as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    server = EmbeddedRedis(directory=tmp_path_factory.mktemp("redis"), persist=False)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[Client]:
    client = plain_client(redis_url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@dataclass
class Controller:
    """The three services as real processes against the test Redis."""

    redis_url: str
    home: Path
    port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, name: str, service: str | None = None) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "processdistro", service or name], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def logs(self) -> str:
        """The services' logs and what Redis holds: what a failed test needs to say why."""
        text = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.home.glob("*.log")))
        try:
            return text + "\n--- redis\n" + self.queue_state()
        except Exception as exc:  # the dump must never hide the failure it explains
            return text + f"\n--- redis: unreadable ({exc})"

    def queue_state(self) -> str:
        """Jobs, the task stream (undelivered, pending per consumer, parked) and the results
        stream, as plain lines."""
        client = plain_client(self.redis_url)
        try:
            lines = []
            for job_id in client.zrange(keys.JOBS, 0, -1):
                h = {k.decode(): v.decode() for k, v in client.hgetall(keys.job(job_id.decode())).items()}
                lines.append(
                    f"job {job_id.decode()}: {h.get('state')} done {h.get('done')}/{h.get('total')}"
                    f" next_index {h.get('next_index')}"
                )
            groups = {g["name"]: g for g in client.xinfo_groups(keys.TASKS)}
            last = groups.get(keys.NODES_GROUP.encode(), {}).get("last-delivered-id", b"0-0")
            undelivered = len(client.xrange(keys.TASKS, b"(" + last, "+"))
            lines.append(f"tasks: {client.xlen(keys.TASKS)} entries, undelivered {undelivered}")
            for c in client.xpending(keys.TASKS, keys.NODES_GROUP).get("consumers") or []:
                lines.append(f"  pending for {c['name']}: {c['pending']}")
            lines.append(f"  parked: {sorted(m.decode() for m in client.smembers(keys.PARKED))}")
            lines.append(f"  live connections: {[m.decode() for m in client.zrange(keys.NODES, 0, -1)]}")
            lines.append(f"results: {client.xlen(keys.RESULTS)} entries")
            return "\n".join(lines)
        finally:
            client.close()

    @property
    def join_code(self) -> str:
        client = plain_client(self.redis_url)
        try:
            return client.get(keys.JOIN_CODE).decode()  # type: ignore[union-attr]
        finally:
            client.close()

    @property
    def join_url(self) -> str:
        return f"{self.url}/agent?code={self.join_code}"

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "processdistro", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit_mandelbrot(self, out: Path, *args: str) -> subprocess.Popen[str]:
        """`submit mandelbrot ARGS --wait` in the background, writing out/m.png, out/m.npy and
        its own output to out/submit.log."""
        with open(out / "submit.log", "w") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "processdistro", "submit", "mandelbrot", *args, "--wait", "-q"]
                + ["-o", str(out / "m.png"), "--raw", str(out / "m.npy")],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the gateway answers and the scheduler and aggregator registered (three Python
        processes importing at once take a while on a loaded 2-core machine)."""
        deadline = time.monotonic() + timeout
        client = plain_client(self.redis_url)
        try:
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
                try:
                    healthy = httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    healthy = False
                services = {k.decode().split(":")[2] for k in client.scan_iter(match="pd:service:*")}
                if healthy and {"scheduler", "aggregator"} <= services and client.get(keys.JOIN_CODE):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError(f"controller not ready within {timeout}s\n{self.logs()}")


@pytest.fixture
def controller_env() -> dict[str, str]:
    """Extra environment for the `controller` services (and its CLI): a test module
    overrides this fixture, e.g. to set PD_TASK_REPO."""
    return {}


@pytest.fixture
def controller(r: Client, redis_url: str, tmp_path: Path, controller_env: dict[str, str]) -> Iterator[Controller]:
    home = tmp_path / "pd-home"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "PD_REDIS_URL": redis_url,
        "PD_HOME": str(home),
        "PD_HOST": "127.0.0.1",
        "PD_PORT": str(port),
        "PD_LOG_LEVEL": "INFO",
        "PD_MAX_MESSAGE_BYTES": str(4 * 1024 * 1024),
        **controller_env,
    }
    ctl = Controller(redis_url=redis_url, home=home, port=port, env=env)
    for name in ("gateway", "scheduler", "aggregator"):
        ctl.start(name)
    try:
        ctl.wait_ready()
        yield ctl
    finally:
        ctl.stop()


@contextlib.contextmanager
def started_up(
    args: list[str], *, env: dict[str, str], log: Path, ready: str, timeout: float = 60
) -> Iterator[subprocess.Popen[str]]:
    """`processdistro <args>` (`up ...`) in a session of its own (a process group, as a shell
    gives a foreground job), its output in `log`; yields it once `ready` is in the log. On
    leaving, if it still runs: Ctrl-C to `up`, then the group killed if it is not gone in 30 s."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "processdistro", *args],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while ready not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
