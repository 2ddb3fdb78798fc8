"""The scheduler: turns CLI commands into jobs, feeds the task stream, reaps dead nodes.

Loop (about every 100 ms):
1. read `submit`/`cancel` commands from `keys.COMMANDS` (consumer group, so a restarted
   scheduler resumes where the last one stopped; a command is ACKed only once applied);
2. feed: keep the undelivered backlog of `keys.TASKS` near `backlog_target()` by pulling
   the next subtasks from each active job's plugin (`split` is lazy; the job's `next_index`
   cursor and the new entries are written in one transaction, so a crash neither skips nor
   repeats a subtask);
3. reap: a node connection whose heartbeat is older than `node_timeout_s` has its pending
   tasks requeued (the gateway does this at once when a socket closes; this catches a
   silent node and a gateway that died).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from typing import Any

import redis

from ..shared import keys
from ..shared.capacity import NodeView, parts_per_task, worth_moving
from ..shared.core.replication import sampled
from ..shared.exceptions import ProcessDistroError
from ..shared.jobs import JobRecord, JobState
from ..shared.modules import ModuleRegistry
from ..shared.queue import TaskFields, node_of_consumer
from ..shared.service import StopFlag, beat, captured_signals, instance_name, run_forever
from ..shared.settings import Settings
from ..shared.store.jobs import drop_blocks, event, load_job
from ..shared.store.scripts import REQUEUE_LUA
from ..shared.store.streams import ensure_groups, live_node_ids
from ..shared.tasks import PLUGINS, get_plugin, plugin_and_params

log = logging.getLogger(__name__)

MIN_BACKLOG = 64
FEED_BATCH = 256
STEAL_FACTOR = 1.5  # steal a queued task for an idle node up to this many times slower per task
BUSY_STEAL_FACTOR = 0.5  # ... and for a busy node with prefetch room at least twice as fast
BACKUP_MIN_MS = 250  # never back up a task out for less than this
BACKUP_SPEEDUP = 0.67  # back up a running task for an idle node at least this much faster per task ...
BACKUP_STUCK_MIN_MS = 1500  # ... or one out for longer than this and than
BACKUP_FACTOR = 3.0  # this many typical task times (a node that stalled)
COMMAND_CLAIM_IDLE_MS = 3_000


class Scheduler:
    def __init__(self, *, client: redis.Redis, settings: Settings, modules: ModuleRegistry) -> None:
        self.r = client
        self.settings = settings
        self.modules = modules
        self.name = instance_name()
        self.requeue = client.register_script(REQUEUE_LUA)
        self._last_beat = 0.0
        self._last_reap = 0.0
        self._last_claim = 0.0
        self._fed = 0

    # ------------------------------------------------------------------ commands

    def handle_commands(self, block_ms: int | None = 50) -> int:
        """Apply pending commands; wait up to `block_ms` for one (None: do not wait; note
        that Redis reads BLOCK 0 as "wait forever")."""
        resp = self.r.xreadgroup(keys.SCHEDULER_GROUP, self.name, {keys.COMMANDS: ">"}, count=32, block=block_ms)
        batches = [entries for _stream, entries in resp or []]
        if time.monotonic() - self._last_claim > 2:
            # commands a killed scheduler had read but not applied (applying is idempotent)
            reply = self.r.xautoclaim(
                keys.COMMANDS, keys.SCHEDULER_GROUP, self.name, COMMAND_CLAIM_IDLE_MS, "0-0", count=32
            )
            batches.append([(eid, f) for eid, f in reply[1] if f])
            self._last_claim = time.monotonic()
        handled = 0
        for entries in batches:
            for entry_id, fields in entries:
                try:
                    self.apply(fields)
                except (ProcessDistroError, ValueError, KeyError) as exc:
                    log.error("command %s refused: %s", entry_id, exc)
                self.r.xack(keys.COMMANDS, keys.SCHEDULER_GROUP, entry_id)
                self.r.xdel(keys.COMMANDS, entry_id)
                handled += 1
        return handled

    def apply(self, fields: dict[bytes, bytes]) -> None:
        cmd = json.loads(fields[b"command"])
        if cmd["type"] == "submit":
            self.submit(cmd)
        elif cmd["type"] == "cancel":
            self.cancel(cmd["job_id"], cmd.get("reason", "cancelled by user"))
        elif cmd["type"] == "fail":
            self.cancel(cmd["job_id"], cmd["reason"], state=JobState.FAILED)
        else:
            raise ValueError(f"expected command type submit, cancel or fail, got {cmd['type']!r}")

    def submit(self, cmd: dict[str, Any]) -> None:
        job_id = cmd["job_id"]
        if self.r.exists(keys.job(job_id)):
            return  # a replayed command
        plugin = get_plugin(cmd["kind"])
        params = plugin.parse_params(cmd["params"])
        now = time.time()
        record = {
            "id": job_id,
            "kind": plugin.kind,
            "state": JobState.QUEUED.value,
            "params": params.model_dump_json(),
            "total": plugin.count(params),
            "done": 0,
            "next_index": 0,
            "created": cmd.get("created", now),
            "priority": int(cmd.get("priority", 0)),
            "replicate": float(cmd.get("replicate", self.settings.replicate)),
            "module": self.modules.get(plugin.module).sha256,
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping=record)
        pipe.zadd(keys.JOBS, {job_id: record["created"]})
        pipe.zadd(keys.ACTIVE_JOBS, {job_id: -record["priority"] * 1e10 + record["created"]})
        pipe.execute()
        event(self.r, "job", job_id=job_id, state="queued", total=record["total"])
        log.info("job %s: %s queued, %d subtasks", job_id, plugin.kind, record["total"])

    def cancel(self, job_id: str, reason: str, *, state: JobState = JobState.CANCELLED) -> None:
        """End a job early (cancelled by the user, or failed); its queued and running tasks
        are dropped by the gateways."""
        job = load_job(self.r, job_id)
        if job is None or job.state.terminal:
            return
        self.finish(job_id, state, error=reason)
        # Gateways drop the job's tasks when they meet them and tell nodes to stop.
        self.r.publish(keys.CONTROL, json.dumps({"type": "cancel_job", "job_id": job_id}))

    def finish(self, job_id: str, state: JobState, *, error: str = "") -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping={"state": state.value, "error": error, "finished": time.time()})
        pipe.zrem(keys.ACTIVE_JOBS, job_id)
        pipe.execute()
        drop_blocks(self.r, job_id)
        event(self.r, "job", job_id=job_id, state=state.value, error=error)
        log.info("job %s: %s %s", job_id, state.value, error)

    # ------------------------------------------------------------------ feeding

    def backlog(self) -> int:
        length = self.r.xlen(keys.TASKS)
        pending = self.r.xpending(keys.TASKS, keys.NODES_GROUP)["pending"]
        return int(length) - int(pending)

    def _open_backlog(self) -> int:
        """Undelivered entries that an idle node could take. A replicated subtask's second
        copy may wait for one particular node (the others ran the first): it does not count."""
        n = self.backlog()
        if n <= 0 or n > MIN_BACKLOG:
            return n
        groups = [g for g in self.r.xinfo_groups(keys.TASKS) if _text(g["name"]) == keys.NODES_GROUP]
        last = _text(groups[0]["last-delivered-id"]) if groups else "0-0"
        entries = self.r.xrange(keys.TASKS, f"({last}", "+", count=n)
        return sum(1 for _id, f in entries if f.get(b"replicated") != b"1")

    def backlog_target(self) -> int:
        """Enough undelivered entries for every live slot to take a few tasks, at the parts
        per task a node gets for the adaptive kinds (hash, crack)."""
        adaptive = {k for k, p in PLUGINS.items() if p.adaptive}
        room = 0
        for node in self._live_nodes().values():
            parts = [parts_per_task(ms, self.settings.target_task_s) for k, ms in node.ewma_ms.items() if k in adaptive]
            room += node.slots * max([1, *parts])
        return max(MIN_BACKLOG, 4 * room)

    def _live_nodes(self) -> dict[str, NodeView]:
        ids = sorted(live_node_ids(self.r, self.settings.node_timeout_s))
        pipe = self.r.pipeline(transaction=False)
        for node_id in ids:
            pipe.hgetall(keys.node(node_id))
        return {n: NodeView.of(n, h) for n, h in zip(ids, pipe.execute(), strict=True) if h}

    def feed(self) -> int:
        """Top the backlog up. Higher priority first; jobs of equal priority share the
        room evenly, so they progress at similar rates."""
        room = self.backlog_target() - self.backlog()
        if room <= 0:
            return 0
        jobs = [load_job(self.r, j.decode()) for j in self.r.zrange(keys.ACTIVE_JOBS, 0, -1)]
        feedable = [j for j in jobs if j is not None and j.state in (JobState.QUEUED, JobState.RUNNING)]
        added = 0
        for _priority, group in itertools.groupby(feedable, key=lambda j: j.priority):
            hungry = [j for j in group if j.next_index < j.total or j.state is JobState.QUEUED]
            while room > 0 and hungry:
                share = max(1, -(-room // len(hungry)))
                still = []
                for job in hungry:
                    n = self._feed_job(job, min(share, room, FEED_BATCH))
                    room -= n
                    added += n
                    job.next_index += n
                    job.state = JobState.RUNNING
                    if job.next_index < job.total and n > 0:
                        still.append(job)
                hungry = still
            if room <= 0:
                break
        return added

    def tail(self) -> tuple[int, int]:
        """Near the end of the work (nothing undelivered in the stream) idle slots get work
        that would otherwise wait on a slower node. Returns (tasks stolen, backups made).

        1. Stealing: a node holding more tasks than it has slots has not started the extra
           ones (prefetch); if an idle node is not much slower for that kind, or a busy one
           with prefetch room is at least twice as fast, the holder's gateway gives them back
           (`steal` on the control channel) and that node takes them.
        2. Backups: a task still running on a node clearly slower than an idle one, or out
           far longer than tasks usually take, gets a copy for the idle node; the first valid
           result wins, the other copy is cancelled and counted as a duplicate.
        """
        if self._open_backlog() > 0:
            return 0, 0
        nodes = self._live_nodes()
        summary = self.r.xpending(keys.TASKS, keys.NODES_GROUP)
        held = {_text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or []}
        for node in nodes.values():
            node.held = held.get(node.consumer, 0)
        # stealing feeds nodes that ran out of work; a backup may also wait in the prefetch
        # queue of a node much faster than the holder (behind the task it just stole)
        idle = [n for n in nodes.values() if n.held < n.slots]
        idle_slots = sum(n.slots - n.held for n in idle)
        room = [n for n in nodes.values() if n.held < n.slots + self.settings.prefetch]
        if not room or not held:
            return 0, 0
        kinds: dict[str, str] = {}  # entry id -> kind, read lazily

        def kind_of(entry_id: str) -> str:
            if entry_id not in kinds:
                entries = self.r.xrange(keys.TASKS, entry_id, entry_id)
                kinds[entry_id] = entries[0][1][b"kind"].decode() if entries else ""
            return kinds[entry_id]

        # a busy node with prefetch room, much faster than a holder, may queue its task: it
        # starts sooner there (never between nodes of like speed, which would ping-pong)
        busy = [n for n in room if n.held >= n.slots]
        busy_slots = sum(n.slots + self.settings.prefetch - n.held for n in busy)
        peers = list(nodes.values())
        stolen = 0
        for holder in sorted(nodes.values(), key=lambda n: -n.held):
            queued = holder.held - holder.slots
            if queued <= 0 or not self.settings.stealing or idle_slots + busy_slots <= 0:
                continue
            newest = self.r.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", 10_000, consumername=holder.consumer)
            kind = kind_of(_text(newest[-1]["message_id"])) if newest else ""
            if not kind:
                continue
            if idle_slots > 0 and worth_moving(holder, idle, kind, STEAL_FACTOR, peers):
                takers, free = idle, idle_slots
            elif busy_slots > 0 and worth_moving(holder, busy, kind, BUSY_STEAL_FACTOR, peers):
                takers, free = busy, busy_slots
            else:
                continue
            plugin = PLUGINS.get(kind)
            if plugin is not None and plugin.adaptive:
                # parts of one long task: the takers get their share by speed
                mine = holder.task_ms(kind, peers) or 1.0
                theirs = [t for i in takers if (t := i.task_ms(kind, peers)) is not None]
                share = mine / (mine + min(theirs)) if theirs else 0.5
                n, used = min(queued, max(1, round(queued * share))), 1
            else:
                n = used = min(queued, free)
            if takers is idle:
                idle_slots -= used
            else:
                busy_slots -= used
            self.r.publish(keys.CONTROL, json.dumps({"type": "steal", "consumer": holder.consumer, "count": n}))
            stolen += n
        backup_slots = sum(n.slots + self.settings.prefetch - n.held for n in room) - stolen
        made = self._backups(nodes, room, backup_slots, kind_of) if self.settings.backups else 0
        if stolen:
            log.info("stealing: %d queued tasks asked back from slower nodes", stolen)
        return stolen, made

    def _backups(self, nodes: dict[str, NodeView], idle: list[NodeView], idle_slots: int, kind_of: Any) -> int:
        if idle_slots <= 0:
            return 0
        latencies = sorted(float(x) for x in self.r.lrange(keys.LATENCY, 0, -1))
        typical_ms = latencies[len(latencies) // 2] if latencies else 1000.0
        stuck_ms = max(BACKUP_STUCK_MIN_MS, BACKUP_FACTOR * typical_ms)
        # a node runs its oldest entries (in stream order) first: only those may be running
        running: list[dict[str, Any]] = []
        per_consumer: dict[str, int] = {}
        for p in self.r.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", 1000):
            consumer = _text(p["consumer"])
            if consumer == keys.PARKED_CONSUMER:
                continue  # waiting for a particular node, not running
            per_consumer[consumer] = per_consumer.get(consumer, 0) + 1
            node = nodes.get(node_of_consumer(consumer))
            if per_consumer[consumer] <= (node.slots if node else 1):
                running.append(p)
        made = 0
        peers = list(nodes.values())
        for p in sorted(running, key=lambda p: -int(p["time_since_delivered"])):
            out_ms = int(p["time_since_delivered"])
            if made >= idle_slots or out_ms < BACKUP_MIN_MS:
                break
            entry_id = _text(p["message_id"])
            holder = nodes.get(node_of_consumer(_text(p["consumer"])))
            slower = holder is not None and worth_moving(holder, idle, kind_of(entry_id), BACKUP_SPEEDUP, peers)
            kind = PLUGINS.get(kind_of(entry_id))
            # a later part of a task waits for the parts before it: allow a whole task's time
            stuck = max(stuck_ms, 1.5 * self.settings.target_task_s * 1000) if kind and kind.adaptive else stuck_ms
            if not (slower or out_ms >= stuck):
                continue
            if not self.r.set(keys.backup_marker(entry_id), 1, nx=True, ex=3600):
                continue  # backed up already
            entries = self.r.xrange(keys.TASKS, entry_id, entry_id)
            if not entries:
                continue
            original = TaskFields.from_redis(entries[0][1])
            copy = dataclasses.replace(original, backup_of=node_of_consumer(_text(p["consumer"])))
            self.r.xadd(keys.TASKS, copy.to_redis())
            made += 1
        if made:
            self.r.hincrby(keys.STATS, "tasks_backup", made)
            log.info("backups: %d straggler copies for idle nodes", made)
        return made

    def _feed_job(self, job: JobRecord, limit: int) -> int:
        if job.next_index >= job.total:
            if job.state is JobState.QUEUED:  # a job of zero subtasks cannot exist, but be safe
                self.r.hset(keys.job(job.id), "state", JobState.RUNNING.value)
            return 0
        plugin, params = plugin_and_params(job.id, job.kind, job.params)
        module = job.module
        pipe = self.r.pipeline(transaction=True)
        n = 0
        replicas = []
        for offset, sub in enumerate(plugin.split(params, job.next_index)):
            if offset >= limit:
                break
            index = job.next_index + offset
            fields = TaskFields(job.id, index, job.kind, module, sub.input, blocks=sub.blocks)
            if sampled(job.id, index, job.total, job.replicate):
                fields = dataclasses.replace(fields, replicated=True)
                replicas.append(fields)
            pipe.xadd(keys.TASKS, fields.to_redis())
            n += 1
        for fields in replicas:  # the second copies after the batch, so one node rarely reads both
            pipe.xadd(keys.TASKS, fields.to_redis())
        pipe.hset(keys.job(job.id), "next_index", job.next_index + n)
        if job.state is JobState.QUEUED:
            pipe.hset(keys.job(job.id), "state", JobState.RUNNING.value)
        pipe.execute()
        if job.state is JobState.QUEUED:
            event(self.r, "job", job_id=job.id, state="running")
        return n

    # ------------------------------------------------------------------ reaping

    def reap(self) -> int:
        """Requeue what dead node connections hold; return how many tasks moved."""
        now = time.time()
        requeued = 0
        dead = set(self.r.zrangebyscore(keys.NODES, "-inf", now - self.settings.node_timeout_s))
        known = set(self.r.zrange(keys.NODES, 0, -1))
        for info in self.r.xinfo_consumers(keys.TASKS, keys.NODES_GROUP):
            name = info["name"] if isinstance(info["name"], bytes) else str(info["name"]).encode()
            idle_s = int(info["idle"]) / 1000
            # a consumer nobody vouches for (its gateway died before registering it) is dead too
            orphan = name not in known and idle_s > self.settings.node_timeout_s and name != PARKED_CONSUMER_B
            if name in dead or orphan:
                requeued += self.release_consumer(name.decode())
        for name in dead:
            self.r.zrem(keys.NODES, name)
        self.release_parked()
        if requeued:
            log.info("reaper: requeued %d tasks of dead nodes", requeued)
        return requeued

    def release_parked(self) -> int:
        """Parked replicated copies no live node may run any more go back to the stream, where
        a node that cannot run them tells the aggregator to accept the one result in; those of
        jobs that are over, or of subtasks merged meanwhile, are dropped."""
        ids = [_text(i) for i in self.r.smembers(keys.PARKED)]
        if not ids:
            return 0
        live = live_node_ids(self.r, self.settings.node_timeout_s)
        moved = 0
        for entry_id in ids:
            entries = self.r.xrange(keys.TASKS, entry_id, entry_id)
            task = TaskFields.from_redis(entries[0][1]) if entries else None
            job = load_job(self.r, task.job) if task else None
            if task is None or job is None or job.state not in (JobState.QUEUED, JobState.RUNNING):
                self._drop_parked(entry_id)
                continue
            if self.r.sismember(keys.job_done(task.job), task.index):
                self._drop_parked(entry_id)
                continue
            returned = {_text(v) for v in self.r.smembers(keys.job_returned(task.job, task.index))}
            votes = self.r.hlen(keys.job_votes(task.job, task.index))
            if not live - returned and votes < 2 and self.r.srem(keys.PARKED, entry_id):
                moved += int(self.requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, 0, entry_id]))
        return moved

    def _drop_parked(self, entry_id: str) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.srem(keys.PARKED, entry_id)
        pipe.xack(keys.TASKS, keys.NODES_GROUP, entry_id)
        pipe.xdel(keys.TASKS, entry_id)
        pipe.execute()

    def release_consumer(self, consumer: str) -> int:
        ids = [
            p["message_id"]
            for p in self.r.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", 10_000, consumername=consumer)
        ]
        n = int(self.requeue(keys=[keys.TASKS], args=[keys.NODES_GROUP, 1, *ids])) if ids else 0
        if n:
            self.r.hincrby(keys.STATS, "tasks_requeued", n)
        # DELCONSUMER drops pending entries silently: only once they are requeued
        if not self.r.xpending_range(keys.TASKS, keys.NODES_GROUP, "-", "+", 1, consumername=consumer):
            self.r.xgroup_delconsumer(keys.TASKS, keys.NODES_GROUP, consumer)
        return n

    # ------------------------------------------------------------------ loop

    def step(self) -> None:
        now = time.monotonic()
        if now - self._last_beat > 2:
            beat(self.r, "scheduler", self.name)
            self._last_beat = now
        # wait on the command stream only when there is nothing to feed
        self.handle_commands(block_ms=None if self._fed else 50)
        self._fed = self.feed()
        if not self._fed:
            self.tail()
        if now - self._last_reap > 0.5:
            self.reap()
            self._last_reap = now


PARKED_CONSUMER_B = keys.PARKED_CONSUMER.encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def run(settings: Settings) -> None:
    from ..shared.store.connection import sync_client

    client = sync_client(settings.resolved_redis_url())
    ensure_groups(client)
    sched = Scheduler(client=client, settings=settings, modules=ModuleRegistry(static_dir=settings.static_path))
    flag = StopFlag()
    log.info("scheduler %s started", sched.name)
    with captured_signals(flag):
        run_forever("scheduler", flag, sched.step)
    log.info("scheduler %s stopped", sched.name)
