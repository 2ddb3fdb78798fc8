"""`processdistro retry JOB`: finish a job whose finalize failed (a full disk, say), once
the cause is fixed. Its merged work and blocks were kept for this; the job moves back to
`finalizing` (`JobStore.retry_finalize`) and an aggregator's sweep runs its finalize again
within seconds. Any other job is refused, with why."""

from __future__ import annotations

import argparse

from .console import Subcommands, console, err
from .shared.exceptions import JobNotFound
from .shared.jobs import JobState
from .shared.settings import Settings
from .shared.store import client as store
from .shared.store.jobs import JobStore


def add_retry_parser(sub: Subcommands) -> None:
    retry = sub.add_parser("retry", help="finalize again a job whose finalize failed (e.g. disk full)")
    retry.add_argument("job")
    retry.set_defaults(func=cmd_retry)


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    jobs = JobStore(store.connect(settings.resolved_redis_url()))
    job = jobs.load(args.job)
    if job is None:
        raise JobNotFound(args.job)
    if not jobs.retry_finalize(args.job):
        why = "its finalize did not fail" if job.state is JobState.FAILED else f"it is {job.state.value}"
        err.print(f"job {args.job} cannot be retried: {why}", markup=False, highlight=False)
        return 1
    console.print(f"job {args.job}: finalizing again; follow it with: processdistro jobs", markup=False)
    return 0
