"""`processdistro top` (issue 10.2): in a real terminal (tmux) against a real controller with
a job running on real nodes, it shows the job and the nodes, the frame changes as the job
progresses, `q` and Ctrl-C quit with no traceback and the terminal's mode restored; `--once`
prints one plain frame; no line is wider than the terminal. The frame's layout itself is
table-tested on plain `ClusterStatus` values (`render`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Controller
from nodes import Node
from processdistro.shared import keys
from processdistro.shared.core.status import ClusterStatus, Event, JobRow, NodeRow
from processdistro.shared.messages import Submit
from processdistro.shared.store.client import list_nodes
from processdistro.shared.store.connection import Client
from processdistro.top import render
from rich.cells import cell_len
from rich.console import Console

# 70 tiles; at 0.4 s a tile on two one-core nodes the job runs for about 15 s
SLOW_JOB = ["--width", "300", "--height", "200", "--tile", "32", "--max-iter", "200"]
TILE_DELAY_S = 0.4
HOSTILE = "[bold red]x[/] \x1b[31mred\x1b[0m"


@contextlib.contextmanager
def nodes_running(*nodes: Node) -> Iterator[None]:
    """The nodes work in a thread of their own until the block ends."""
    stop = threading.Event()

    async def main() -> None:
        done = asyncio.Event()
        tasks = [asyncio.create_task(n.run(stop=done)) for n in nodes]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.gather(*tasks)

    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name="nodes")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
    if errors:
        raise errors[0]


def wait_for(what: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.2)


class Tmux:
    """One program in a real terminal of its own (a tmux server on a private socket), kept
    on screen after it exits (`remain-on-exit`), so its exit status can be read."""

    def __init__(self, tmp: Path, env: dict[str, str], command: str, *, width: int = 80, height: int = 30) -> None:
        self.socket = str(tmp / "tmux.sock")
        conf = tmp / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 0\n")
        self.env = {k: v for k, v in env.items() if k not in ("TMUX", "TMUX_PANE")}
        self.env["TERM"] = "xterm-256color"
        self.tmux("-f", str(conf), "new-session", "-d", "-x", str(width), "-y", str(height), "-s", "t", command)

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", self.socket, *args], env=self.env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"tmux {args[0]}: {done.stderr}"
        return done.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def dead(self) -> tuple[bool, int | None]:
        out = self.tmux("display-message", "-p", "-t", "t", "#{pane_dead} #{pane_dead_status}").split()
        return out[0] == "1", int(out[1]) if len(out) > 1 and out[1] else None

    def ended(self) -> str | None:
        """How the pane's process ended ("status N" or "signal N"), once tmux knows: it marks a
        pane dead when the terminal closes, which can come before it has reaped the process."""
        dead, status, sig = (
            self.tmux("display-message", "-p", "-t", "t", "#{pane_dead}|#{pane_dead_status}|#{pane_dead_signal}")
            .strip()
            .split("|")
            + ["", ""]
        )[:3]
        if dead != "1":
            return None
        return f"status {status}" if status else f"signal {sig}" if sig else None

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=30)


def top_command(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "processdistro", "top", *args])


def node_ids(r: Client) -> list[str]:
    return [n["id"] for n in list_nodes(r, 30.0) if n["live"] == "yes"]


def percent_of(screen: str, job_id: str) -> float | None:
    """The % cell of the job's row: the number after the bar."""
    for line in screen.splitlines():
        if job_id in line:
            found = re.search(r"\s(\d{1,3}\.\d)\s", line[len(job_id) :])
            return float(found.group(1)) if found else None
    return None


# ------------------------------------------------------------------ in a real terminal


def test_top_in_a_terminal_follows_a_running_job_and_quits_on_q(
    controller: Controller, tmp_path: Path, r: Client
) -> None:
    proc = controller.submit_mandelbrot(tmp_path, *SLOW_JOB)
    nodes = [Node(controller.url, controller.join_code, cores=1, delay=TILE_DELAY_S) for _ in range(2)]
    term: Tmux | None = None
    try:
        with nodes_running(*nodes):
            wait_for(lambda: len(node_ids(r)) == 2 and r.zcard(keys.JOBS) == 1, 60, controller.logs)
            job_id = r.zrange(keys.JOBS, 0, 0)[0].decode()
            ids = node_ids(r)
            term = Tmux(tmp_path, controller.env, top_command())
            seen: list[float] = []

            def progressed() -> bool:
                screen = term.screen()
                p = percent_of(screen, job_id)
                if p is not None and (not seen or p != seen[-1]):
                    seen.append(p)
                return len(seen) >= 3 and all(i[:8] in screen for i in ids)

            wait_for(progressed, 60, lambda: f"{seen}\n{term.screen()}\n{controller.logs()}")
            screen = term.screen()
            assert seen == sorted(seen) and seen[-1] > seen[0], seen
            assert "processdistro top" in screen and "running" in screen and "native" in screen, screen
            lines = screen.splitlines()
            assert lines[0].startswith("processdistro top"), screen  # the frame fits: nothing scrolled
            assert max(cell_len(line) for line in lines) <= 80
            term.keys("q")
            wait_for(lambda: term.ended() is not None, 10, term.screen)
            assert term.ended() == "status 0", term.screen()
            after = term.screen()
            assert "Traceback" not in after, after
            assert "processdistro top" not in after, after  # the alternate screen is gone
            proc.wait(120)
        assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    finally:
        if term is not None:
            term.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_quits_top_and_restores_the_terminal(redis_url: str, r: Client, tmp_path: Path, how: str) -> None:
    """Ctrl-C (and SIGTERM): exit status 0, no traceback, the terminal back in canonical
    mode with echo."""
    env = {**os.environ, "PD_REDIS_URL": redis_url, "PD_HOME": str(tmp_path)}
    report = tmp_path / "after.txt"
    script = f'{top_command()}; echo "top exited $?" > {report}; stty -a >> {report}'
    term = Tmux(tmp_path, env, shlex.join(["bash", "-c", script]))
    try:
        wait_for(lambda: "no jobs yet" in term.screen(), 30, term.screen)
        assert "no nodes have joined yet" in term.screen()
        if how == "ctrl-c":
            term.keys("C-c")
        else:
            shell = int(term.tmux("display-message", "-p", "-t", "t", "#{pane_pid}"))
            top = subprocess.run(["pgrep", "-P", str(shell)], capture_output=True, text=True).stdout.split()
            assert len(top) == 1, top
            os.kill(int(top[0]), signal.SIGTERM)
        wait_for(lambda: term.dead()[0], 10, term.screen)
        text = report.read_text()
        assert text.startswith("top exited 0"), text
        modes = set(text.split())
        assert {"icanon", "echo"} <= modes and not {"-icanon", "-echo"} & modes, text
        assert "Traceback" not in term.screen(), term.screen()
    finally:
        term.close()


# ------------------------------------------------------------------ --once, for scripts


def once(ctl: Controller, columns: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processdistro", "top", "--once"],
        env={**ctl.env, "COLUMNS": str(columns), "LINES": "30"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_once_prints_one_plain_frame_that_fits(controller: Controller, tmp_path: Path, r: Client) -> None:
    """`--once` against a running job: the job with its progress, the nodes, plain text (no
    escape sequence), every line within 80 columns at 80; at 160 the whole node ids."""
    proc = controller.submit_mandelbrot(tmp_path, *SLOW_JOB)
    nodes = [Node(controller.url, controller.join_code, cores=1, delay=TILE_DELAY_S) for _ in range(2)]
    try:
        with nodes_running(*nodes):
            wait_for(lambda: len(node_ids(r)) == 2 and r.zcard(keys.JOBS) == 1, 60, controller.logs)
            job_id = r.zrange(keys.JOBS, 0, 0)[0].decode()
            wait_for(lambda: int(r.hget(keys.job(job_id), "done") or 0) > 0, 60, controller.logs)
            ids = node_ids(r)
            narrow = once(controller, 80)
            assert narrow.returncode == 0, narrow.stderr
            out = narrow.stdout
            assert "\x1b" not in out, out
            assert job_id in out and "mandelbrot" in out and "#" in out, out
            rows = {i: [line for line in out.splitlines() if line.startswith(i[:8])] for i in ids}
            assert all(len(found) == 1 and i not in found[0] for i, found in rows.items()), out
            widths = [cell_len(line) for line in out.splitlines()]
            assert max(widths) <= 80, out
            wide = once(controller, 160)
            assert wide.returncode == 0, wide.stderr
            assert all(i in wide.stdout for i in ids), wide.stdout
            assert max(cell_len(line) for line in wide.stdout.splitlines()) <= 160, wide.stdout
            proc.wait(120)
        assert proc.returncode == 0, (tmp_path / "submit.log").read_text() + controller.logs()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ the frame (pure)


def node(i: int, **over: object) -> NodeRow:
    values: dict[str, object] = dict(
        id=f"nodeid{i:02d}-" + "x" * 30,
        kind="browser" if i % 2 else "native",
        agent=f"Chrome 131 / Android 14 {HOSTILE} " + "y" * 60,
        gpu="ANGLE (Qualcomm, Adreno (TM) 730, OpenGL ES 3.2)",
        address="192.168.1.23",
        slots=4,
        running=2,
        done=1234,
        rate_per_min=56.0,
        score=389022660.0,
        state="busy",
        joined=0.0,
    )
    values.update(over)
    return NodeRow(**values)  # type: ignore[arg-type]


def job(i: int, **over: object) -> JobRow:
    values: dict[str, object] = dict(
        id=f"20261130-180000-{i:06x}",
        kind="mandelbrot",
        state="running",
        done=456,
        total=1000,
        percent=45.6,
        rate=12.3,
        eta_s=44.0,
        failures=2,
        verified=450,
        rejected=1,
        replicate=0.05,
        created=0.0,
        finished=None,
        note="",
        error=f"subtask 3 failed; last error: {HOSTILE}",
        outputs=(),
        image=True,
    )
    values.update(over)
    return JobRow(**values)  # type: ignore[arg-type]


def status(jobs: int, nodes: int, events: int) -> ClusterStatus:
    totals = {"nodes_live": nodes, "slots": 4.0 * nodes, "throughput": 12.3, "tasks_queued": 7, "tasks_running": 3}
    return ClusterStatus(
        now=1_790_000_000.0,
        nodes=[node(i) for i in range(nodes)],
        jobs=[job(i) for i in range(jobs)],
        events=[
            Event(ts=1_790_000_000.0 - i, type="node", text=f"node n{i} joined ({HOSTILE})") for i in range(events)
        ],
        totals={k: float(v) for k, v in totals.items()},
    )


def draw(frame: ClusterStatus, width: int, height: int, plain: bool = False, waiting: int = 0) -> list[str]:
    console = Console(
        file=io.StringIO(), width=width, height=height, record=True, force_terminal=True, color_system="truecolor"
    )
    submits = [Submit(job_id=f"20261130-190000-{i:06x}", kind="hash", params={}, created=0.0) for i in range(waiting)]
    console.print(render(frame, submits, width=width, height=height, plain=plain))
    return console.export_text(styles=False).splitlines()


@pytest.mark.parametrize(
    ("width", "height", "jobs", "nodes", "events"),
    [
        (80, 24, 1, 2, 5),
        (80, 30, 12, 40, 50),
        (80, 10, 3, 3, 3),
        (100, 30, 2, 3, 3),
        (120, 40, 5, 5, 30),
        (200, 50, 5, 5, 30),
    ],
    ids=["80x24", "80x30 crowded", "80x10 tiny", "100 wide", "120 wide", "200 wide"],
)
def test_live_frame_fits_the_terminal(width: int, height: int, jobs: int, nodes: int, events: int) -> None:
    lines = draw(status(jobs, nodes, events), width, height)
    assert max(cell_len(line) for line in lines) <= width, "\n".join(lines)
    assert len(lines) <= max(height, 14), "\n".join(lines)  # tiny terminals keep one row of each
    text = "\n".join(lines)
    assert "20261130-180000-000000" in text and "45.6" in text and "12.3/s" in text and "44s" in text, text
    assert "389 Mit/s" in text and "nodeid00" in text, text


@pytest.mark.parametrize(
    ("width", "shows", "hides"),
    [
        (80, ["nodeid00", "busy", "56", "389 Mit/s", "Chrome 131"], ["192.168.1.23", "nodeid00-xxxxxxxxxxxx", "450/1"]),
        (120, ["ANGLE (Qualcomm", "450/1", "456/1000"], ["192.168.1.23"]),
        (160, ["192.168.1.23", "nodeid00-" + "x" * 30, "subtask 3 failed; last error: [bold red]x[/]"], []),
    ],
    ids=["80: the essentials", "120: gpu and checks", "160: everything"],
)
def test_wider_terminals_show_more(width: int, shows: list[str], hides: list[str]) -> None:
    text = "\n".join(draw(status(1, 2, 3), width, 40))
    for s in shows:
        assert s in text, (s, text)
    for s in hides:
        assert s not in text, (s, text)


def test_crowded_frame_says_what_it_left_out() -> None:
    text = "\n".join(draw(status(12, 40, 50), 80, 30))
    assert re.search(r"… \d+ more jobs", text) and re.search(r"… \d+ more nodes", text), text


def test_plain_frame_has_every_row_and_ascii_bars() -> None:
    lines = draw(status(12, 40, 50), 80, 30, plain=True, waiting=2)
    text = "\n".join(lines)
    assert "more jobs" not in text and text.count("nodeid") == 40 and "####" in text, text
    assert text.count("submitted") == 2 and "20261130-190000-000001" in text, text
    assert "━" not in text and max(cell_len(line) for line in lines) <= 80


def test_node_text_is_shown_literally() -> None:
    """Issue 9.8 in `top`: markup in a node's text is printed as written, control characters
    as escapes, on a colour terminal."""
    console = Console(width=200, height=40, record=True, force_terminal=True, color_system="truecolor")
    with console.capture() as captured:
        console.print(render(status(1, 2, 3), [], width=200, height=40))
    raw = captured.get()
    assert "[bold red]x[/] \\x1b[31mred\\x1b[0m" in raw, raw
    assert "\x1b[31mred" not in raw and "\x1b[1;31mx" not in raw
