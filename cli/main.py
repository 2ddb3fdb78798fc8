"""`processdistro`: the controller CLI and every service's entry point.

Settings are read once here (environment `PD_*`, then flags) and passed inward; this is
the only module that calls `sys.exit`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .shared.exceptions import ProcessDistroError
from .shared.jobs import JobState
from .shared.logs import setup_logging
from .shared.settings import Settings

# soft_wrap: links and paths stay on one line, so they can be copied whole
console = Console(stderr=False, soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "redis_url", "home"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def _redis(settings: Settings) -> Any:
    from .shared.store.connection import sync_client

    return sync_client(settings.resolved_redis_url())


# ---------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from .up import run_up

    setup_logging("up", settings.log_level)
    return run_up(settings, console=console, workers=args.workers)


def cmd_service(args: argparse.Namespace, settings: Settings) -> int:
    setup_logging(args.command, settings.log_level)
    if args.command == "gateway":
        from .gateway.app import run
    elif args.command == "scheduler":
        from .scheduler.service import run
    else:
        from .aggregator.service import run
    run(settings)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import logging
    import os

    from .shared.exceptions import ConfigError
    from .worker.node import WorkerConfig, run_worker
    from .worker.runtime import MIB, Limits

    if args.cores is not None and not 1 <= args.cores <= 1024:
        raise ConfigError(f"expected --cores between 1 and 1024, got {args.cores}")
    if args.deadline <= 0 or args.memory_mb < 1:
        raise ConfigError("expected a positive --deadline and --memory-mb")
    if not args.throttle >= 1:
        raise ConfigError(f"expected --throttle of 1 or more, got {args.throttle}")
    setup_logging("worker", settings.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    config = WorkerConfig(
        join_url=args.url,
        cores=args.cores or os.cpu_count() or 1,
        home=settings.home_dir,
        name=args.name,
        limits=Limits(deadline_s=args.deadline, memory_bytes=args.memory_mb * MIB),
        throttle=args.throttle,
    )
    run_worker(config)
    return 0


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value}")
    return value


def _submit_params(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Path | None]]:
    """The job's raw parameters and which outputs go where, per kind."""
    if args.kind == "mandelbrot":
        names = ("width", "height", "xmin", "xmax", "ymin", "ymax", "max_iter", "tile")
        return {n: getattr(args, n) for n in names}, {"image": args.output, "raw": args.raw}
    if args.kind == "matmul":
        return {"a": str(args.a), "b": str(args.b), "tile": args.tile}, {"c": args.output}
    if args.kind == "hash":
        params = {"input": str(args.input), "iterations": args.iterations, "dklen": args.dklen, "batch": args.batch}
        return params, {"csv": args.output}
    params = {
        "target": args.target,
        "salt": args.salt,
        "iterations": args.iterations,
        "wordlist": str(args.wordlist),
        "chunk": args.chunk,
    }
    return params, {"json": args.output}


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from . import client

    params, targets = _submit_params(args)
    r = _redis(settings)
    job_id = client.submit(r, args.kind, params, priority=args.priority, replicate=args.replicate)
    console.print(f"submitted job [bold]{job_id}[/] ({args.kind})")
    if not args.wait:
        console.print(f"follow it with: processdistro jobs   fetch it with: processdistro result {job_id} -o FILE")
        return 0
    job = client.wait(r, job_id, console=console, timeout=args.timeout, progress=not args.quiet)
    if job.state is not JobState.DONE:
        err.print(f"[red]{client.describe_failure(job)}[/]")
        return 1
    for role, path in client.copy_outputs(job, targets).items():
        console.print(f"{role}: {path}")
    if args.kind == "crack":
        summary = json.loads(Path(job.outputs["json"]).read_text())
        if summary["found"]:
            console.print(f"password found: [bold]{summary['password']}[/]")
        else:
            console.print("not found: no word of the list matches")
        console.print(
            f"{summary['candidates_hashed']} candidates hashed, {summary['hashed_after_hit']} of them after the hit"
        )
    console.print(f"job {job_id} done in {(job.finished or time.time()) - job.created:.1f}s")
    return 0


def cmd_result(args: argparse.Namespace, settings: Settings) -> int:
    from . import client
    from .shared.store.jobs import load_job

    r = _redis(settings)
    job = load_job(r, args.job)
    if job is None:
        err.print(f"[red]no job {args.job!r}[/]")
        return 1
    if job.state is not JobState.DONE:
        err.print(f"[red]job {job.id} is {job.state.value}, no result yet[/]")
        return 1
    role = args.role or ("image" if "image" in job.outputs else next(iter(job.outputs)))
    copied = client.copy_outputs(job, {role: args.output})
    console.print(f"{role}: {copied[role]}")
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    from . import client

    jobs = client.list_jobs(_redis(settings), limit=args.limit)
    if args.json:
        console.print_json(json.dumps([j.to_public() for j in jobs]))
        return 0
    table = Table("job", "kind", "state", "progress", "age", "error")
    for j in jobs:
        age = time.time() - j.created
        table.add_row(j.id, j.kind, j.state.value, f"{j.done}/{j.total}", f"{age:.0f}s", j.error[:60])
    console.print(table if jobs else "no jobs yet")
    return 0


def cmd_nodes(args: argparse.Namespace, settings: Settings) -> int:
    from . import client

    nodes = client.list_nodes(_redis(settings), settings.node_timeout_s)
    if args.json:
        console.print_json(json.dumps(nodes))
        return 0
    table = Table("node", "live", "kind", "browser/os", "cores", "slots", "score", "avg task ms", "done", "rejected")
    for n in nodes:
        ewma = sorted((k.split(":", 1)[1], float(v)) for k, v in n.items() if k.startswith("ewma_ms:"))
        speeds = ", ".join(f"{kind} {ms:.0f}" for kind, ms in ewma)
        score = f"{float(n['score']):.3g}" if n.get("score") else ""
        table.add_row(
            n["id"],
            n["live"],
            n.get("kind", ""),
            f"{n.get('browser', '')} {n.get('os', '')}".strip(),
            n.get("cores", ""),
            n.get("slots", ""),
            score,
            speeds,
            n.get("completed", "0"),
            n.get("rejected", "0"),
        )
    console.print(table if nodes else "no nodes have joined yet")
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from . import client

    client.cancel(_redis(settings), args.job)
    console.print(f"cancel requested for job {args.job}")
    return 0


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from .shared.protocol import export_schemas

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in export_schemas().items():
        (out / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    console.print(f"wrote {len(export_schemas())} schemas to {out}")
    return 0


def cmd_healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    from .shared.service import service_alive

    return 0 if service_alive(_redis(settings), args.service) else 1


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="processdistro", description="Turn the devices on your LAN into extra CPU.")
    p.add_argument("--redis-url", help="Redis to use (default: $PD_REDIS_URL, else the running `up`'s)")
    p.add_argument("--home", type=Path, help="state directory (default: $PD_HOME or ~/.processdistro)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Redis, gateway, scheduler and aggregator; print the join link")
    up.add_argument("--host", help="gateway bind address (default 0.0.0.0)")
    up.add_argument("--port", type=int, help="gateway port (default 30000)")
    up.add_argument(
        "--workers", type=int, default=0, metavar="N", help="also start N local native workers (one core each)"
    )
    up.set_defaults(func=cmd_up)

    for name, text in (
        ("gateway", "run the HTTP/WebSocket gateway (compose entry point)"),
        ("scheduler", "run the scheduler (compose entry point)"),
        ("aggregator", "run an aggregator (compose entry point; scale freely)"),
    ):
        s = sub.add_parser(name, help=text)
        if name == "gateway":
            s.add_argument("--host")
            s.add_argument("--port", type=int)
        s.set_defaults(func=cmd_service)

    w = sub.add_parser("worker", help="join a controller as a native worker (wasmtime, one process per core)")
    w.add_argument("url", help="the join link the controller printed: http://HOST:PORT/agent?code=CODE")
    w.add_argument("--cores", type=int, help="cores to offer (default: all of this machine's)")
    w.add_argument("--name", help="identity kept across restarts (default: first free of default, default-2, ...)")
    w.add_argument("--deadline", type=float, default=300.0, metavar="SECONDS", help="per-task time limit (default 300)")
    w.add_argument("--memory-mb", type=int, default=1024, metavar="MIB", help="memory cap per task (default 1024)")
    w.add_argument(
        "--throttle",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="act like a device FACTOR times slower (>= 1): after each task sleep (FACTOR - 1) x its run time "
        "before reporting it, and report FACTOR x the run time; for tests and benchmarks (default 1)",
    )
    w.set_defaults(func=cmd_worker)

    submit = sub.add_parser("submit", help="submit a job")
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    m = kinds.add_parser(
        "mandelbrot", help="render the Mandelbrot set", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    m.add_argument("--width", type=int, default=1024)
    m.add_argument("--height", type=int, default=1024)
    m.add_argument("--xmin", type=float, default=-2.0)
    m.add_argument("--xmax", type=float, default=1.0)
    m.add_argument("--ymin", type=float, default=-1.5)
    m.add_argument("--ymax", type=float, default=1.5)
    m.add_argument("--max-iter", type=int, default=500)
    m.add_argument("--tile", type=int, default=128, help="tile edge in pixels (one subtask per tile)")
    m.add_argument("-o", "--output", type=Path, help="PNG to write when done (with --wait)")
    m.add_argument("--raw", type=Path, help="raw uint32 counts .npy to write when done (with --wait)")
    mm = kinds.add_parser(
        "matmul", help="multiply two matrices (.npy)", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    mm.add_argument("--a", type=Path, required=True, help="left matrix A (.npy, 2-D)")
    mm.add_argument("--b", type=Path, required=True, help="right matrix B (.npy, 2-D)")
    mm.add_argument("--tile", type=int, default=256, help="rows of A / columns of B per subtask")
    mm.add_argument("-o", "--output", type=Path, help="C = A @ B as .npy (with --wait)")

    h = kinds.add_parser(
        "hash",
        help="PBKDF2-HMAC-SHA256 over a CSV of password,salt rows",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    h.add_argument("--input", type=Path, required=True, help="CSV with a header: password, salt, optional id")
    h.add_argument("--iterations", type=int, default=100_000)
    h.add_argument("--dklen", type=int, default=32)
    h.add_argument("--batch", type=int, help="rows per subtask (default: about 1 s of work per subtask)")
    h.add_argument("-o", "--output", type=Path, help="output CSV: id (or row), salt, dk_hex (with --wait)")

    c = kinds.add_parser(
        "crack",
        help="search a wordlist for the password behind a PBKDF2 key",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--target", required=True, help="the derived key, hex")
    c.add_argument("--salt", required=True)
    c.add_argument("--iterations", type=int, default=100_000)
    c.add_argument("--wordlist", type=Path, required=True, help="one candidate per line, any size")
    c.add_argument("--chunk", type=int, help="wordlist bytes per subtask (default: about 1 s of work)")
    c.add_argument("-o", "--output", type=Path, help="the result summary as JSON (with --wait)")

    for sp in (m, mm, h, c):
        sp.add_argument("--priority", type=int, default=0, help="higher runs first")
        sp.add_argument(
            "--replicate",
            type=_share,
            metavar="SHARE",
            help="share of subtasks (0 to 1) computed on two distinct nodes and compared (default: PD_REPLICATE, 0.05)",
        )
        sp.add_argument("--wait", action="store_true", help="show progress and wait for the result")
        sp.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        sp.set_defaults(func=cmd_submit)

    res = sub.add_parser("result", help="copy a finished job's output")
    res.add_argument("job")
    res.add_argument("-o", "--output", type=Path, required=True)
    res.add_argument("--role", help="which output (e.g. image, raw); default the main one")
    res.set_defaults(func=cmd_result)

    jobs = sub.add_parser("jobs", help="list jobs")
    jobs.add_argument("--limit", type=int, default=30)
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=cmd_jobs)

    nodes = sub.add_parser("nodes", help="list nodes")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(func=cmd_nodes)

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job")
    cancel.set_defaults(func=cmd_cancel)

    sc = sub.add_parser("schema", help="export the protocol's JSON Schemas")
    sc.add_argument("--out", type=Path, default=Path("shared/schema"))
    sc.set_defaults(func=cmd_schema)

    hc = sub.add_parser("healthcheck", help="exit 0 when a service's heartbeat is fresh (for compose)")
    hc.add_argument("--service", choices=("scheduler", "aggregator"), required=True)
    hc.set_defaults(func=cmd_healthcheck)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        code = args.func(args, settings)
    except ProcessDistroError as exc:
        err.print(f"[red]error:[/] {exc}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
