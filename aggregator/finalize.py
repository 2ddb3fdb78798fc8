"""The finalize step, run as an rq job (queue `keys.FINALIZE_QUEUE`) by an aggregator.

Exactly once: a job enters `finalizing` once (the commit script's compare-and-set), is
enqueued under the fixed rq id `finalize-<job>` with `unique=True`, and moves to `done`
through another compare-and-set, which also counts `finalized` so tests can check it.

Idempotent, in three steps (`finalize`):
1. the plugin's `finalize` writes the outputs, each to a temporary name then renamed, and
   keeps every output already there (`base.keep_or_write`): the merged work is never
   removed in this step;
2. the final state is recorded (`finalizing -> done`, with the outputs);
3. only then the partial state goes: the plugin's `clean_up` (merged work files), then the
   job's blocks and claims in Redis.
A crash anywhere, or a Redis that forgets its last second of writes (the job is found in
`finalizing` again), runs it again and yields the same files. A finalize that fails (disk
full) moves the job to `failed` with the reason and keeps the merged work and the blocks:
`processdistro retry JOB` (`JobStore.retry_finalize`) moves it back to `finalizing`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from rq import Queue, get_current_job
from rq.job import Job, JobStatus

from ..shared import keys
from ..shared.jobs import RETRY_FINALIZE, JobState
from ..shared.service import job_error
from ..shared.store.connection import UNAVAILABLE, Client
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
        # finished, yet the job is in `finalizing` (callers enqueue only then): a retry of a
        # failed finalize, or Redis forgot the `done` write; the finalize runs again
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED):
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


RETRY_HINT = "; the merged work is kept: free the space (or fix the cause) and run `processdistro retry {job}`"


def finalize_job(job_id: str, data_dir: str) -> str:
    """The rq job: `finalize` with the worker's Redis connection."""
    current = get_current_job()
    assert current is not None, "finalize_job runs inside an rq worker"
    return finalize(current.connection, job_id, Path(data_dir))


def finalize(client: Client, job_id: str, data_dir: Path) -> str:
    """Write a `finalizing` job's outputs, record it `done`, then clean up (see the module
    docstring); a failure records it `failed`, retryable. Safe to run any number of times."""
    job = load_job(client, job_id)
    if job is None or job.state is not JobState.FINALIZING:
        return f"skipped ({job.state.value if job else 'missing'})"
    started = time.monotonic()
    jobs = JobStore(client)
    try:
        plugin = get_plugin(job.kind)
        params = plugin.parse_params(job.params)
        files = JobFiles.under(data_dir, job_id, block_reader(client, job_id))
        outputs = plugin.finalize(files, params)
    except UNAVAILABLE:
        raise  # rq marks the finalize job failed; the sweep enqueues it again
    except Exception as exc:
        reason = job_error(exc, "finalize") + RETRY_HINT.format(job=job_id)
        log.error("job %s: %s", job_id, reason, exc_info=exc)
        # the blocks and merged files stay: a retry needs them
        failed = jobs.transition(
            job_id,
            JobState.FINALIZING,
            JobState.FAILED,
            error=reason,
            finished=time.time(),
            **{RETRY_FINALIZE: "finalize"},
        )
        if failed:
            event(client, "job", job_id=job_id, state="failed", error=reason)
        return "failed"
    won = jobs.transition(job_id, JobState.FINALIZING, JobState.DONE, outputs=json.dumps(outputs), finished=time.time())
    if not won:
        return "lost race"
    event(client, "job", job_id=job_id, state="done", outputs=outputs)
    log.info("job %s: done in %.2fs finalize, outputs %s", job_id, time.monotonic() - started, outputs)
    # the final state is recorded: only now may the partial state go
    try:
        plugin.clean_up(files, params)
    except Exception as exc:  # the job is done; leftovers only cost space
        log.warning("job %s: clean-up of its merged work failed: %s", job_id, exc)
    drop_blocks(client, job_id)
    return "done"
