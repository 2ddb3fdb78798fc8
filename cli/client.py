"""The CLI's job operations: submit, wait, cancel, fetch results (also the Python API the
tests use). Redis is reached only through `shared/store/client.py`."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .shared.exceptions import ProcessDistroError
from .shared.jobs import JobRecord, JobState, new_job_id
from .shared.messages import Submit
from .shared.store import client as store
from .shared.store.client import Redis
from .shared.tasks import get_plugin

NEVER_APPEARED_S = 30.0  # a job not in Redis this long after submit: no scheduler reads commands
POLL_S = 0.2


def submit(r: Redis, kind: str, params: dict[str, Any], *, priority: int = 0, replicate: float | None = None) -> str:
    """Validate `params` here (bad ones never reach Redis) and send a submit command."""
    return send(r, kind, params, priority=priority, replicate=replicate).job_id


@dataclass(frozen=True)
class Submitted:
    job_id: str
    #: the share of its subtasks computed on two distinct nodes, as the scheduler decides it
    #: (the kind's `replication`) when its default (PD_REPLICATE) is the one `send` was given
    replicate: float


def send(
    r: Redis,
    kind: str,
    params: dict[str, Any],
    *,
    priority: int = 0,
    replicate: float | None = None,
    default_replicate: float = 0.0,
) -> Submitted:
    """`submit`, also saying what share of the job will be replicated."""
    plugin = get_plugin(kind)
    prepared = plugin.prepare(params)
    parsed = plugin.parse_params(prepared.params)
    command = Submit(
        job_id=new_job_id(),
        kind=kind,
        params=json.loads(parsed.model_dump_json()),
        priority=priority,
        replicate=replicate,
        created=time.time(),
    )
    store.submit(r, command, prepared.blocks, prepared.modules)
    return Submitted(command.job_id, plugin.replication(parsed, replicate, default_replicate))


def replication_note(share: float) -> str:
    """What `submit` says about replication: nothing when it is off."""
    if share <= 0:
        return ""
    what = "every subtask is" if share >= 1 else f"{share * 100:g} % of subtasks are"
    return f"{what} computed twice on distinct nodes to check results (--replicate 0 to turn off)"


def cancel(r: Redis, job_id: str) -> None:
    """Ask for a job to be cancelled (JobNotFound if there is none)."""
    store.cancel(r, job_id)


def wait(r: Redis, job_id: str, *, console: Console, timeout: float | None = None, progress: bool = True) -> JobRecord:
    """Poll the job until it is over, with a progress bar; return its final record."""
    deadline = time.monotonic() + timeout if timeout else None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not progress,
    ) as bar:
        task = bar.add_task(job_id, total=None, state="submitted")
        last_seen = time.monotonic()
        while True:
            job = store.load_job(r, job_id)
            if job is not None:
                last_seen = time.monotonic()
                bar.update(task, total=job.total or None, completed=job.done, state=job.state.value)
                if job.state.terminal:
                    return job
            elif time.monotonic() - last_seen > NEVER_APPEARED_S:
                raise ProcessDistroError(f"job {job_id} never appeared: is the scheduler running?")
            if deadline and time.monotonic() > deadline:
                raise ProcessDistroError(f"timed out waiting for job {job_id}")
            time.sleep(POLL_S)


def copy_outputs(job: JobRecord, targets: dict[str, Path | None]) -> dict[str, Path]:
    """Copy each output role the user asked for (e.g. image -> out.png) out of the data dir."""
    copied: dict[str, Path] = {}
    for role, target in targets.items():
        if target is None:
            continue
        source = job.outputs.get(role)
        if not source:
            raise ProcessDistroError(f"job {job.id} has no {role} output")
        if not Path(source).exists():
            raise ProcessDistroError(
                f"output {source} is not on this machine (the aggregator runs elsewhere); "
                "copy it from the aggregator's data volume"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        copied[role] = target
    return copied


def describe_failure(job: JobRecord) -> str:
    if job.state is JobState.CANCELLED:
        return f"job {job.id} was cancelled: {job.error or 'by user'}"
    return f"job {job.id} failed: {job.error or 'unknown error'}"
