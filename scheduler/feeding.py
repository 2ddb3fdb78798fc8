"""Feeding: keep the undelivered backlog of the task stream near its target.

`shared/core/feed.py` decides how many entries and from which jobs; this module reads what
it needs, splits the jobs' next subtasks (`split` is lazy) and writes them. A job moves
`queued -> running` through `JobStore.transition` before its first entries; the entries
and the job's `next_index` cursor are written in one transaction, so a crash neither skips
nor repeats a subtask.

A job whose plugin raises while it is split (its wordlist moved or replaced after submit)
is handed to `fail` with the reason; the other jobs are fed as usual.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from ..shared.core import feed
from ..shared.core.replication import sampled
from ..shared.jobs import LIVE, JobRecord, JobState
from ..shared.queue import TaskFields
from ..shared.service import job_error
from ..shared.settings import Settings
from ..shared.store.connection import UNAVAILABLE, Client
from ..shared.store.jobs import JobStore, event
from ..shared.store.nodes import live_nodes
from ..shared.store.tasks import TaskStream
from ..shared.tasks import PLUGINS, plugin_and_params

log = logging.getLogger(__name__)


def adaptive_kinds() -> frozenset[str]:
    return frozenset(k for k, p in PLUGINS.items() if p.adaptive)


class Feeder:
    def __init__(
        self,
        *,
        client: Client,
        jobs: JobStore,
        tasks: TaskStream,
        settings: Settings,
        fail: Callable[[str, str], object] | None = None,
    ) -> None:
        self.r = client
        self.jobs = jobs
        self.tasks = tasks
        self.settings = settings
        #: fails a job (id, reason) whose plugin raised; None: the job is only logged
        self.fail = fail
        #: did the last plan leave subtasks unfed (the scheduler then waits only briefly)
        self.unfed = True
        #: the nodes' take from the backlog, entries/s (`core.feed.drain_rate`)
        self.drain_per_s = 0.0
        self._last: tuple[float, int] | None = None  # (when, backlog right after feeding)
        #: the undelivered backlog after the last feed
        self.backlog = 0

    def open_backlog(self) -> int:
        """Undelivered entries that an idle node could take. A replicated subtask's second
        copy may wait for one particular node (the others ran the first): it does not count."""
        n = self.tasks.backlog()
        if n <= 0 or n > feed.MIN_BACKLOG:
            return n
        return sum(1 for t in self.tasks.undelivered(n) if not t.replicated)

    def backlog_target(self) -> int:
        nodes = live_nodes(self.r, self.settings.node_timeout_s).values()
        return feed.backlog_target(nodes, adaptive_kinds(), self.settings.target_task_s, self.drain_per_s)

    def feed(self) -> int:
        """Top the backlog up; returns how many entries were added."""
        backlog = self.tasks.backlog()
        now = time.monotonic()
        if self._last is not None:
            when, after = self._last
            self.drain_per_s = feed.drain_rate(self.drain_per_s, after - backlog, now - when)
        self._last = (now, backlog)
        self.backlog = backlog
        room = self.backlog_target() - backlog
        if room <= 0:
            return 0
        jobs = {j.id: j for j in self.jobs.active() if j.state in LIVE}
        views = [
            feed.FeedJob(j.id, j.priority, j.state is JobState.QUEUED, j.next_index, j.total) for j in jobs.values()
        ]
        added = 0
        refused: set[str] = set()
        batches = feed.plan(views, room)
        planned = sum(b.count for b in batches)
        self.unfed = sum(max(0, v.total - v.next_index) for v in views) > planned
        for batch in batches:
            if batch.job_id in refused:
                continue
            if batch.starts_job and not self._start(batch.job_id):
                refused.add(batch.job_id)  # no longer queued (cancelled meanwhile): not ours to feed
                continue
            if batch.count:
                try:
                    added += self._feed(jobs[batch.job_id], batch.start, batch.count)
                except UNAVAILABLE:
                    raise
                except Exception as exc:  # this job's plugin (split): the job fails, the rest go on
                    refused.add(batch.job_id)
                    self._fault(batch.job_id, batch.start, exc)
        self._last = (now, backlog + added)
        self.backlog = backlog + added
        return added

    def _fault(self, job_id: str, start: int, exc: Exception) -> None:
        reason = job_error(exc, f"splitting subtask {start}")
        if self.fail is None:
            log.error("job %s: %s", job_id, reason, exc_info=exc)
            return
        log.debug("job %s: split failed", job_id, exc_info=exc)
        self.fail(job_id, reason)

    def _start(self, job_id: str) -> bool:
        if not self.jobs.transition(job_id, JobState.QUEUED, JobState.RUNNING):
            return False
        event(self.r, "job", job_id=job_id, state="running")
        return True

    def _feed(self, job: JobRecord, start: int, limit: int) -> int:
        plugin, params = plugin_and_params(job.id, job.kind, job.params)
        entries: list[TaskFields] = []
        replicas: list[TaskFields] = []
        for fields in plugin.entries(job, params, start, limit):
            if sampled(job.id, fields.index, job.total, job.replicate):
                fields = dataclasses.replace(fields, replicated=True)
                replicas.append(fields)
            entries.append(fields)
        # the second copies after the batch, so one node rarely reads both
        n = len(entries)
        self.tasks.feed(job.id, entries + replicas, start + n)
        if n != limit:
            log.warning("job %s: %d subtasks from %d, %d planned", job.id, n, start, limit)
        return n
