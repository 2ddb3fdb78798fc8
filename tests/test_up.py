"""`processdistro up` on its own: embedded Redis, supervised children, clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import started_up
from processdistro.shared.redis_server import free_port


def children_of(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def up(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, str], Path]:
    env = {k: v for k, v in os.environ.items() if k != "PD_REDIS_URL"}
    env.update({"PD_HOME": str(tmp_path / "home"), "PD_PORT": str(free_port()), "PD_HOST": "127.0.0.1"})
    log = tmp_path / "up.log"
    with started_up(["up"], env=env, log=log, ready="Join link") as proc:
        yield proc, env, log


def test_up_prints_join_link_and_stops_cleanly(up: tuple[subprocess.Popen[str], dict[str, str], Path]) -> None:
    proc, env, log = up
    text = log.read_text()
    assert "/agent?code=" in text
    info = json.loads((Path(env["PD_HOME"]) / "controller.json").read_text())
    assert info["redis_url"].startswith("redis://:") and "@127.0.0.1:" in info["redis_url"]  # with its password
    assert info["join_url"].endswith(text.split("/agent?code=")[1].split()[0])
    port = env["PD_PORT"]
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    # every other command finds the controller through controller.json
    jobs = subprocess.run(
        [sys.executable, "-m", "processdistro", "jobs"], env=env, capture_output=True, text=True, timeout=30
    )
    assert jobs.returncode == 0 and "no jobs yet" in jobs.stdout
    kids = children_of(proc.pid)
    assert len(kids) == 4  # redis, gateway, scheduler, aggregator
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)
    assert time.monotonic() - started < 10
    assert proc.returncode == 0
    time.sleep(0.2)
    assert not [k for k in kids if alive(k)], "orphaned children"
    assert not (Path(env["PD_HOME"]) / "controller.json").exists()


def test_up_restarts_a_dead_service(up: tuple[subprocess.Popen[str], dict[str, str], Path]) -> None:
    proc, env, log = up
    kids = children_of(proc.pid)
    scheduler = next(k for k in kids if "scheduler" in Path(f"/proc/{k}/cmdline").read_text())
    os.kill(scheduler, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while "scheduler exited" not in log.read_text() or len(children_of(proc.pid)) < 4:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert scheduler not in children_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)


def test_up_redis_has_a_password_and_state_files_are_private(
    up: tuple[subprocess.Popen[str], dict[str, str], Path],
) -> None:
    """Issue 9.10: the embedded Redis had no password while its append-only file and
    controller.json (which holds the join link) were world-readable. Fix: `up` generates a
    password once (PD_HOME/redis.password, 0600), gives it to Redis in a 0600 config file and
    to every service in the URL; the Redis directory is 0700, its files and controller.json 0600."""
    from processdistro.shared.store.connection import plain_client

    proc, env, log = up
    home = Path(env["PD_HOME"])

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    password = (home / "redis.password").read_text().strip()
    assert len(password) >= 32
    assert mode(home / "redis.password") == 0o600
    assert mode(home / "controller.json") == 0o600
    assert mode(home / "redis") == 0o700
    files = [p for p in (home / "redis").iterdir() if p.is_file()]
    assert any(p.name.startswith("appendonly") for p in files), files
    assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
    assert password not in log.read_text()  # not printed
    url = json.loads((home / "controller.json").read_text())["redis_url"]
    assert f":{password}@127.0.0.1:" in url
    # without the password Redis refuses; with it, it answers
    anonymous = plain_client(url.replace(f":{password}@", ""))
    with pytest.raises(Exception, match="(?i)auth"):
        anonymous.ping()
    anonymous.close()
    client = plain_client(url)
    assert client.ping()
    # every service connected with it: they are all registered and the gateway is healthy
    deadline = time.monotonic() + 30
    while not {"scheduler", "aggregator"} <= (
        services := {k.decode().split(":")[2] for k in client.scan_iter(match="pd:service:*")}
    ):
        assert time.monotonic() < deadline, (services, log.read_text())
        time.sleep(0.1)
    client.close()
    assert httpx.get(f"http://127.0.0.1:{env['PD_PORT']}/healthz").status_code == 200
    # the command line of redis-server does not carry the password
    redis_pid = next(k for k in children_of(proc.pid) if "redis" in Path(f"/proc/{k}/cmdline").read_text())
    assert password not in Path(f"/proc/{redis_pid}/cmdline").read_text()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)
    assert (home / "redis.password").read_text().strip() == password  # kept for the next `up`


def test_ctrl_c_stops_services_first_and_redis_last(tmp_path: Path) -> None:
    """Issue 10.5: Ctrl-C reaches the whole foreground process group. The embedded Redis was
    in it and exited first, so the services spent their grace time reconnecting (6.3 s, a
    "control channel lost … Connection refused" in the gateway's log). It now runs in a
    session of its own: the services stop against a live Redis, and `up` stops Redis last."""
    env = {k: v for k, v in os.environ.items() if k != "PD_REDIS_URL"}
    home = tmp_path / "home"
    env.update({"PD_HOME": str(home), "PD_PORT": str(free_port()), "PD_HOST": "127.0.0.1"})
    log = tmp_path / "up.log"
    with started_up(["up"], env=env, log=log, ready="Join link") as proc:
        kids = children_of(proc.pid)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=30)
        took = time.monotonic() - started
    logs = {p.name: p.read_text() for p in (home / "logs").glob("*.log")}
    assert proc.returncode == 0, log.read_text()
    time.sleep(0.2)
    assert not [k for k in kids if alive(k)], "orphaned children"
    for name, text in logs.items():
        assert "Traceback" not in text and "Connection refused" not in text, (name, text)
    assert "control channel lost" not in logs["gateway.log"], logs["gateway.log"]
    assert took < 5, f"stopping took {took:.1f}s (6.3 s when Redis went first)"


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.mark.parametrize(
    ("how", "sig"),
    [
        pytest.param("ctrl-c", signal.SIGINT, id="ctrl-c-to-the-process-group"),
        pytest.param("sigterm", signal.SIGTERM, id="sigterm-to-up-alone"),
    ],
)
def test_idle_up_with_a_worker_stops_within_a_second(tmp_path: Path, how: str, sig: signal.Signals) -> None:
    """Issue 10.5: an idle `up --workers 1` stops on Ctrl-C (SIGINT to the whole foreground
    group) and on SIGTERM (to `up` alone, as a service manager sends it) within about a second:
    every process it started (the worker's executor processes too) gone, no traceback, no
    forced kill. `up` says when its local worker joined."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PD_")}
    home = tmp_path / "home"
    env.update({"PD_HOME": str(home), "PD_PORT": str(free_port()), "PD_HOST": "127.0.0.1"})
    log = tmp_path / "up.log"
    with started_up(["up", "--workers", "1"], env=env, log=log, ready="1 local worker(s) ready", timeout=120) as proc:
        time.sleep(1.0)  # idle: every service in its steady loop
        everything = descendants(proc.pid)
        assert len(everything) >= 6, everything  # redis, three services, the worker and its executor
        started = time.monotonic()
        if how == "ctrl-c":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=30)
        took = time.monotonic() - started
    print(f"\n{how}: up returned {took:.2f}s after the signal")
    assert proc.returncode == 0, log.read_text()
    time.sleep(0.2)
    assert not [p for p in everything if alive(p)], "orphaned processes"
    text = log.read_text()
    assert "Stopped." in text and "restarting" not in text, text
    logs = {p.name: p.read_text() for p in (home / "logs").glob("*.log")}
    assert set(logs) >= {"gateway.log", "scheduler.log", "aggregator.log", "worker-1.log"}, set(logs)
    for name, body in logs.items():
        assert "Traceback" not in body and "Connection refused" not in body, (name, body)
    assert "stopped" in logs["worker-1.log"], logs["worker-1.log"]
    # about a second when idle; the margin is for a loaded 2-core machine
    assert took < 3, f"stopping took {took:.2f}s"


def test_a_backoff_ends_when_the_stop_flag_is_set() -> None:
    """A stop signal during a service's backoff (Redis unreachable: up to 5 s) ends the wait
    within a slice, instead of after the whole backoff (a plain sleep resumes after the
    signal handler). Run on a thread here; a service's handler sets the flag the same way."""
    import threading

    from processdistro.shared.service import StopFlag, run_forever
    from processdistro.shared.store.connection import UNAVAILABLE

    flag = StopFlag()
    calls: list[float] = []

    def step() -> None:
        calls.append(time.monotonic())
        raise UNAVAILABLE[0]("Redis is down")

    timer = threading.Timer(1.0, lambda: setattr(flag, "stopping", True))
    timer.start()
    started = time.monotonic()
    run_forever("test", flag, step)
    took = time.monotonic() - started
    timer.join()
    assert len(calls) >= 3  # backoffs of 0.1, 0.2, 0.4, then 0.8 cut short at 1 s
    assert took < 1.5, f"the backoff went on {took - 1.0:.2f}s after the stop flag"
    flag.stopping = False
    started = time.monotonic()
    flag.pause(0.3)  # unset: the whole pause
    assert time.monotonic() - started >= 0.3
