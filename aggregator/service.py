"""The aggregator: a consumer of `keys.RESULTS` in group `aggregators` (run as many as you
like), which verifies each result, merges it idempotently and triggers finalization.

For each result entry:
- its job is gone or over: drop it;
- the plugin's `verify` rejects it: requeue the task (attempt + 1), count it against the
  node, never merge it;
- otherwise merge it into the job's files, then commit (COMMIT_LUA): the first result per
  index wins, later copies are counted as duplicates; the last one moves the job to
  `finalizing`, which enqueues the rq finalize job.
A result is ACKed and deleted only after it is merged (or dropped), so a killed aggregator's
pending results are claimed by another (XAUTOCLAIM) and merged again, harmlessly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import time
from pathlib import Path

import redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested

from ..shared import keys
from ..shared.jobs import JobRecord, JobState
from ..shared.queue import TaskFields
from ..shared.service import StopFlag, captured_signals, instance_name, run_forever, start_beating
from ..shared.settings import Settings
from ..shared.store.jobs import block_reader, load_job
from ..shared.store.scripts import CLAIM_LUA, COMMIT_LUA, EARLY_LUA, UNMERGE_LUA, VOTE_LUA
from ..shared.store.streams import ensure_groups, full_input, live_node_ids
from ..shared.tasks import JobFiles, Verdict, plugin_and_params
from .finalize import enqueue_finalize, finalizer_name

log = logging.getLogger(__name__)

MAX_VOTES = 5  # distinct results for one replicated subtask before its job fails
VOTES_TTL_S = 86_400
MERGED_MEMORY = 10_000  # merged results remembered per node, for recomputation after a ban
CLAIM_IDLE_MS = 10_000  # a live aggregator merges a batch in well under this


class Aggregator:
    def __init__(self, *, client: redis.Redis, data_dir: Path, ban_after: int = 3, node_timeout_s: float = 4.0) -> None:
        self.r = client
        self.data_dir = data_dir
        self.name = instance_name()
        self.commit = client.register_script(COMMIT_LUA)
        self._early = client.register_script(EARLY_LUA)
        self._unmerge = client.register_script(UNMERGE_LUA)
        self._claim = client.register_script(CLAIM_LUA)
        self._vote_lua = client.register_script(VOTE_LUA)
        self.ban_after = ban_after
        self.node_timeout_s = node_timeout_s
        self.rng = random.Random()
        self.queue = Queue(keys.FINALIZE_QUEUE, connection=client)
        self._last_sweep = 0.0

    def read(self, block_ms: int = 500) -> list[tuple[bytes, dict[bytes, bytes]]]:
        resp = self.r.xreadgroup(keys.AGGREGATORS_GROUP, self.name, {keys.RESULTS: ">"}, count=64, block=block_ms)
        return [entry for _stream, entries in resp or [] for entry in entries]

    def claim_abandoned(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Results a dead aggregator read but never finished."""
        reply = self.r.xautoclaim(keys.RESULTS, keys.AGGREGATORS_GROUP, self.name, CLAIM_IDLE_MS, "0-0", count=64)
        entries = reply[1]  # Redis 7 adds a third element (deleted ids); 6.2 has two
        return [(eid, f) for eid, f in entries if f]

    def handle(self, entry_id: bytes, f: dict[bytes, bytes]) -> str:
        job_id = f[b"job"].decode()
        index = int(f[b"index"])
        job = load_job(self.r, job_id)
        if job is None or job.state is not JobState.RUNNING:
            self._drop(entry_id)
            return "dropped"
        plugin, params = plugin_and_params(job_id, job.kind, job.params)
        output = f[b"output"]
        node = f.get(b"node", b"?").decode()
        if self.r.hget(keys.node(node), "banned") == b"1":
            # a banned node's late results are not trusted, even if they pass a check
            self._redo(TaskFields.from_redis(f), entry_id)
            return "rejected"
        if self.r.sismember(keys.job_done(job_id), index):
            return self._duplicate(entry_id)
        task = TaskFields.from_redis(f)
        if f.get(b"decide") == b"1":
            return self._decide(job, task, entry_id)
        if plugin.verify(params, index, full_input(self.r, task), output, self.rng) is Verdict.REJECT:
            log.warning("job %s: task %d from node %s failed verification; redoing it", job_id, index, node)
            self._redo(task, entry_id)
            self._reject(node)
            return "rejected"
        dissenters: list[str] = []
        if task.replicated:
            agreed = self._vote(job, task, entry_id, node, output)
            if isinstance(agreed, str):
                return agreed
            dissenters = agreed
        outcome = self._merge(job, task, entry_id, node, output)
        for other in dissenters:  # outvoted: a wrong result that passed the cheap check
            log.warning("job %s: node %s was outvoted on task %d", job_id, other, index)
            self._reject(other)
        return outcome

    def _merge(self, job: JobRecord, task: TaskFields, entry_id: bytes, node: str, output: bytes) -> str:
        job_id, index = job.id, task.index
        plugin, params = plugin_and_params(job_id, job.kind, job.params)
        # Claim the index before writing: only the first valid result may touch the files
        # (a later one could differ: a subtle liar's). The claim names this result entry, so
        # if we die here, whoever claims the entry next may finish the write.
        if self._claim(keys=[keys.job_claims(job_id)], args=[index, entry_id]) != 1:
            return self._duplicate(entry_id)
        files = JobFiles.under(self.data_dir, job_id, block_reader(self.r, job_id))
        plugin.merge(files, params, index, output)
        outcome = self.commit(keys=self._commit_keys(job_id), args=[keys.AGGREGATORS_GROUP, entry_id, index, job_id])
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(keys.node(node), "completed", 1)
        # what this node merged, so that a later ban can have it recomputed
        pipe.lpush(keys.node_merged(node), f"{job_id}:{index}")
        pipe.ltrim(keys.node_merged(node), 0, MERGED_MEMORY - 1)
        pipe.execute()
        if self.r.hget(keys.node(node), "banned") == b"1" and self._unmerge(
            keys=[keys.job(job_id), keys.job_done(job_id), keys.job_claims(job_id)], args=[index]
        ):
            # banned while we merged: take it back, like the ban does for earlier ones
            self.r.xadd(keys.TASKS, task.retry().to_redis())
            return "rejected"
        if outcome == "merged" and plugin.finished_early(files, params, index, output) and self.finish_early(job_id):
            log.info("job %s: answer found by task %d; finalizing early", job_id, index)
            outcome = "finalize"
        if outcome == "finalize":
            log.info("job %s: all %d subtasks merged; finalizing", job_id, job.total)
            enqueue_finalize(self.r, job_id, self.data_dir)
        return outcome

    def _reject(self, node: str) -> None:
        """Count a wrong result against its node; ban it after `ban_after`."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(keys.node(node), "rejected", 1)
        pipe.hincrby(keys.STATS, "tasks_rejected", 1)
        rejected = int(pipe.execute()[0])
        if rejected >= self.ban_after and node != "?":
            self.ban(node, rejected)

    # ------------------------------------------------------------------ replication

    def _vote(self, job: JobRecord, task: TaskFields, entry_id: bytes, node: str, output: bytes) -> list[str] | str:
        """Record a replicated subtask's result. Returns the nodes outvoted when two nodes
        now agree (this result is then merged), else what happened ("awaiting", "quorum")."""
        votes_key = keys.job_votes(job.id, task.index)
        digest = hashlib.sha256(output).hexdigest()
        fresh, count, same = (int(x) for x in self._vote_lua(keys=[votes_key], args=[node, digest, VOTES_TTL_S]))
        if same >= 2:
            self.r.hincrby(keys.STATS, "replicas_confirmed", 1)
            self.r.delete(keys.job_first_vote(job.id, task.index))
            votes = self.r.hgetall(votes_key)
            return [n.decode() for n, d in votes.items() if d.decode() != digest]
        if count == 1:
            self.r.set(keys.job_first_vote(job.id, task.index), node.encode() + b"\n" + output, ex=VOTES_TTL_S)
            if not fresh:  # the same node again (its copy came back to it): another node must confirm
                self.r.xadd(keys.TASKS, task.retry().to_redis())
            if not self._confirmers(job.id, task.index) or self.r.exists(keys.job_decided(job.id, task.index)):
                # nobody else to ask: the cheap check passed, and that is what we have
                self.r.hincrby(keys.STATS, "replicas_unconfirmed", 1)
                return []
            self._drop(entry_id)
            return "awaiting"
        if count >= MAX_VOTES:
            reason = f"subtask {task.index}: {count} nodes returned {count} different results; no two agree"
            self.r.xadd(keys.COMMANDS, {"command": json.dumps({"type": "fail", "job_id": job.id, "reason": reason})})
            self._drop(entry_id)
            return "no quorum"
        # a mismatch: one more node breaks the tie
        log.warning("job %s: task %d results differ (%d votes); asking one more node", job.id, task.index, count)
        self.r.hincrby(keys.STATS, "replicas_disputed", 1)
        self._redo(task, entry_id)
        return "quorum"

    def _confirmers(self, job_id: str, index: int) -> set[str]:
        """Live nodes that have not returned a result for this replicated subtask."""
        live = live_node_ids(self.r, self.node_timeout_s)
        return live - {v.decode() for v in self.r.hkeys(keys.job_votes(job_id, index))}

    def _decide(self, job: JobRecord, task: TaskFields, entry_id: bytes) -> str:
        """A gateway found no other node for a replicated subtask's copy: accept the one
        result in, if there is one (if not, that result decides when it comes: its node may
        still be live and so count as a confirmer)."""
        first = self.r.get(keys.job_first_vote(job.id, task.index))
        if first is None:
            self.r.set(keys.job_decided(job.id, task.index), 1, ex=VOTES_TTL_S)
            self._drop(entry_id)
            return "dropped"
        node, _, output = first.partition(b"\n")
        self.r.hincrby(keys.STATS, "replicas_unconfirmed", 1)
        return self._merge(job, task, entry_id, node.decode(), output)

    def ban(self, node: str, rejected: int) -> None:
        """Ban a node that keeps failing checks, and recompute what it merged into jobs
        still running: its results that passed a spot check may still be wrong."""
        if not self.r.hsetnx(keys.node(node), "banned_at", time.time()):
            return
        self.r.hset(keys.node(node), "banned", 1)
        self.r.publish(keys.CONTROL, json.dumps({"type": "ban", "node_id": node}))
        redone = 0
        for item in self.r.lrange(keys.node_merged(node), 0, -1):
            job_id, _, index = item.decode().rpartition(":")
            job = load_job(self.r, job_id)
            if job is None or job.state is not JobState.RUNNING:
                continue  # finished jobs keep their output; see ARCHITECTURE.md
            plugin, params = plugin_and_params(job_id, job.kind, job.params)
            sub = next(plugin.split(params, int(index)))
            task = TaskFields(job_id, int(index), job.kind, job.module, sub.input, blocks=sub.blocks)
            if int(
                self._unmerge(keys=[keys.job(job_id), keys.job_done(job_id), keys.job_claims(job_id)], args=[index])
            ):
                self.r.xadd(keys.TASKS, task.to_redis())
                redone += 1
        self.r.delete(keys.node_merged(node))
        log.warning("node %s: banned after %d rejected results; %d merged results redone", node, rejected, redone)

    def finish_early(self, job_id: str) -> int:
        """running -> finalizing once; gateways stop the job's queued and running tasks."""
        won = int(self._early(keys=[keys.job(job_id)], args=[job_id]))
        if won:
            self.r.publish(keys.CONTROL, json.dumps({"type": "cancel_job", "job_id": job_id}))
        return won

    def _duplicate(self, entry_id: bytes) -> str:
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(keys.STATS, "tasks_duplicate", 1)
        pipe.xack(keys.RESULTS, keys.AGGREGATORS_GROUP, entry_id)
        pipe.xdel(keys.RESULTS, entry_id)
        pipe.execute()
        return "duplicate"

    def _redo(self, task: TaskFields, entry_id: bytes) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(keys.TASKS, task.retry().to_redis())
        pipe.xack(keys.RESULTS, keys.AGGREGATORS_GROUP, entry_id)
        pipe.xdel(keys.RESULTS, entry_id)
        pipe.execute()

    def _commit_keys(self, job_id: str) -> list[str]:
        return [keys.job(job_id), keys.job_done(job_id), keys.RESULTS, keys.STATS]

    def _drop(self, entry_id: bytes) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(keys.RESULTS, keys.AGGREGATORS_GROUP, entry_id)
        pipe.xdel(keys.RESULTS, entry_id)
        pipe.execute()

    def sweep(self) -> None:
        """Re-enqueue finalization for jobs stuck in `finalizing` (an aggregator died between
        the commit and the enqueue, or mid-finalize)."""
        for job_id_b in self.r.zrange(keys.ACTIVE_JOBS, 0, -1):
            job = load_job(self.r, job_id_b.decode())
            if job is not None and job.state is JobState.FINALIZING:
                enqueue_finalize(self.r, job.id, self.data_dir)

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
        entries = self.read()
        if now - self._last_sweep > 5:
            entries += self.claim_abandoned()
            self.sweep()
            self._last_sweep = now
        for entry_id, fields in entries:
            try:
                self.handle(entry_id, fields)
            except (KeyError, ValueError) as exc:
                log.error("result %s is malformed (%s); dropped", entry_id, exc)
                self._drop(entry_id)
        self.run_finalizers(flag)


def run(settings: Settings) -> None:
    from ..shared.store.connection import sync_client

    client = sync_client(settings.resolved_redis_url())
    ensure_groups(client)
    agg = Aggregator(
        client=client, data_dir=settings.data_path, ban_after=settings.ban_after, node_timeout_s=settings.node_timeout_s
    )
    flag = StopFlag()
    log.info("aggregator %s started, data in %s", agg.name, agg.data_dir)
    beating = start_beating(client, "aggregator", agg.name)
    try:
        with captured_signals(flag):
            run_forever("aggregator", flag, lambda: agg.step(flag))
    finally:
        beating.set()
    log.info("aggregator %s stopped", agg.name)
