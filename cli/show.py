"""`processdistro jobs` and `nodes`: tables (or JSON) of what Redis holds; `kinds`: the task
kinds this CLI can submit (built-in, and the task repo's: `shared/tasks/repo.py`).

Every cell of `jobs` and `nodes` may hold text a node wrote (its browser and OS, a failure
message in a job's error): each goes through `console.literal`, never through rich markup,
and numbers through `capacity.finite` (issues 9.2 and 9.8)."""

from __future__ import annotations

import argparse
import json
import time

from rich.markup import escape
from rich.table import Table

from .console import Subcommands, console, literal
from .shared.capacity import MAX_TASK_MS, finite
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

    nodes = sub.add_parser("nodes", help="list nodes")
    nodes.add_argument("--json", action="store_true")
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


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    jobs = store.list_jobs(store.connect(settings.resolved_redis_url()), limit=args.limit)
    if args.json:
        console.print_json(json.dumps([j.to_public() for j in jobs]))
        return 0
    table = Table("job", "kind", "state", "progress", "age", "error / waiting for")
    for j in jobs:
        age = time.time() - j.created
        why = j.error or (j.note if j.state.live else "")  # the whole reason: the cell wraps
        cells = (j.id, j.kind, j.state.value, f"{j.done}/{j.total}", f"{age:.0f}s", why)
        table.add_row(*(literal(c) for c in cells))
    console.print(table if jobs else "no jobs yet")
    return 0


def cmd_nodes(args: argparse.Namespace, settings: Settings) -> int:
    nodes = store.list_nodes(store.connect(settings.resolved_redis_url()), settings.node_timeout_s)
    if args.json:
        console.print_json(json.dumps(nodes))
        return 0
    table = Table("node", "live", "kind", "browser/os", "cores", "slots", "score", "avg task ms", "done", "rejected")
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
            f"{n.get('browser', '')} {n.get('os', '')}".strip(),
            n.get("cores", ""),
            n.get("slots", ""),
            f"{score:.3g}" if score is not None else "",
            speeds,
            n.get("completed", "0"),
            n.get("rejected", "0"),
        )
        table.add_row(*(literal(c) for c in cells))
    console.print(table if nodes else "no nodes have joined yet")
    return 0
