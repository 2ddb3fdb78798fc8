"""`processdistro top`: the operator's live view in a terminal, in the manner of `htop`:
totals, jobs with progress, nodes with rates, recent events; about one frame a second; `q`
or Ctrl-C quits. `--once` prints one plain frame for scripts.

Why rich's `Live` and not textual: rich already draws every table of this CLI; a view
that only shows needs no widgets, focus or mouse, and `Live` redraws one renderable in
place (here on the alternate screen, so the shell comes back as it was). textual would
bring a framework and an event loop of its own for one key. That key is read by hand:
stdin in cbreak mode (`tty.setcbreak`, restored on the way out whatever happens), and a
`select` with a timeout is the frame clock.

The frame comes from `store.status.StatusReader` (what the dashboard shows too) and the
submit commands the scheduler has not read yet (`store.client.submitted`). Every text a
node or a job carries goes through `console.literal`, never through markup.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .console import Subcommands, console, literal
from .shared.core.status import ClusterStatus, JobRow, NodeRow, format_eta, format_rate, format_score
from .shared.exceptions import ConfigError, ProcessDistroError
from .shared.messages import Submit
from .shared.settings import Settings
from .shared.store import client as store
from .shared.store.connection import UNAVAILABLE
from .shared.store.status import StatusReader
from .show import SUBMITTED, short_ids

if TYPE_CHECKING:
    from .shared.store.client import Redis

REFRESH_S = 1.0  #: one frame a second, like top
QUIT_KEYS = (b"q", b"Q")
#: Widths from which more columns are shown.
WIDE = 110
FULL = 150


def add_top_parser(sub: Subcommands) -> None:
    """`top`; `sub` is the top-level parser's subparsers action."""
    top = sub.add_parser("top", help="a live view of jobs, nodes and events (q quits)")
    top.add_argument(
        "--once", action="store_true", help="print one plain frame and exit (rates over one second), for scripts"
    )
    top.add_argument("--interval", type=float, default=REFRESH_S, metavar="SECONDS", help="seconds between frames")
    top.set_defaults(func=cmd_top)


# ---------------------------------------------------------------------------- a frame


def _jobs_table(jobs: list[JobRow], waiting: list[Submit], width: int, rows: int, plain: bool) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), expand=True, header_style="bold")
    table.add_column("job", no_wrap=True, overflow="ellipsis")
    table.add_column("kind", no_wrap=True, overflow="ellipsis", max_width=10)
    table.add_column("state", no_wrap=True, overflow="ellipsis", max_width=10)
    table.add_column("progress", no_wrap=True, min_width=6, max_width=40, ratio=1)
    table.add_column("%", justify="right", no_wrap=True)
    table.add_column("rate", justify="right", no_wrap=True)
    table.add_column("ETA", justify="right", no_wrap=True)
    table.add_column("fail", justify="right", no_wrap=True)
    if width >= WIDE:
        table.add_column("done/total", justify="right", no_wrap=True)
        table.add_column("checked", justify="right", no_wrap=True)
    if width >= FULL:
        table.add_column("error / waiting for", no_wrap=True, overflow="ellipsis", ratio=2)
    shown = 0
    for c in waiting[:rows]:
        cells: list[RenderableType] = [literal(c.job_id), literal(c.kind), literal(SUBMITTED, "yellow")]
        cells += [_bar(0.0, plain), "0.0", "-", "-", "0"]
        if width >= WIDE:
            cells += ["-", "-"]
        if width >= FULL:
            cells += [literal("the scheduler to read it")]
        table.add_row(*cells)
        shown += 1
    for j in jobs[: max(0, rows - shown)]:
        cells = [literal(j.id), literal(j.kind), literal(j.state, _STATE_STYLE.get(j.state, ""))]
        cells += [_bar(j.percent, plain), f"{j.percent:.1f}", format_rate(j.rate), format_eta(j.eta_s)]
        cells += [Text(str(j.failures), style="red" if j.failures else "")]
        if width >= WIDE:
            cells += [f"{j.done}/{j.total}", f"{j.verified}/{j.rejected}"]
        if width >= FULL:
            cells += [literal(j.error or j.note)]
        table.add_row(*cells)
        shown += 1
    return table


_STATE_STYLE = {
    "running": "cyan",
    "done": "green",
    "failed": "red",
    "cancelled": "red",
    "finalizing": "cyan",
    "busy": "cyan",
    "idle": "green",
    "benched": "yellow",
    "banned": "red",
    "left": "dim",
}


def _bar(percent: float, plain: bool) -> RenderableType:
    if plain:  # a script reads "####......"
        filled = int(round(percent / 10))
        return Text("#" * filled + "." * (10 - filled))
    return ProgressBar(total=100.0, completed=percent, complete_style="green", finished_style="green")


def _nodes_table(nodes: list[NodeRow], width: int, rows: int, plain: bool) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), expand=True, header_style="bold")
    table.add_column("node", no_wrap=True)
    table.add_column("kind", no_wrap=True, overflow="ellipsis", max_width=7)
    table.add_column("state", no_wrap=True, overflow="ellipsis", max_width=7)
    table.add_column("slots", justify="right", no_wrap=True)
    table.add_column("run", justify="right", no_wrap=True)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("/min", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("browser / os", no_wrap=True, overflow="ellipsis", min_width=6, ratio=2)
    if width >= WIDE:
        table.add_column("gpu", no_wrap=True, overflow="ellipsis", ratio=1)
    if width >= FULL:
        table.add_column("address", no_wrap=True, overflow="ellipsis")
    short = short_ids(n.id for n in nodes) if width < FULL else {n.id: n.id for n in nodes}
    for n in nodes[:rows]:
        cells: list[RenderableType] = [
            literal(short[n.id]),
            literal(n.kind),
            literal(n.state, _STATE_STYLE.get(n.state, "")),
            str(n.slots),
            str(n.running),
            str(n.done),
            f"{n.rate_per_min:.0f}" if n.rate_per_min else "-",
            format_score(n.score),
            literal(n.agent),
        ]
        if width >= WIDE:
            cells.append(literal(n.gpu))
        if width >= FULL:
            cells.append(literal(n.address))
        table.add_row(*cells)
    return table


def _events_table(status: ClusterStatus, rows: int, plain: bool) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), expand=True, show_header=False)
    table.add_column("time", no_wrap=True, style="dim")
    table.add_column("event", no_wrap=True, overflow="ellipsis", ratio=1)
    for e in status.events[:rows]:
        when = datetime.fromtimestamp(e.ts).strftime("%H:%M:%S") if e.ts > 0 else ""
        table.add_row(when, literal(e.text))
    return table


def _header(status: ClusterStatus, queued_jobs: int, note: str, width: int) -> Text:
    """Title and clock, then the totals packed into as few lines as `width` allows (the
    caller counts them: `render` sizes the sections by the lines left)."""
    t = status.totals
    clock = datetime.fromtimestamp(status.now).strftime("%H:%M:%S")
    head = Text.assemble(("processdistro top", "bold"), f"  {clock}  ")
    if note:
        head.append(note, style="yellow")
    head.truncate(width, overflow="ellipsis")
    parts = [
        f"nodes {t.get('nodes_live', 0):.0f} live",
        f"slots {t.get('slots', 0):.0f}",
        f"done {format_rate(t.get('throughput', 0.0))}",
        f"tasks {t.get('tasks_queued', 0):.0f} queued {t.get('tasks_running', 0):.0f} running",
        f"jobs {t.get('jobs_active', 0) + queued_jobs:.0f} active",
    ]
    line = ""
    for part in parts:
        if line and len(line) + 3 + len(part) > width:
            head.append("\n" + line)
            line = part
        else:
            line = f"{line} · {part}" if line else part
    head.append("\n" + line)
    return head


def _more(hidden: int, what: str) -> Text:
    return Text(f"… {hidden} more {what}", style="dim")


def render(
    status: ClusterStatus, waiting: list[Submit], *, width: int, height: int, plain: bool = False, note: str = ""
) -> RenderableType:
    """One frame at `width` x `height` (plain: no colour bars, every row; for `--once`).
    Jobs and nodes share the rows left by the header; events get what remains."""
    jobs_all = len(waiting) + len(status.jobs)
    header = _header(status, len(waiting), note, width)
    if plain:
        job_rows, node_rows, event_rows = jobs_all, len(status.nodes), len(status.events)
    else:
        # the header, a blank line, per section a title and a column header (events: a title)
        room = max(3, height - len(header.plain.splitlines()) - 1 - 2 - 2 - 1 - 1)
        job_rows = min(jobs_all, max(1, room // 3))
        node_rows = min(len(status.nodes), max(1, (room - job_rows) // 2))
        if node_rows < len(status.nodes) or job_rows < jobs_all:
            room -= 1  # a "… N more" line
        event_rows = max(0, room - job_rows - node_rows)
    parts: list[RenderableType] = [header, Text("")]
    parts.append(Text("jobs", style="bold underline"))
    if jobs_all:
        parts.append(_jobs_table(status.jobs, waiting, width, job_rows, plain))
        if job_rows < jobs_all:
            parts.append(_more(jobs_all - job_rows, "jobs"))
    else:
        parts.append(Text("no jobs yet", style="dim"))
    parts.append(Text("nodes", style="bold underline"))
    if status.nodes:
        parts.append(_nodes_table(status.nodes, width, node_rows, plain))
        if node_rows < len(status.nodes):
            parts.append(_more(len(status.nodes) - node_rows, "nodes"))
    else:
        parts.append(Text("no nodes have joined yet", style="dim"))
    if event_rows > 0:
        parts.append(Text("events", style="bold underline"))
        parts.append(_events_table(status, event_rows, plain) if status.events else Text("none yet", style="dim"))
    return Group(*parts)


# ---------------------------------------------------------------------------- the loop


class Frames:
    """Reads frames: the operator's view and the submits not yet read, one reader kept
    between frames (it holds the rate samples)."""

    def __init__(self, r: Redis, settings: Settings) -> None:
        self.r = r
        self.reader = StatusReader(settings.node_timeout_s)

    def read(self) -> tuple[ClusterStatus, list[Submit]]:
        waiting = store.submitted(self.r)  # first: a job applied in between is then in the status
        status = self.reader.read(self.r)
        known = {j.id for j in status.jobs}
        return status, [c for c in waiting if c.job_id not in known]


@contextlib.contextmanager
def cbreak(fd: int | None) -> Iterator[None]:
    """Keys arrive one by one, unechoed (Ctrl-C still interrupts); the terminal's mode is
    restored on the way out, by exception or not. `fd` None (not a terminal): nothing."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def wait_for_key(fd: int | None, timeout: float) -> bool:
    """Wait up to `timeout` for a key; True if it says quit. Without a terminal on stdin,
    just wait."""
    if fd is None:
        time.sleep(timeout)
        return False
    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable:
        return False
    data = os.read(fd, 64)
    return not data or any(k in data for k in QUIT_KEYS)  # end of input quits too


def cmd_top(args: argparse.Namespace, settings: Settings) -> int:
    """The live view, or with `--once` (or when stdout is not a terminal) one plain frame."""
    if not 0.1 <= args.interval <= 60:
        raise ConfigError(f"expected --interval between 0.1 and 60 seconds, got {args.interval}")
    frames = Frames(store.connect(settings.resolved_redis_url(), retry=False), settings)
    if args.once or not console.is_terminal:
        try:
            return _once(frames, args.interval)
        except UNAVAILABLE as exc:
            raise ProcessDistroError(f"Redis unreachable: {exc}") from None
    # SIGTERM (`kill`) quits the same way as Ctrl-C: through the `finally`s that give the
    # terminal back its mode and its screen
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _live(frames, args.interval)
    except KeyboardInterrupt:  # Ctrl-C is a way to quit, not an error
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _once(frames: Frames, interval: float) -> int:
    frames.read()  # a first sample, so the rates in the frame are real
    time.sleep(min(interval, REFRESH_S))
    status, waiting = frames.read()
    # no terminal behind it: no style codes; the lines' padding to the width is dropped
    width, height = console.size
    out = io.StringIO()
    plain = Console(file=out, width=width, height=height, color_system=None, force_terminal=False)
    plain.print(render(status, waiting, width=width, height=height, plain=True))
    sys.stdout.write("".join(line.rstrip() + "\n" for line in out.getvalue().splitlines()))
    return 0


def _live(frames: Frames, interval: float) -> int:
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    status: ClusterStatus | None = None
    waiting: list[Submit] = []
    with cbreak(fd), Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
        while True:
            note = ""
            try:
                status, waiting = frames.read()
            except UNAVAILABLE as exc:  # Redis restarting: keep the last frame, say so
                note = f"Redis unreachable, retrying: {exc}"
            if status is not None:
                width, height = console.size
                live.update(render(status, waiting, width=width, height=height, note=note), refresh=True)
            else:
                live.update(literal(note or "reading…"), refresh=True)
            if wait_for_key(fd, interval):
                return 0
