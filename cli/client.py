"""What the CLI does against Redis: submit, wait, list, cancel, fetch results."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .shared import keys
from .shared.exceptions import JobNotFound, ProcessDistroError
from .shared.jobs import JobRecord, JobState, new_job_id
from .shared.store.jobs import load_job, store_blocks
from .shared.store.streams import live_node_ids
from .shared.tasks import get_plugin


def submit(
    r: redis.Redis, kind: str, params: dict[str, Any], *, priority: int = 0, replicate: float | None = None
) -> str:
    """Validate `params` here (bad ones never reach Redis) and send a submit command."""
    plugin = get_plugin(kind)
    prepared = plugin.prepare(params)
    parsed = plugin.parse_params(prepared.params)
    job_id = new_job_id()
    store_blocks(r, job_id, prepared.blocks)
    command = {
        "type": "submit",
        "job_id": job_id,
        "kind": kind,
        "params": json.loads(parsed.model_dump_json()),
        "priority": priority,
        **({"replicate": replicate} if replicate is not None else {}),
        "created": time.time(),
    }
    r.xadd(keys.COMMANDS, {"command": json.dumps(command)})
    return job_id


def cancel(r: redis.Redis, job_id: str) -> None:
    job = load_job(r, job_id)
    if job is None:
        raise JobNotFound(job_id)
    r.xadd(keys.COMMANDS, {"command": json.dumps({"type": "cancel", "job_id": job_id})})


def wait(
    r: redis.Redis, job_id: str, *, console: Console, timeout: float | None = None, progress: bool = True
) -> JobRecord:
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
            job = load_job(r, job_id)
            if job is not None:
                last_seen = time.monotonic()
                bar.update(task, total=job.total or None, completed=job.done, state=job.state.value)
                if job.state.terminal:
                    return job
            elif time.monotonic() - last_seen > 30:
                raise ProcessDistroError(f"job {job_id} never appeared: is the scheduler running?")
            if deadline and time.monotonic() > deadline:
                raise ProcessDistroError(f"timed out waiting for job {job_id}")
            time.sleep(0.2)


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


def list_jobs(r: redis.Redis, limit: int = 50) -> list[JobRecord]:
    ids = r.zrevrange(keys.JOBS, 0, limit - 1)
    jobs = [load_job(r, i.decode()) for i in ids]
    return [j for j in jobs if j is not None]


def list_nodes(r: redis.Redis, node_timeout_s: float) -> list[dict[str, str]]:
    live = live_node_ids(r, node_timeout_s)
    nodes = []
    for key in r.scan_iter(match=keys.node("*"), count=500):
        h = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
        if not h.get("id"):
            continue
        h["live"] = "yes" if h["id"] in live else "no"
        nodes.append(h)
    return sorted(nodes, key=lambda n: (n["live"] != "yes", n["id"]))


def describe_failure(job: JobRecord) -> str:
    if job.state is JobState.CANCELLED:
        return f"job {job.id} was cancelled: {job.error or 'by user'}"
    return f"job {job.id} failed: {job.error or 'unknown error'}"
