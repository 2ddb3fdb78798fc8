"""`processdistro submit <kind>`, `result` and `cancel`: one `submit` subcommand per
registered task plugin (`shared.tasks.PLUGINS`), built from the plugin's own flags, so a new
kind needs no edit here."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from . import client
from .console import Subcommands, console, err, literal
from .shared.jobs import JobState
from .shared.settings import Settings
from .shared.store import client as store
from .shared.tasks import PLUGINS, TaskPlugin, get_plugin


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value}")
    return value


def add_submit_parser(sub: Subcommands) -> None:
    """`submit` with one subcommand per registered kind: the plugin's flags, then the flags
    every job has. `sub` is the top-level parser's subparsers action."""
    submit = sub.add_parser("submit", help="submit a job")
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, plugin in PLUGINS.items():
        sp = kinds.add_parser(
            kind,
            help=plugin.describe(),
            description=plugin.describe(),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        plugin.add_arguments(sp)
        _add_job_arguments(sp)
        sp.set_defaults(func=cmd_submit)


def _add_job_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--priority", type=int, default=0, help="higher runs first")
    sp.add_argument(
        "--replicate",
        type=_share,
        metavar="SHARE",
        help="share of subtasks (0 to 1) computed on two distinct nodes and compared (default: PD_REPLICATE, 0.05)",
    )
    sp.add_argument("--wait", action="store_true", help="show progress and wait for the result")
    try:
        sp.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    except argparse.ArgumentError:  # the kind's own --timeout (a wasm run's limit): waiting is --wait-timeout
        sp.add_argument("--wait-timeout", dest="timeout", type=float, help="give up waiting after this many seconds")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_result_parser(sub: Subcommands) -> None:
    res = sub.add_parser("result", help="copy a finished job's output")
    res.add_argument("job")
    res.add_argument("-o", "--output", type=Path, required=True)
    res.add_argument("--role", help="which output (e.g. image, raw); default the main one")
    res.add_argument(
        "--gateway",
        metavar="URL",
        help="fetch the output from this gateway when it is not on this machine (default: $PD_GATEWAY_URL, "
        "else the running `up`'s)",
    )
    res.add_argument("--token", help="the operator's token (default: $PD_OPERATOR_TOKEN, else the running `up`'s)")
    res.add_argument(
        "--fingerprint",
        metavar="SHA256",
        help="the https gateway's certificate fingerprint (default: $PD_GATEWAY_FINGERPRINT, else the running `up`'s)",
    )
    res.set_defaults(func=cmd_result)


def add_cancel_parser(sub: Subcommands) -> None:
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job")
    cancel.set_defaults(func=cmd_cancel)


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    plugin = get_plugin(args.kind)
    r = store.connect(settings.resolved_redis_url())
    sent = client.send(
        r,
        plugin.kind,
        plugin.params_from_args(args),
        priority=args.priority,
        replicate=args.replicate,
        default_replicate=settings.replicate,
    )
    job_id = sent.job_id
    console.print(f"submitted job [bold]{job_id}[/] ({plugin.kind})")
    if note := client.replication_note(sent.replicate):
        console.print(note, markup=False, highlight=False)
    if not args.wait:
        console.print(f"follow it with: processdistro jobs   fetch it with: processdistro result {job_id} -o FILE")
        return 0
    job = client.wait(r, job_id, console=console, timeout=args.timeout, progress=not args.quiet)
    if job.state is not JobState.DONE:
        err.print(literal(client.describe_failure(job), style="red"))  # the reason quotes node text
        return 1
    remote = client.Remote(
        settings.resolved_gateway_url(), settings.resolved_operator_token(), settings.resolved_gateway_fingerprint()
    )
    for role, path in client.copy_outputs(job, plugin.outputs_from_args(args), remote=remote, console=console).items():
        console.print(f"{role}: {path}")
    for line in plugin.summary(job.outputs):
        console.print(line, markup=False)
    console.print(f"job {job_id} done in {(job.finished or time.time()) - job.created:.1f}s")
    return plugin.exit_code(job.outputs)


def main_output(job_kind: str, outputs: dict[str, str]) -> str:
    """The role `result` copies without --role: the plugin's `main_output`, else the first."""
    plugin: TaskPlugin[Any] | None = PLUGINS.get(job_kind)
    main = plugin.main_output if plugin is not None else None
    return main if main is not None and main in outputs else next(iter(outputs))


def cmd_result(args: argparse.Namespace, settings: Settings) -> int:
    r = store.connect(settings.resolved_redis_url())
    job = store.load_job(r, args.job)
    if job is None:
        err.print(f"[red]no job {args.job!r}[/]")
        return 1
    if job.state is not JobState.DONE:
        err.print(f"[red]job {job.id} is {job.state.value}, no result yet[/]")
        return 1
    role = args.role or main_output(job.kind, job.outputs)
    remote = client.Remote(
        gateway_url=(args.gateway or settings.resolved_gateway_url() or "").rstrip("/") or None,
        token=args.token or settings.resolved_operator_token(),
        fingerprint=args.fingerprint or settings.resolved_gateway_fingerprint(),
    )
    copied = client.copy_outputs(job, {role: args.output}, remote=remote, console=console)
    console.print(f"{role}: {copied[role]}")
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    client.cancel(store.connect(settings.resolved_redis_url()), args.job)
    console.print(f"cancel requested for job {args.job}")
    return 0
