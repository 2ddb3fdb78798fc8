"""The aggregator's batch path: a batch of result entries verified, claimed, merged and
committed together, in a few Redis calls for the whole batch instead of several per result.

For the entries of one read (`core.batching.read_count` of them):
1. one round trip learns their jobs, which of their nodes are banned and which indices
   are merged already (`ResultStream.look`); `core.batching.route` sends each entry on;
2. gone jobs' entries and duplicates are disposed of in one call; a ban entry, a banned
   node's result, a replicated result, a decide or a resolve is handled alone, by
   `Aggregator.handle` (the one-result path, unchanged);
3. the rest are verified one by one (a rejected one is requeued and counted against its
   node, as alone), then claimed in one call (`CLAIM_MANY_LUA`: first valid result wins),
   merged into files kept open (`tasks.base.OpenFiles`), flushed once per job, and
   committed in one call (`COMMIT_MANY_LUA`, which ACKs and deletes their entries; the
   nodes' credit and a fresh look at bans travel with it).
So every invariant of the one-result path holds per result: a claim before the merge, the
ACK only after the merge (in the commit), the job's `finalizing` move once. A crash
anywhere leaves the entries not yet committed pending, to be claimed again and merged
again, harmlessly (their claims name their entry ids).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from ..shared.core.batching import Route, route
from ..shared.jobs import JobRecord, JobState
from ..shared.queue import TaskFields
from ..shared.store.connection import UNAVAILABLE
from ..shared.store.jobs import block_reader
from ..shared.store.results import Commit, Entry
from ..shared.store.streams import full_input
from ..shared.tasks import Checked, JobFiles, Origin, Verdict, plugin_and_params
from .finalize import enqueue_finalize

if TYPE_CHECKING:
    from .service import Aggregator

log = logging.getLogger(__name__)

IDLE_FILES_S = 30.0  # a job's open files are let go after this long without a result


class Handled(StrEnum):
    """What became of one result entry."""

    DROPPED = "dropped"  # its job is over, or a decide recorded for a result not in yet
    REJECTED = "rejected"  # failed a check, or came from a banned node: the subtask is redone
    DUPLICATE = "duplicate"  # its index was merged already
    AWAITING = "awaiting"  # a replicated subtask's first result: waiting for a confirmation
    QUORUM = "quorum"  # replicated results differ: one more node was asked
    NO_QUORUM = "no quorum"  # too many distinct results: the job is failed
    FAILED = "failed"  # merged, and the plugin says the result fails the job (`TaskPlugin.failure`)
    MERGED = "merged"
    FINALIZE = "finalize"  # merged, and the job is finalizing


@dataclass(frozen=True)
class Result:
    """One parsed result entry."""

    entry_id: bytes
    fields: dict[bytes, bytes]
    task: TaskFields
    node: str

    @property
    def output(self) -> bytes:
        return self.fields[b"output"]


def handle_batch(agg: Aggregator, entries: list[Entry]) -> Counter[Handled]:
    """Handle one read's result entries (see the module docstring); what became of each."""
    handled: Counter[Handled] = Counter()
    results: list[Result] = []
    for entry_id, fields in entries:
        try:
            task = TaskFields.from_redis(fields)
        except (KeyError, ValueError) as exc:
            log.error("result %s is malformed (%s); dropped", entry_id, exc)
            agg.results.drop(entry_id)
            continue
        results.append(Result(entry_id, fields, task, fields.get(b"node", b"?").decode(errors="replace")))
    if not results:
        return handled
    seen = agg.results.look([(r.task.job, r.task.index, r.node) for r in results])
    dropped: list[bytes] = []
    duplicates: list[bytes] = []
    alone: list[Result] = []
    batch: list[Result] = []
    for res in results:
        job = seen.jobs.get(res.task.job)
        f = res.fields
        where = route(
            ban=f.get(b"ban") == b"1",
            running=job is not None and job.state is JobState.RUNNING,
            banned=res.node in seen.banned,
            done=(res.task.job, res.task.index) in seen.done,
            special=res.task.replicated or f.get(b"decide") == b"1" or f.get(b"resolve") == b"1",
        )
        if where is Route.DROP:
            dropped.append(res.entry_id)
            agg.open_files.close(res.task.job)
            handled[Handled.DROPPED] += 1
        elif where is Route.DUPLICATE:
            duplicates.append(res.entry_id)
            handled[Handled.DUPLICATE] += 1
        elif where is Route.BATCH:
            batch.append(res)
        else:  # BAN, BANNED, ALONE: the one-result path makes the same checks again
            alone.append(res)
    agg.results.dispose(dropped, duplicates)
    for res in alone:
        outcome = _alone(agg, res)
        if outcome is not None:
            handled[outcome] += 1
    jobs = {job_id: job for job_id, job in seen.jobs.items() if job is not None}
    handled.update(_merge_batch(agg, jobs, _verified(agg, jobs, batch, handled)))
    for job_id in agg.open_files.idle(time.monotonic(), IDLE_FILES_S):
        agg.open_files.close(job_id)
    return handled


def _alone(agg: Aggregator, res: Result) -> Handled | None:
    try:
        return agg.handle(res.entry_id, res.fields)
    except UNAVAILABLE:
        raise  # the entry stays pending: it is handled again after the outage
    except Exception as exc:
        agg.fault(res.entry_id, res.task, res.node, exc)
        return None


def _verified(
    agg: Aggregator, jobs: dict[str, JobRecord], batch: list[Result], handled: Counter[Handled]
) -> list[Result]:
    """The batch's results that pass their plugin's check and need no confirmation; the
    others are carried out here (requeued, or sent for a second node's confirmation)."""
    out = []
    for res in batch:
        task = res.task
        try:
            job = jobs[task.job]
            plugin, params = plugin_and_params(task.job, job.kind, job.params)
            if plugin.verify(params, task.index, full_input(agg.r, task), res.output, agg.rng) is Verdict.REJECT:
                log.warning(
                    "job %s: task %d from node %s failed verification; redoing it", task.job, task.index, res.node
                )
                agg.results.requeue(task, res.entry_id)
                agg.reject(res.node, task.job)
                handled[Handled.REJECTED] += 1
            elif plugin.confirm(params, task.index, res.output):
                elapsed_ms = float(res.fields.get(b"elapsed_ms", b"0"))
                voter = res.fields.get(b"voter", res.node.encode()).decode()
                handled[agg.confirm(job, task, res.entry_id, res.node, res.output, elapsed_ms, voter)] += 1
            else:
                out.append(res)
        except UNAVAILABLE:
            raise
        except Exception as exc:
            agg.fault(res.entry_id, task, res.node, exc)
    return out


def _merge_batch(agg: Aggregator, jobs: dict[str, JobRecord], batch: list[Result]) -> Counter[Handled]:
    """Claim, merge, flush and commit verified results together."""
    handled: Counter[Handled] = Counter()
    won = agg.results.claim_many([(r.task.job, r.task.index, r.entry_id) for r in batch])
    agg.results.dispose([], [r.entry_id for r, ok in zip(batch, won, strict=True) if not ok])
    handled[Handled.DUPLICATE] += won.count(False)
    merged: list[Result] = []
    files_of: dict[str, JobFiles] = {}
    for res in (r for r, ok in zip(batch, won, strict=True) if ok):
        task = res.task
        try:
            job = jobs[task.job]
            plugin, params = plugin_and_params(task.job, job.kind, job.params)
            files = files_of.get(task.job) or files_of.setdefault(task.job, files_for(agg, task.job))
            elapsed_ms = float(res.fields.get(b"elapsed_ms", b"0"))
            origin = Origin(res.node, elapsed_ms, Checked.SINGLE, (res.node,))
            plugin.merge_result(files, params, task.index, res.output, origin)
            failure = plugin.failure(files, params, task.index, res.output)
        except UNAVAILABLE:
            raise
        except Exception as exc:
            agg.fault(res.entry_id, task, res.node, exc)
            continue
        if failure is not None:
            # merged (its outputs are there to look at) but not committed: the job fails
            log.warning("job %s: task %d failed the job: %s", task.job, task.index, failure)
            agg.results.fail_job(task.job, failure)
            agg.results.drop(res.entry_id)
            handled[Handled.FAILED] += 1
            continue
        merged.append(res)
    merged = _flushed(agg, merged)
    outcomes, banned = agg.results.commit_many([(r.task.job, r.task.index, r.entry_id, r.node) for r in merged])
    for res, commit in zip(merged, outcomes, strict=True):
        try:
            handled[_committed(agg, jobs[res.task.job], res, commit, res.node in banned)] += 1
        except UNAVAILABLE:
            raise
        except Exception as exc:
            agg.fault(res.entry_id, res.task, res.node, exc)
    return handled


def _flushed(agg: Aggregator, merged: list[Result]) -> list[Result]:
    """Flush each job's open files before its commit; a job whose flush fails (a disk
    error) fails, and its results are not committed."""
    broken: set[str] = set()
    for job_id in dict.fromkeys(r.task.job for r in merged):
        try:
            agg.open_files.flush(job_id)
        except OSError as exc:
            broken.add(job_id)
            first = next(r for r in merged if r.task.job == job_id)
            agg.fault(first.entry_id, first.task, first.node, exc)
    for res in merged:
        if res.task.job in broken:
            agg.results.drop(res.entry_id)
    return [r for r in merged if r.task.job not in broken]


def _committed(agg: Aggregator, job: JobRecord, res: Result, commit: Commit, banned: bool) -> Handled:
    """What follows a commit, as on the one-result path."""
    task = res.task
    if banned and agg.results.unmerge(task.job, task.index):
        # banned while we merged: take it back, like the ban does for earlier ones
        agg.results.queue_copy(task.retry())
        return Handled.REJECTED
    if commit is Commit.DUPLICATE:
        return Handled.DUPLICATE
    plugin, params = plugin_and_params(task.job, job.kind, job.params)
    early = commit is Commit.MERGED and plugin.finished_early(files_for(agg, task.job), params, task.index, res.output)
    if early and agg.results.finish_early(task.job):
        log.info("job %s: answer found by task %d; finalizing early", task.job, task.index)
        commit = Commit.FINALIZE
    if commit is Commit.FINALIZE:
        log.info("job %s: all %d subtasks merged; finalizing", task.job, job.total)
        agg.open_files.close(task.job)
        enqueue_finalize(agg.r, task.job, agg.data_dir)
        return Handled.FINALIZE
    return Handled.MERGED


def files_for(agg: Aggregator, job_id: str) -> JobFiles:
    """The job's files, with the aggregator's open maps and the job's blocks."""
    return JobFiles.under(agg.data_dir, job_id, block_reader(agg.r, job_id), agg.open_files)
