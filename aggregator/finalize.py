"""The finalize step, run as an rq job (queue `keys.FINALIZE_QUEUE`) by an aggregator.

Exactly once: a job enters `finalizing` once (the commit script's compare-and-set), is
enqueued under the fixed rq id `finalize-<job>` with `unique=True`, and moves to `done`
through another compare-and-set, which also counts `finalized` so tests can check it.
"""

from __future__ import annotations

import json
import logging
import random
import time
import traceback
from pathlib import Path

from rq import Queue, get_current_job
from rq.job import Job, JobStatus

from ..shared import keys
from ..shared.jobs import JobState
from ..shared.store.connection import Client
from ..shared.store.jobs import JobStore, block_reader, drop_blocks, event, load_job
from ..shared.store.liveness import instance_alive
from ..shared.tasks import JobFiles, get_plugin

log = logging.getLogger(__name__)


def rq_job_id(job_id: str) -> str:
    return f"finalize-{job_id}"


def enqueue_finalize(client: Client, job_id: str, data_dir: Path) -> None:
    """Enqueue the finalize job unless one is queued, running or finished already."""
    existing = None
    try:
        existing = Job.fetch(rq_job_id(job_id), connection=client)
    except Exception:  # rq raises NoSuchJobError; any unreadable record counts as absent
        existing = None
    if existing is not None:
        status = existing.get_status(refresh=True)
        if status in (JobStatus.QUEUED, JobStatus.FINISHED, JobStatus.DEFERRED):
            return
        if status is JobStatus.STARTED and _runner_alive(client, existing):
            return
        # failed, stopped, or started by an aggregator that died (kill -9): run it again
        log.warning("job %s: finalize job was %s; enqueueing it again", job_id, status)
        existing.delete()
    Queue(keys.FINALIZE_QUEUE, connection=client).enqueue_call(
        finalize_job, args=(job_id, str(data_dir)), job_id=rq_job_id(job_id), timeout=3600, result_ttl=3600, unique=True
    )


FINALIZER_SEP = ".fin-"


def finalizer_name(instance: str) -> str:
    """rq worker name of an aggregator instance's finalizer: the instance can be read back."""
    return f"{instance}{FINALIZER_SEP}{random.getrandbits(24):06x}"


def _runner_alive(client: Client, job: Job) -> bool:
    worker = job.worker_name or ""
    if FINALIZER_SEP not in worker:
        return True  # not one of ours: trust rq's own bookkeeping
    return instance_alive(client, "aggregator", worker.split(FINALIZER_SEP, 1)[0])


def finalize_job(job_id: str, data_dir: str) -> str:
    current = get_current_job()
    assert current is not None, "finalize_job runs inside an rq worker"
    client: Client = current.connection
    job = load_job(client, job_id)
    if job is None or job.state is not JobState.FINALIZING:
        return f"skipped ({job.state.value if job else 'missing'})"
    started = time.monotonic()
    try:
        plugin = get_plugin(job.kind)
        files = JobFiles.under(Path(data_dir), job_id, block_reader(client, job_id))
        outputs = plugin.finalize(files, plugin.parse_params(job.params))
    except Exception as exc:
        log.error("job %s: finalize failed: %s", job_id, exc)
        JobStore(client).transition(
            job_id,
            JobState.FINALIZING,
            JobState.FAILED,
            error=f"finalize failed: {exc}\n{traceback.format_exc(limit=3)}",
            finished=time.time(),
        )
        drop_blocks(client, job_id)
        event(client, "job", job_id=job_id, state="failed", error=str(exc))
        return "failed"
    won = JobStore(client).transition(
        job_id, JobState.FINALIZING, JobState.DONE, outputs=json.dumps(outputs), finished=time.time()
    )
    if won:
        drop_blocks(client, job_id)
        event(client, "job", job_id=job_id, state="done", outputs=outputs)
        log.info("job %s: done in %.2fs finalize, outputs %s", job_id, time.monotonic() - started, outputs)
    return "done" if won else "lost race"
