"""The reaper: what dead node connections hold goes back to the task stream.

A gateway requeues a closed socket's tasks at once; this catches a silent node and a
gateway that died. It also sends parked replicated copies back when no live node may run
them any more.
"""

from __future__ import annotations

import logging
import time

from ..shared import keys
from ..shared.core.replication import ParkedFate, parked_fate
from ..shared.jobs import LIVE
from ..shared.settings import Settings
from ..shared.store.connection import Client
from ..shared.store.jobs import JobStore
from ..shared.store.nodes import connections, forget_connections, live_voters
from ..shared.store.tasks import TaskStream

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, *, client: Client, jobs: JobStore, tasks: TaskStream, settings: Settings) -> None:
        self.r = client
        self.jobs = jobs
        self.tasks = tasks
        self.settings = settings

    def reap(self) -> int:
        """Requeue what dead node connections hold; return how many tasks moved."""
        timeout = self.settings.node_timeout_s
        known, dead = connections(self.r, silent_since=time.time() - timeout)
        requeued = 0
        for consumer in self.tasks.consumers():
            # a consumer nobody vouches for (its gateway died before registering it) is dead too
            orphan = consumer.name not in known and consumer.idle_s > timeout and consumer.name != keys.PARKED_CONSUMER
            if consumer.name in dead or orphan:
                requeued += self.tasks.release_consumer(consumer.name)
        forget_connections(self.r, dead)
        self.release_parked()
        if requeued:
            log.info("reaper: requeued %d tasks of dead nodes", requeued)
        return requeued

    def release_parked(self) -> int:
        """Parked replicated copies no live node may run any more go back to the stream, where
        a node that cannot run them tells the aggregator to accept the one result in, or, when
        the results in disagree, to the aggregator to compute the subtask itself; those of jobs
        that are over, or of subtasks merged meanwhile, are dropped (`core.replication.parked_fate`).
        A replicated copy that waited `PARKED_WAIT_S` for live nodes that never take it goes
        the same way: a dispute never waits for a node that does not come, connected or not."""
        parked = self.tasks.parked()
        if not parked:
            return 0
        live = live_voters(self.r, self.settings.node_timeout_s)  # returned sets hold voters
        moved = 0
        for copy in parked:
            job = self.jobs.load(copy.task.job) if copy.task else None
            fate = parked_fate(
                job_live=job is not None and job.state in LIVE,
                merged=copy.merged,
                live=live,
                returned=copy.returned,
                votes=copy.votes,
                replicated=copy.task is not None and copy.task.replicated,
                waited_s=copy.waited_s,
            )
            match fate:
                case ParkedFate.DROP:
                    self.tasks.drop_parked(copy.entry_id)
                case ParkedFate.RELEASE:
                    moved += self.tasks.release_parked(copy.entry_id)
                case ParkedFate.RESOLVE if copy.task is not None:
                    if self.tasks.to_controller(copy.entry_id, copy.task):
                        log.info(
                            "job %s: subtask %d disputed, no node left to ask: the controller computes it",
                            copy.task.job,
                            copy.task.index,
                        )
                        moved += 1
                case ParkedFate.DECIDE if copy.task is not None:
                    # live nodes that never take it (busy for good, or connected and never
                    # asking for work) must not hold the job: the one result counts
                    if self.tasks.to_controller(copy.entry_id, copy.task, decide=True):
                        log.info(
                            "job %s: subtask %d waited %.0fs for a node that never took it; the aggregator decides",
                            copy.task.job,
                            copy.task.index,
                            copy.waited_s,
                        )
                        moved += 1
        return moved
