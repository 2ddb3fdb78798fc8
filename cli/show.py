"""`processdistro jobs` and `nodes`: tables (or JSON) of what Redis holds; `kinds`: the task
kinds this CLI can submit (built-in, and the task repo's: `shared/tasks/repo.py`).

Every cell of `jobs` and `nodes` may hold text a node wrote (its browser and OS, a failure
message in a job's error): each goes through `console.literal`, never through rich markup,
and numbers through `capacity.finite` (issues 9.2 and 9.8)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .console import Subcommands, console, literal
from .shared.capacity import MAX_TASK_MS, finite
from .shared.core.status import format_score, node_state
from .shared.messages import Submit
from .shared.protocol import MAX_SCORE
from .shared.settings import Settings
from .shared.store import client as store
from .shared.tasks import BUILTIN, PLUGINS, task_repo


def add_show_parsers(sub: Subcommands) -> None:
    """`jobs` and `nodes`; `sub` is the top-level parser's subparsers action."""
    jobs = sub.add_parser("jobs", help="list jobs")
    jobs.add_argument("--limit", type=int, default=30)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=cmd_jobs)

    nodes = sub.add_parser("nodes", help="list nodes (fits 80 columns; --wide for every column)")
    nodes.add_argument("--json", action="store_true")
    nodes.add_argument(
        "--wide", action="store_true", help="every column, whole ids and texts (cores, GPU, address, speeds)"
    )
    nodes.set_defaults(func=cmd_nodes)

    kinds = sub.add_parser(
        "kinds", help="list task kinds: built-in and the task repo's ($PD_TASK_REPO), with broken ones and why"
    )
    kinds.add_argument("--json", action="store_true")
    kinds.set_defaults(func=cmd_kinds)


def cmd_kinds(args: argparse.Namespace, settings: Settings) -> int:
    """Exits 1 when a kind of the task repo (or the repo itself) is broken."""
    report = task_repo()

    def source(kind: str) -> str:
        if kind in report.plugins and report.path is not None:
            return str(report.path / kind)
        return "built-in" if kind in BUILTIN else "registered"

    rows = [{"kind": k, "source": source(k), "description": p.describe()} for k, p in PLUGINS.items()]
    broken = [{"kind": b.name, "directory": str(b.directory), "error": b.error} for b in report.broken]
    if report.error:
        broken.append({"kind": "", "directory": str(report.path), "error": report.error})
    if args.json:
        console.print_json(json.dumps({"kinds": rows, "broken": broken}))
        return 1 if broken else 0
    table = Table("kind", "from", "description")
    for row in rows:
        table.add_row(*(escape(row[k]) for k in ("kind", "source", "description")))
    console.print(table)
    if broken:
        bad = Table("broken kind", "directory", "error", title="not loaded", title_justify="left")
        for b in broken:
            bad.add_row(*(escape(b[k]) for k in ("kind", "directory", "error")))
        console.print(bad)
    elif report.path is None:
        console.print("no task repo: set PD_TASK_REPO (or `processdistro up --task-repo DIR`) to add your own kinds")
    return 1 if broken else 0


SUBMITTED = "submitted"  #: a job whose submit command the scheduler has not applied yet


def _submitted_public(c: Submit) -> dict[str, Any]:
    """A submit command not applied yet, in the shape of `JobRecord.to_public`."""
    return {
        "id": c.job_id,
        "kind": c.kind,
        "state": SUBMITTED,
        "done": 0,
        "total": 0,
        "priority": c.priority,
        "replicate": c.replicate,
        "created": c.created,
        "finished": None,
        "error": "",
        "note": "",
        "outputs": {},
        "params": c.params,
    }


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    r = store.connect(settings.resolved_redis_url())
    waiting = store.submitted(r)  # first: a job applied in between is then in list_jobs
    jobs = store.list_jobs(r, limit=args.limit)
    known = {j.id for j in jobs}
    waiting = [c for c in waiting if c.job_id not in known][: args.limit]
    if args.json:
        rows = [_submitted_public(c) for c in waiting] + [j.to_public() for j in jobs]
        console.print_json(json.dumps(rows[: args.limit]))
        return 0
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    ids = [c.job_id for c in waiting] + [j.id for j in jobs]
    table.add_column("job", no_wrap=True, min_width=max(map(len, ids), default=0))  # whole: `result` takes it
    table.add_column("kind", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("progress", no_wrap=True, justify="right")
    table.add_column("age", no_wrap=True, justify="right")
    table.add_column("error / waiting for", ratio=1)  # the whole reason: the cell wraps
    for c in waiting:
        cells = (c.job_id, c.kind, SUBMITTED, "", f"{time.time() - c.created:.0f}s", "the scheduler to read it")
        table.add_row(*(literal(x) for x in cells))
    for j in jobs:
        age = time.time() - j.created
        why = j.error or (j.note if j.state.live else "")
        cells = (j.id, j.kind, j.state.value, f"{j.done}/{j.total}", f"{age:.0f}s", why)
        table.add_row(*(literal(c) for c in cells))
    console.print(table if jobs or waiting else "no jobs yet")
    return 0


def short_ids(ids: Iterable[str], shortest: int = 8) -> dict[str, str]:
    """Each id cut to one common prefix length, the shortest (from `shortest` up) at which
    the prefixes are still distinct, as `docker ps` shows ids; a name that short stays whole."""
    unique = sorted(set(ids))
    n = shortest
    while len({i[:n] for i in unique}) < len(unique):
        n += 1
    return {i: i[:n] for i in unique}


def cmd_nodes(args: argparse.Namespace, settings: Settings) -> int:
    nodes = store.list_nodes(store.connect(settings.resolved_redis_url()), settings.node_timeout_s)
    if args.json:
        console.print_json(json.dumps(nodes))
        return 0
    if not nodes:
        console.print("no nodes have joined yet")
        return 0
    now = time.time()
    if args.wide:
        # never cut nor wrapped, however narrow the terminal (a table is as wide as its text)
        Console(width=100_000, highlight=False, soft_wrap=True).print(_wide_nodes(nodes, now))
        return 0
    short = short_ids(n["id"] for n in nodes)
    rows = [
        [
            literal(c)
            for c in (
                short[n["id"]],
                n.get("kind", ""),
                node_state(n, live=n["live"] == "yes", now=now),
                n.get("slots", ""),
                n.get("completed", "0"),
                n.get("rejected", "0"),
                format_score(finite(n.get("score"), MAX_SCORE) or 0.0),
                _agent(n),
            )
        ]
        for n in nodes
    ]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    # every column but the last keeps its width; the browser and OS get what is left
    used = 2  # the table's edges
    for k, name in enumerate(("node", "kind", "state", "slots", "done", "rej", "score")):
        width = min(16, max(len(name), *(row[k].cell_len for row in rows)))
        table.add_column(name, justify="right" if k >= 3 else "left", no_wrap=True, overflow="ellipsis", width=width)
        used += width + 2  # its padding and a column separator
    widest = max(len("browser / os"), *(row[-1].cell_len for row in rows))
    table.add_column("browser / os", no_wrap=True, overflow="ellipsis", width=min(widest, max(8, console.width - used)))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def _agent(n: dict[str, str]) -> str:
    return f"{n.get('browser', '')} {n.get('os', '')}".strip()


def _wide_nodes(nodes: list[dict[str, str]], now: float) -> Table:
    table = Table(
        "node", "live", "kind", "state", "browser/os", "gpu", "address", "cores", "slots", "score",
        "avg task ms", "done", "rejected", "failed",
    )  # fmt: skip
    for n in nodes:
        ewma = sorted(
            (k.split(":", 1)[1], ms)
            for k, v in n.items()
            if k.startswith("ewma_ms:") and (ms := finite(v, MAX_TASK_MS)) is not None
        )
        speeds = ", ".join(f"{kind} {ms:.0f}" for kind, ms in ewma)
        score = finite(n.get("score"), MAX_SCORE)
        cells = (
            n["id"],
            n["live"],
            n.get("kind", ""),
            node_state(n, live=n["live"] == "yes", now=now),
            _agent(n),
            n.get("gpu", ""),
            n.get("address", ""),
            n.get("cores", ""),
            n.get("slots", ""),
            f"{score:.4g} ({format_score(score)})" if score is not None else "",
            speeds,
            n.get("completed", "0"),
            n.get("rejected", "0"),
            n.get("failed", "0"),
        )
        table.add_row(*(literal(c) for c in cells))
    return table
