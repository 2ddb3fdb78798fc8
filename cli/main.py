"""`processdistro`: the controller CLI and every service's entry point.

Settings are read once here (environment `PD_*`, then flags) and passed inward; this is
the only module that calls `sys.exit`. The job commands live beside it: `submit.py`
(`submit <kind>` from the task plugins, `result`, `cancel`), `show.py` (`jobs`, `nodes`), `top.py` (`top`),
`client.py` (submit/wait as a Python API), `up.py` (the single-machine supervisor). None of
them calls Redis: that is `shared/store/client.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .console import console, err
from .shared.exceptions import ConfigError, ProcessDistroError
from .shared.logs import setup_logging
from .shared.settings import Settings

# The job commands' modules (submit, show, top, ...) and the task plugins are imported only
# by the commands that use them: `up` and the services start in a fraction of the time
# (issue 11, goal 5), and each service imports what it runs.


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "redis_url", "home", "task_repo"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


# ---------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from .shared.tasks import load_task_repo
    from .up import run_up

    setup_logging("up", settings.log_level)
    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert and --key go together")
    if settings.task_repo is not None:
        settings = settings.model_copy(update={"task_repo": settings.task_repo.expanduser().resolve()})
        report = load_task_repo(settings.task_repo)
        console.print(f"Task repo {settings.task_repo}: {', '.join(report.plugins) or 'no kinds'}")
        _warn_broken()
    return run_up(settings, console=console, workers=args.workers, https=args.https, cert=args.cert, key=args.key)


def cmd_service(args: argparse.Namespace, settings: Settings) -> int:
    from .shared.tasks import task_repo

    setup_logging(args.command, settings.log_level)
    report = task_repo()
    if report.path is not None:
        log = logging.getLogger(__name__)
        log.info("task repo %s: kinds %s", report.path, ", ".join(report.plugins) or "none")
        for line in _broken_lines():
            log.warning("%s", line)
    if args.command == "gateway":
        from .gateway.app import run
    elif args.command == "scheduler":
        from .scheduler.service import run
    else:
        from .aggregator.service import run
    run(settings)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from .shared.protocol import export_schemas

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in export_schemas().items():
        (out / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    console.print(f"wrote {len(export_schemas())} schemas to {out}")
    return 0


def cmd_healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    from .shared.store.client import connect
    from .shared.store.liveness import service_alive

    return 0 if service_alive(connect(settings.resolved_redis_url()), args.service) else 1


# ---------------------------------------------------------------------------- parser


def build_parser(*, full: bool = True) -> argparse.ArgumentParser:
    """The command line. Without `full`, only the commands defined in this module (`CORE`):
    the others' modules are not imported, and a `CORE` command parses the same either way."""
    p = argparse.ArgumentParser(prog="processdistro", description="Turn the devices on your LAN into extra CPU.")
    p.add_argument("--redis-url", help="Redis to use (default: $PD_REDIS_URL, else the running `up`'s)")
    p.add_argument("--home", type=Path, help="state directory (default: $PD_HOME or ~/.processdistro)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Redis, gateway, scheduler and aggregator; print the join link")
    up.add_argument("--host", help="gateway bind address (default 0.0.0.0)")
    up.add_argument("--port", type=int, help="gateway port (default 30000)")
    up.add_argument(
        "--task-repo", type=Path, metavar="DIR", help="directory of your own task kinds (default: $PD_TASK_REPO)"
    )
    up.add_argument(
        "--workers", type=int, default=0, metavar="N", help="also start N local native workers (one core each)"
    )
    up.add_argument(
        "--https",
        action="store_true",
        help="serve HTTPS with a self-signed certificate for the LAN address (kept in $PD_HOME/tls); the join link "
        "carries its fingerprint (docs/https.md)",
    )
    up.add_argument("--cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate (implies --https)")
    up.add_argument("--key", type=Path, metavar="PEM", help="the private key of --cert")
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
    w.add_argument(
        "url",
        help="the join link the controller printed: http://HOST:PORT/agent?code=CODE (with `up --https`: "
        "https://...&fp=SHA256, the certificate this worker then accepts and no other)",
    )
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

    if full:
        _add_job_parsers(sub)

    sc = sub.add_parser("schema", help="export the protocol's JSON Schemas")
    sc.add_argument("--out", type=Path, default=Path("shared/schema"))
    sc.set_defaults(func=cmd_schema)

    hc = sub.add_parser("healthcheck", help="exit 0 when a service's heartbeat is fresh (for compose)")
    hc.add_argument("--service", choices=("scheduler", "aggregator"), required=True)
    hc.set_defaults(func=cmd_healthcheck)
    return p


def _add_job_parsers(sub: Any) -> None:
    from .retry import add_retry_parser
    from .rotate import add_rotate_parser
    from .show import add_show_parsers
    from .submit import add_cancel_parser, add_result_parser, add_submit_parser
    from .top import add_top_parser

    add_submit_parser(sub)
    add_result_parser(sub)
    add_show_parsers(sub)
    add_top_parser(sub)
    add_cancel_parser(sub)
    add_retry_parser(sub)
    add_rotate_parser(sub)


# the commands `build_parser` defines itself (the others need their modules imported)
CORE = ("up", "gateway", "scheduler", "aggregator", "worker", "schema", "healthcheck")
# commands that never look a task kind up: they do not load (or run) the task repo
NO_TASK_REPO = ("up", "worker", "schema", "healthcheck", "rotate-code")
# commands that say what is broken in the task repo themselves
SAY_BROKEN = ("kinds", "gateway", "scheduler", "aggregator")


def _broken_lines() -> list[str]:
    from .shared.tasks import task_repo

    report = task_repo()
    lines = [f"task repo: {report.error}"] if report.error else []
    lines += [f"task repo {report.path}: kind {b.name!r} not loaded: {b.error}" for b in report.broken]
    return lines


def _warn_broken() -> None:
    from rich.markup import escape

    for line in _broken_lines():
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)


def _command(argv: list[str]) -> str | None:
    """The command `argv` names, if any, before the whole parser is built."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--redis-url")
    pre.add_argument("--home")
    pre.add_argument("command", nargs="?")
    command: str | None = pre.parse_known_args(argv)[0].command
    return command


def _needs_full_parser(argv: list[str], command: str | None) -> bool:
    """Build every command's parser unless a `CORE` command runs (`processdistro -h up`
    prints the whole list: a help option before the command needs them all)."""
    if command not in CORE:
        return True
    return bool({"-h", "--help"} & set(argv[: argv.index(command)]))


def _load_task_repo(command: str | None) -> None:
    """Register the task repo's kinds ($PD_TASK_REPO) before the parser is built, so that
    `submit <kind>` exists for them; every service started through here has them too."""
    if command in NO_TASK_REPO:
        return
    path = Settings().task_repo
    if path is None:
        return
    from .shared.tasks import load_task_repo

    load_task_repo(path.expanduser().resolve())
    if command not in SAY_BROKEN:
        _warn_broken()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    try:
        _load_task_repo(command)
    except ProcessDistroError as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    args = build_parser(full=_needs_full_parser(argv, command)).parse_args(argv)
    try:
        settings = _settings(args)
        code = args.func(args, settings)
    except ProcessDistroError as exc:
        err.print(f"[red]error:[/] {exc}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    if args.command in FAST_EXIT:
        _exit_without_teardown(code)
    sys.exit(code)


# long-running processes that have stopped in order when their `run` returns: they leave by
# `os._exit` (this module's other exit)
FAST_EXIT = ("gateway", "scheduler", "aggregator", "worker", "up")


def _exit_without_teardown(code: int) -> None:
    """Exit now, logs flushed. Their sockets, files and child processes are closed by then;
    what is left is the interpreter's teardown of numpy, pydantic, wasmtime and the rest,
    which took 0.4 s idle and up to 3 s on a loaded machine: the most of a stop (issue 10.5)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
