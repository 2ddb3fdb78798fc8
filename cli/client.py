"""The CLI's job operations: submit, wait, cancel, fetch results (also the Python API the
tests use). Redis is reached only through `shared/store/client.py`."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .shared.exceptions import ProcessDistroError
from .shared.jobs import JobRecord, JobState, new_job_id
from .shared.messages import Submit
from .shared.store import client as store
from .shared.store.client import Redis
from .shared.tasks import get_plugin

NEVER_APPEARED_S = 30.0  # a job not in Redis this long after submit: no scheduler reads commands
POLL_S = 0.2
CHUNK_BYTES = 256 * 1024
PROGRESS_FROM_BYTES = 4 * 1024 * 1024  # smaller downloads finish before a bar means anything


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


@dataclass(frozen=True)
class Remote:
    """Where outputs that are not on this machine come from: the gateway's URL, the
    operator's token and, for a self-signed https gateway, its certificate's fingerprint."""

    gateway_url: str | None
    token: str
    fingerprint: str | None = None


def copy_outputs(
    job: JobRecord, targets: dict[str, Path | None], *, remote: Remote | None = None, console: Console | None = None
) -> dict[str, Path]:
    """Copy each output role the user asked for (e.g. image -> out.png) out of the data dir;
    one that is not on this machine (the aggregator runs elsewhere) is fetched from the
    gateway (`GET /jobs/<id>/outputs/<role>`) when `remote` says where."""
    copied: dict[str, Path] = {}
    for role, target in targets.items():
        if target is None:
            continue
        source = job.outputs.get(role)
        if not source:
            raise ProcessDistroError(f"job {job.id} has no {role} output")
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(source).exists():
            shutil.copyfile(source, target)
        elif remote is not None and remote.gateway_url:
            fetch_output(remote, job.id, role, target, console=console)
        else:
            raise ProcessDistroError(
                f"output {source} is not on this machine (the aggregator runs elsewhere) and no gateway is known "
                "to fetch it from: pass --gateway URL (or set PD_GATEWAY_URL) and the operator's token"
            )
        copied[role] = target
    return copied


def fetch_output(remote: Remote, job_id: str, role: str, target: Path, *, console: Console | None = None) -> None:
    """Stream one output from the gateway into `target` (through a temporary file beside it,
    so a broken download leaves no half file), with a progress bar for big ones."""
    import httpx  # here: every CLI command imports this module, few fetch (httpx costs ~0.2 s)

    from .tls import client_context

    assert remote.gateway_url is not None
    url = f"{remote.gateway_url.rstrip('/')}/jobs/{quote(job_id, safe='')}/outputs/{quote(role, safe='')}"
    if not remote.token:
        raise ProcessDistroError(
            f"output {role} of job {job_id} is not on this machine, and fetching it from {remote.gateway_url} "
            "needs the operator's token: --token or PD_OPERATOR_TOKEN (`processdistro up` prints it)"
        )
    context = client_context(url, remote.fingerprint)
    partial = target.with_name(f".{target.name}.part")
    try:
        with httpx.stream(
            "GET",
            url,
            headers={"Authorization": f"Bearer {remote.token}"},
            verify=context if context is not None else True,
            timeout=httpx.Timeout(30.0, read=120.0),
        ) as resp:
            if resp.status_code != 200:
                resp.read()
                try:
                    reason = str(resp.json().get("error", ""))
                except ValueError:
                    reason = resp.text[:200]
                raise ProcessDistroError(
                    f"the gateway refused output {role} of job {job_id} (HTTP {resp.status_code}): {reason}"
                )
            size = int(resp.headers.get("content-length", "0")) or None
            with (
                open(partial, "wb") as fh,
                Progress(
                    TextColumn(f"[bold]{role}"),
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    disable=console is None or (size or 0) < PROGRESS_FROM_BYTES,
                ) as bar,
            ):
                task = bar.add_task(role, total=size)
                for chunk in resp.iter_bytes(CHUNK_BYTES):
                    fh.write(chunk)
                    bar.advance(task, len(chunk))
            got = partial.stat().st_size
            if size is not None and got != size:
                raise ProcessDistroError(f"output {role} of job {job_id}: got {got} of {size} bytes from {url}")
        partial.replace(target)
    except httpx.HTTPError as exc:
        raise ProcessDistroError(
            f"cannot fetch output {role} of job {job_id} from {remote.gateway_url}: {exc}"
        ) from None
    finally:
        partial.unlink(missing_ok=True)


def describe_failure(job: JobRecord) -> str:
    if job.state is JobState.CANCELLED:
        return f"job {job.id} was cancelled: {job.error or 'by user'}"
    return f"job {job.id} failed: {job.error or 'unknown error'}"
