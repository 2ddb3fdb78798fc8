"""The aggregator: a consumer of `keys.RESULTS` in group `aggregators` (run as many as you
like), which verifies each result, merges it idempotently and triggers finalization.

Results are read and, in the common case, claimed, merged and committed in batches
(`batch.py`, the same steps and invariants as below, a few Redis calls per batch); this
module is the one-result path the batch sends the rest to, and the loop. For each result entry:
- a `ban` entry (a gateway found the node's task failures stand out, `core.failures`):
  ban the node, as for wrong results;
- its job is gone or over: drop it;
- the plugin's `verify` rejects it: requeue the task (attempt + 1), count it against the
  node, never merge it;
- a replicated subtask's result votes first (`core.replication.judge_vote`): it merges
  once two nodes agree, or unconfirmed when no other node could confirm;
- otherwise merge it into the job's files, then commit (COMMIT_LUA): the first result per
  index wins, later copies are counted as duplicates; the last one moves the job to
  `finalizing`, which enqueues the rq finalize job.
A result is ACKed and deleted only after it is merged (or dropped), so a killed aggregator's
pending results are claimed by another (XAUTOCLAIM) and merged again, harmlessly.

A plugin that raises on a result fails that result's job only (`_fault`): after `verify`
(a merge into a full disk, a wordlist gone by the time a hit is read) the job is failed with
the error as its reason; inside `verify` the node's bytes broke the check, so the result is
rejected like a wrong one. The loop carries on with every other result.

Decisions live in `shared/core/replication.py`; every Redis operation in
`shared/store/results.py` (`ResultStream`). This module carries the decisions out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import signal
import time
from pathlib import Path

from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested

from ..shared import keys
from ..shared.core.batching import gather_ms, read_count
from ..shared.core.replication import (
    CONTROLLER,
    DecideOutcome,
    Penalty,
    VoteOutcome,
    decide,
    judge_vote,
    outvoted_by,
    penalty,
)
from ..shared.jobs import JobRecord, JobState
from ..shared.modules import ModuleRegistry
from ..shared.queue import TaskFields
from ..shared.service import StopFlag, captured_signals, instance_name, job_error, plugin_step, run_forever
from ..shared.settings import Settings
from ..shared.store.connection import UNAVAILABLE, Client
from ..shared.store.jobs import load_job
from ..shared.store.liveness import start_beating
from ..shared.store.results import Commit, Entry, ResultStream
from ..shared.store.streams import ensure_groups, full_input
from ..shared.tasks import Checked, Origin, Verdict, plugin_and_params
from ..shared.tasks.base import OpenFiles
from . import metrics
from .batch import Handled, files_for, handle_batch
from .finalize import enqueue_finalize, finalizer_name
from .resolve import Resolver

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 5.0  # claim abandoned results and re-enqueue stuck finalizations this often
FINALIZERS_EVERY_S = 0.2  # look for finalize jobs another aggregator enqueued this often


# counters (keys.STATS) of the vote outcomes
_VOTE_STATS = {
    VoteOutcome.MERGE: "replicas_confirmed",
    VoteOutcome.ACCEPT_UNCONFIRMED: "replicas_unconfirmed",
    VoteOutcome.QUORUM: "replicas_disputed",
}


class Aggregator:
    def __init__(
        self,
        *,
        client: Client,
        data_dir: Path,
        ban_after: int = 3,
        node_timeout_s: float = 4.0,
        modules: ModuleRegistry | None = None,
    ) -> None:
        self.r = client
        self.data_dir = data_dir
        self.resolver = Resolver(client=client, cache_dir=data_dir / "modules", registry=modules)
        self.name = instance_name()
        self.results = ResultStream(client, consumer=self.name, node_timeout_s=node_timeout_s)
        self.ban_after = ban_after
        self.rng = random.Random()
        self.queue = Queue(keys.FINALIZE_QUEUE, connection=client)
        self._last_sweep = 0.0
        self._last_finalizers = 0.0
        #: merged-work maps kept open across results, flushed before each commit
        self.open_files = OpenFiles()
        self._last_read = 0

    def handle(self, entry_id: bytes, f: dict[bytes, bytes]) -> Handled:
        job_id = f[b"job"].decode()
        index = int(f[b"index"])
        if f.get(b"ban") == b"1":  # a gateway found the node's failures stand out (`core.failures`)
            self.ban(f[b"node"].decode(), "it went on failing tasks its peers completed")
            self.results.drop(entry_id)
            return Handled.DROPPED
        job = load_job(self.r, job_id)
        if job is None or job.state is not JobState.RUNNING:
            self.results.drop(entry_id)
            return Handled.DROPPED
        plugin, params = plugin_and_params(job_id, job.kind, job.params)
        output = f[b"output"]
        node = f.get(b"node", b"?").decode()
        voter = f.get(b"voter", node.encode()).decode()  # replicas count one vote per voter (its address)
        if self.results.banned(node):
            # a banned node's late results are not trusted, even if they pass a check
            self.results.requeue(TaskFields.from_redis(f), entry_id)
            return Handled.REJECTED
        if self.results.is_done(job_id, index):
            self.results.duplicate(entry_id)
            return Handled.DUPLICATE
        task = TaskFields.from_redis(f)
        if f.get(b"decide") == b"1":
            return self._decide(job, task, entry_id)
        if f.get(b"resolve") == b"1":
            return self._resolve(job, task, entry_id)
        if plugin.verify(params, index, full_input(self.r, task), output, self.rng) is Verdict.REJECT:
            log.warning("job %s: task %d from node %s failed verification; redoing it", job_id, index, node)
            self.results.requeue(task, entry_id)
            self.reject(node, job_id)
            return Handled.REJECTED
        elapsed_ms = float(f.get(b"elapsed_ms", b"0"))
        if task.replicated:
            return self._vote(job, task, entry_id, node, output, elapsed_ms, voter)
        if plugin.confirm(params, index, output):
            return self.confirm(job, task, entry_id, node, output, elapsed_ms, voter)
        return self._merge(job, task, entry_id, output, Origin(node, elapsed_ms, Checked.SINGLE, (node,)))

    def _merge(self, job: JobRecord, task: TaskFields, entry_id: bytes, output: bytes, origin: Origin) -> Handled:
        job_id, index, node = job.id, task.index, origin.node
        plugin, params = plugin_and_params(job_id, job.kind, job.params)
        # Claim the index before writing: only the first valid result may touch the files
        # (a later one could differ: a subtle liar's). The claim names this result entry, so
        # if we die here, whoever claims the entry next may finish the write.
        if not self.results.claim(job_id, index, entry_id):
            self.results.duplicate(entry_id)
            return Handled.DUPLICATE
        files = files_for(self, job_id)
        plugin.merge_result(files, params, index, output, origin)
        failure = plugin.failure(files, params, index, output)
        if failure is not None:
            # merged (its outputs are there to look at) but not committed: the job fails
            log.warning("job %s: task %d failed the job: %s", job_id, index, failure)
            self.results.fail_job(job_id, failure)
            self.results.drop(entry_id)
            return Handled.FAILED
        self.open_files.flush(job_id)  # durable before the commit says it is merged
        commit = self.results.commit(job_id, index, entry_id)
        self.results.credit(node, job_id, index)
        if self.results.banned(node) and self.results.unmerge(job_id, index):
            # banned while we merged: take it back, like the ban does for earlier ones
            self.results.queue_copy(task.retry())
            return Handled.REJECTED
        if commit is Commit.DUPLICATE:
            return Handled.DUPLICATE
        early = commit is Commit.MERGED and plugin.finished_early(files, params, index, output)
        if early and self.results.finish_early(job_id):
            log.info("job %s: answer found by task %d; finalizing early", job_id, index)
            commit = Commit.FINALIZE
        if commit is Commit.FINALIZE:
            log.info("job %s: all %d subtasks merged; finalizing", job_id, job.total)
            self.open_files.close(job_id)
            enqueue_finalize(self.r, job_id, self.data_dir)
            return Handled.FINALIZE
        return Handled.MERGED

    def reject(self, node: str, job_id: str) -> None:
        """Count a wrong result against its node (and its job); ban it after `ban_after`."""
        rejected = self.results.reject(node, job_id)
        if penalty(node, rejected, self.ban_after) is Penalty.BAN:
            self.ban(node, f"{rejected} rejected results")

    # ------------------------------------------------------------------ replication

    def _vote(
        self,
        job: JobRecord,
        task: TaskFields,
        entry_id: bytes,
        node: str,
        output: bytes,
        elapsed_ms: float,
        voter: str | None = None,
    ) -> Handled:
        """Record a replicated subtask's checked result and carry out the decision. Votes are
        per voter (the node's address, `core.dispatch.voter_key`): identities one machine made
        up cannot confirm each other; penalties go to the node behind each vote."""
        vote = self.results.vote(job.id, task.index, node, output, voter)
        decision = judge_vote(
            vote.ballot, index=task.index, digest=vote.digest, votes=vote.votes, live=vote.live, decided=vote.decided
        )
        outcome = decision.outcome
        if decision.resend:  # the same node again (its copy came back to it): another node must confirm
            self.results.queue_copy(task.retry())
        if outcome in _VOTE_STATS:
            self.results.count(_VOTE_STATS[outcome])
        if outcome is VoteOutcome.MERGE:
            self.results.forget_first_vote(job.id, task.index)
            agreeing = tuple(sorted(vote.nodes.get(v, v) for v, d in vote.votes.items() if d == vote.digest))
            handled = self._merge(job, task, entry_id, output, Origin(node, elapsed_ms, Checked.REPLICATED, agreeing))
            for other in (vote.nodes.get(v, v) for v in decision.dissenters):  # outvoted: wrong, passed the check
                log.warning("job %s: node %s was outvoted on task %d", job.id, other, task.index)
                self.reject(other, job.id)
            return handled
        if outcome is VoteOutcome.ACCEPT_UNCONFIRMED:
            return self._merge(job, task, entry_id, output, Origin(node, elapsed_ms, Checked.UNCONFIRMED, (node,)))
        if outcome is VoteOutcome.AWAIT:
            self.results.drop(entry_id)
            return Handled.AWAITING
        if outcome is VoteOutcome.FAIL_JOB:
            self.results.fail_job(job.id, decision.reason)
            self.results.drop(entry_id)
            return Handled.NO_QUORUM
        # QUORUM: the results differ; one more node breaks the tie
        log.warning(
            "job %s: task %d results differ (%d votes); asking one more node", job.id, task.index, vote.ballot.count
        )
        self.results.requeue(task, entry_id)
        return Handled.QUORUM

    def confirm(
        self,
        job: JobRecord,
        task: TaskFields,
        entry_id: bytes,
        node: str,
        output: bytes,
        elapsed_ms: float,
        voter: str | None = None,
    ) -> Handled:
        """A result that counts only once another node agrees (`TaskPlugin.confirm`): the
        subtask becomes a replicated one, this result its first vote. While another node is
        live the copy is queued before the vote, so a crash in between leaves at most a
        spare copy (dropped as a duplicate), not a vote waiting for a copy nobody queued."""
        task = dataclasses.replace(task, replicated=True, backup_of="")
        voter = voter or node
        self.results.mark_returned(job.id, task.index, voter)  # the copy goes to another voter
        queued = bool(self.results.live_voters() - {voter})
        if queued:
            self.results.queue_copy(task)
        log.info("job %s: task %d from node %s needs a second node's confirmation", job.id, task.index, node)
        handled = self._vote(job, task, entry_id, node, output, elapsed_ms, voter)
        if handled is Handled.AWAITING and not queued:  # a node came meanwhile
            self.results.queue_copy(task)
        return handled

    def _resolve(self, job: JobRecord, task: TaskFields, entry_id: bytes) -> Handled:
        """A disputed subtask no live node may run again: compute it here. The controller's
        bytes are merged, and the nodes whose results differ count as rejected."""
        plugin, params = plugin_and_params(job.id, job.kind, job.params)
        try:
            output, elapsed_ms = self.resolver.run(task.module, full_input(self.r, task), plugin.limits(params))
        except Exception as exc:  # the module fails on the controller too: nothing can settle it
            reason = f"subtask {task.index} is disputed and failed on the controller too: {exc}"
            self.results.fail_job(job.id, reason[:1000])
            self.results.drop(entry_id)
            return Handled.NO_QUORUM
        voted = self.results.vote_nodes(job.id, task.index)  # voter -> node
        outvoted = [
            voted.get(v, v)
            for v in outvoted_by(hashlib.sha256(output).hexdigest(), self.results.votes(job.id, task.index))
        ]
        log.warning("job %s: subtask %d computed by the controller; outvoted: %s", job.id, task.index, outvoted)
        self.results.count("replicas_resolved")
        handled = self._merge(job, task, entry_id, output, Origin(CONTROLLER, elapsed_ms, Checked.CONTROLLER, ()))
        for node in outvoted:
            self.reject(node, job.id)
        return handled

    def _decide(self, job: JobRecord, task: TaskFields, entry_id: bytes) -> Handled:
        """A gateway found no other node for a replicated subtask's copy: accept the one
        result in, or remember the decision for when it comes."""
        first = self.results.first_vote(job.id, task.index)
        if decide(first is not None) is DecideOutcome.REMEMBER:
            self.results.mark_decided(job.id, task.index)
            self.results.drop(entry_id)
            return Handled.DROPPED
        assert first is not None  # ACCEPT_FIRST: the one result is in
        node, output = first
        self.results.count("replicas_unconfirmed")
        # the result's own time is not kept with the first vote
        return self._merge(job, task, entry_id, output, Origin(node, 0.0, Checked.UNCONFIRMED, (node,)))

    def ban(self, node: str, why: str) -> None:
        """Ban a node that keeps failing checks (or failing tasks its peers complete), and
        recompute what it merged into jobs still running: its results that passed a spot
        check may still be wrong."""
        if not self.results.ban(node, why):
            return
        redone = 0
        for job_id, index in self.results.merged_by(node):
            job = load_job(self.r, job_id)
            if job is None or job.state is not JobState.RUNNING:
                continue  # finished jobs keep their output; see ARCHITECTURE.md
            try:  # one job's plugin failing here must not stop the redo of the others
                plugin, params = plugin_and_params(job_id, job.kind, job.params)
                task = next(plugin.entries(job, params, index, 1))
            except Exception:
                log.exception("node %s: banned, but subtask %d of job %s could not be redone", node, index, job_id)
                continue
            if self.results.unmerge(job_id, index):
                self.results.queue_copy(task)
                redone += 1
        self.results.forget_merged(node)
        log.warning("node %s: banned (%s); %d merged results redone", node, why, redone)

    # ------------------------------------------------------------------ the loop

    def sweep(self) -> None:
        """Re-enqueue finalization for jobs stuck in `finalizing` (an aggregator died between
        the commit and the enqueue, or mid-finalize)."""
        for job_id in self.results.finalizing_jobs():
            try:
                enqueue_finalize(self.r, job_id, self.data_dir)
            except UNAVAILABLE:
                raise
            except Exception:  # one job's rq record must not keep the others from finalizing
                log.exception("job %s: could not enqueue its finalize job", job_id)

    def run_finalizers(self, flag: StopFlag) -> None:
        if self.queue.count == 0:
            return
        worker = SimpleWorker([self.queue], connection=self.r, name=finalizer_name(self.name))
        try:
            worker.work(burst=True, logging_level="WARNING")
        except StopRequested:
            # a stop signal arrived mid-finalize: rq stopped the worker; we stop too, and the
            # sweep of the next aggregator re-runs the finalize job if it did not finish
            flag.stopping = True
        finally:
            # rq installs its own SIGINT/SIGTERM handlers; take ours back
            signal.signal(signal.SIGINT, flag.set)
            signal.signal(signal.SIGTERM, flag.set)

    def step(self, flag: StopFlag) -> None:
        now = time.monotonic()
        entries: list[Entry] = self.results.read(count=read_count(self._last_read))
        self._last_read = len(entries)
        if now - self._last_sweep > SWEEP_EVERY_S:
            entries += self.results.claim_abandoned()
            self.sweep()
            self._last_sweep = now
        handled = handle_batch(self, entries)
        for outcome, n in handled.items():
            metrics.count(outcome.value, n)
        if handled[Handled.FINALIZE] or now - self._last_finalizers > FINALIZERS_EVERY_S:
            self._last_finalizers = now
            self.run_finalizers(flag)
        pause = gather_ms(self._last_read)
        if pause:
            time.sleep(pause / 1000)

    def fault(self, entry_id: bytes, task: TaskFields, node: str, exc: Exception) -> None:
        """A result whose handling raised: the job's problem, not the service's."""
        if plugin_step(exc) == "verify" and not isinstance(exc, OSError):
            # the node's bytes made the check itself fail: a wrong result, redone elsewhere
            # (an OSError is the controller's own file, not the node's doing: the job's problem)
            log.warning(
                "job %s: task %d from node %s broke verification (%r); redoing it", task.job, task.index, node, exc
            )
            self.results.requeue(task, entry_id)
            self.reject(node, task.job)
            return
        reason = job_error(exc, f"subtask {task.index}")
        log.error("job %s: %s; failing the job", task.job, reason, exc_info=exc)
        self.results.fail_job(task.job, reason)
        self.results.drop(entry_id)


def run(settings: Settings) -> None:
    from ..shared.store.connection import sync_client

    client = sync_client(settings.resolved_redis_url())
    ensure_groups(client)
    agg = Aggregator(
        client=client,
        data_dir=settings.data_path,
        ban_after=settings.ban_after,
        node_timeout_s=settings.node_timeout_s,
        modules=ModuleRegistry(static_dir=settings.static_path),
    )
    flag = StopFlag()
    if settings.metrics_port:
        metrics.serve_metrics(settings.metrics_port)
    log.info("aggregator %s started, data in %s", agg.name, agg.data_dir)
    beating = start_beating(client, "aggregator", agg.name)
    try:
        with captured_signals(flag):
            run_forever("aggregator", flag, lambda: agg.step(flag))
    finally:
        beating.set()
    log.info("aggregator %s stopped", agg.name)
