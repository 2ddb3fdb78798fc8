"""The results stream and what the aggregator keeps beside it, with a sync client.

`ResultStream` is every Redis operation an aggregator makes on a result: read and claim
entries of `keys.RESULTS` (group `keys.AGGREGATORS_GROUP`), claim an index (`CLAIM_LUA`),
commit a merge (`COMMIT_LUA`), votes on replicated subtasks (`VOTE_LUA`, the first vote,
the decided marker), node reputation (rejected counts, bans, what each node merged, taken
back with `UNMERGE_LUA`), requeued copies, the early finish (`EARLY_LUA`) and the jobs left
in `finalizing`. Job state moves only inside COMMIT_LUA and EARLY_LUA (the Lua `move`).

A result entry is ACKed and deleted in the same step that disposes of it (commit, drop,
requeue), never before: an aggregator killed in between leaves it pending, and another
claims it (`claim_abandoned`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

from .. import keys
from ..core.replication import Ballot
from ..jobs import JobRecord, JobState
from ..messages import Ban, CancelJob, Fail
from ..queue import TaskFields, live_since, node_ids
from .commands import publish_control, send_command
from .connection import Client
from .events import queue_event
from .expiry import node_seen
from .nodes import live_voters, voters_of
from .scripts import CLAIM_LUA, CLAIM_MANY_LUA, COMMIT_LUA, COMMIT_MANY_LUA, EARLY_LUA, UNMERGE_LUA, VOTE_LUA

#: The sync client type, for code outside the store that passes one along (rq's queue and
#: worker, `store.jobs` functions) without importing redis itself.


#: One result entry: its stream id and its fields (`TaskFields` plus `output`, `node`, `decide`).
Entry: TypeAlias = tuple[bytes, dict[bytes, bytes]]

VOTES_TTL_S = 86_400
MERGED_MEMORY = 10_000  # merged results remembered per node, for recomputation after a ban
CLAIM_IDLE_MS = 10_000  # a live aggregator merges a batch in well under this
BATCH = 256  # result entries per read (and per claim and commit call)


class Commit(StrEnum):
    """What COMMIT_LUA did with a merged result."""

    MERGED = "merged"
    DUPLICATE = "duplicate"  # the index was in the done set already
    FINALIZE = "finalize"  # the last index: the job moved running -> finalizing


@dataclass(frozen=True)
class Vote:
    """A vote on a replicated subtask, with what the decision needs, read right after it."""

    ballot: Ballot
    #: sha256 (hex) of the voted result
    digest: str
    #: voter -> digest of every vote on the subtask, this one included (one vote per voter:
    #: `core.dispatch.voter_key`, the node id or its address)
    votes: dict[str, str]
    #: a gateway decided to accept the one result (`keys.job_decided`)
    decided: bool
    #: live voters
    live: set[str]
    #: voter -> the node whose result it voted (penalties go to nodes)
    nodes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    """What the batch path knows of a batch of results before it verifies them, read in
    one round trip (`ResultStream.look`)."""

    #: job id -> its record (None: gone)
    jobs: dict[str, JobRecord | None]
    #: the banned nodes among the results' nodes
    banned: frozenset[str]
    #: (job id, index) of the results whose index is merged already
    done: frozenset[tuple[str, int]]


#: A merged result to commit: job id, index, result entry id, node
Merged: TypeAlias = tuple[str, int, bytes, str]


class ResultStream:
    """An aggregator's view of `keys.RESULTS` and of the replication and reputation records."""

    def __init__(self, client: Client, *, consumer: str, node_timeout_s: float) -> None:
        self.r = client
        self.consumer = consumer
        self.node_timeout_s = node_timeout_s
        self._commit = client.register_script(COMMIT_LUA)
        self._early = client.register_script(EARLY_LUA)
        self._unmerge = client.register_script(UNMERGE_LUA)
        self._claim = client.register_script(CLAIM_LUA)
        self._vote = client.register_script(VOTE_LUA)
        self._claim_many = client.register_script(CLAIM_MANY_LUA)
        self._commit_many = client.register_script(COMMIT_MANY_LUA)

    # ------------------------------------------------------------ entries

    def read(self, block_ms: int = 500, count: int = BATCH) -> list[Entry]:
        """New result entries for this consumer (they stay pending until disposed of)."""
        resp = self.r.xreadgroup(
            keys.AGGREGATORS_GROUP, self.consumer, {keys.RESULTS: ">"}, count=count, block=block_ms
        )
        return [entry for _stream, entries in resp or [] for entry in entries]

    def claim_abandoned(self) -> list[Entry]:
        """Results a dead aggregator read but never finished."""
        reply = self.r.xautoclaim(
            keys.RESULTS, keys.AGGREGATORS_GROUP, self.consumer, CLAIM_IDLE_MS, "0-0", count=BATCH
        )
        entries = reply[1]  # Redis 7 adds a third element (deleted ids); 6.2 has two
        return [(eid, f) for eid, f in entries if f]

    def drop(self, entry_id: bytes) -> None:
        """Dispose of a result entry, unmerged."""
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(keys.RESULTS, keys.AGGREGATORS_GROUP, entry_id)
        pipe.xdel(keys.RESULTS, entry_id)
        pipe.execute()

    def duplicate(self, entry_id: bytes) -> None:
        """Dispose of a result for an index merged already, counting it."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(keys.STATS, "tasks_duplicate", 1)
        pipe.xack(keys.RESULTS, keys.AGGREGATORS_GROUP, entry_id)
        pipe.xdel(keys.RESULTS, entry_id)
        pipe.execute()

    def requeue(self, task: TaskFields, entry_id: bytes) -> None:
        """Dispose of a result that is not taken and queue the subtask again (attempt + 1),
        in one step."""
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(keys.TASKS, task.retry().to_redis())
        pipe.xack(keys.RESULTS, keys.AGGREGATORS_GROUP, entry_id)
        pipe.xdel(keys.RESULTS, entry_id)
        pipe.execute()

    def dispose(self, dropped: Sequence[bytes], duplicates: Sequence[bytes]) -> None:
        """`drop` and `duplicate` for many entries, in one step."""
        ids = [*dropped, *duplicates]
        if not ids:
            return
        pipe = self.r.pipeline(transaction=True)
        if duplicates:
            pipe.hincrby(keys.STATS, "tasks_duplicate", len(duplicates))
        pipe.xack(keys.RESULTS, keys.AGGREGATORS_GROUP, *ids)
        pipe.xdel(keys.RESULTS, *ids)
        pipe.execute()

    def queue_copy(self, task: TaskFields) -> None:
        """Queue `task` as it is (the caller chooses `task.retry()` or a fresh one)."""
        self.r.xadd(keys.TASKS, task.to_redis())

    # ------------------------------------------------------------ merging

    def is_done(self, job_id: str, index: int) -> bool:
        return bool(self.r.sismember(keys.job_done(job_id), index))

    def claim(self, job_id: str, index: int, entry_id: bytes) -> bool:
        """Claim the index for this result entry before touching the files: only the first
        valid result may write. A claim by the same entry (redelivered) is still ours."""
        return bool(self._claim(keys=[keys.job_claims(job_id)], args=[index, entry_id]) == 1)

    def look(self, results: Sequence[tuple[str, int, str]]) -> Seen:
        """For results (job id, index, node): their jobs' records, which nodes are banned,
        which indices are merged already. One round trip for the batch."""
        job_ids = sorted({job for job, _i, _n in results})
        nodes = sorted({node for _j, _i, node in results})
        indices = {job: sorted({i for j, i, _n in results if j == job}) for job in job_ids}
        pipe = self.r.pipeline(transaction=False)
        for job in job_ids:
            pipe.hgetall(keys.job(job))
        for node in nodes:
            pipe.hget(keys.node(node), "banned")
        for job in job_ids:
            pipe.smismember(keys.job_done(job), indices[job])
        replies = pipe.execute()
        records, banned, members = (
            replies[: len(job_ids)],
            replies[len(job_ids) : -len(job_ids)],
            replies[-len(job_ids) :],
        )
        done = {
            (job, i) for job in job_ids for i, m in zip(indices[job], members[job_ids.index(job)], strict=True) if m
        }
        return Seen(
            jobs={job: JobRecord.from_hash(h) if h else None for job, h in zip(job_ids, records, strict=True)},
            banned=frozenset(n for n, b in zip(nodes, banned, strict=True) if b == b"1"),
            done=frozenset(done),
        )

    def claim_many(self, results: Sequence[tuple[str, int, bytes]]) -> list[bool]:
        """`claim` for (job id, index, entry id) of many results, in order, in one call."""
        if not results:
            return []
        won = self._claim_many(
            keys=[keys.job_claims(job) for job, _i, _e in results],
            args=[x for _j, index, entry in results for x in (index, entry)],
        )
        return [int(w) == 1 for w in won]

    def commit_many(self, merged: Sequence[Merged]) -> tuple[list[Commit], frozenset[str]]:
        """`commit` and `credit` for many merged results in one round trip; also returns
        which of their nodes are banned now (banned while we merged: the caller takes
        those results back)."""
        if not merged:
            return [], frozenset()
        nodes = sorted({node for *_x, node in merged})
        pipe = self.r.pipeline(transaction=False)
        self._commit_many(
            keys=[keys.RESULTS, keys.STATS, *(k for job, *_x in merged for k in (keys.job(job), keys.job_done(job)))],
            args=[keys.AGGREGATORS_GROUP, *(x for job, index, entry, _n in merged for x in (job, index, entry))],
            client=pipe,
        )
        for node in nodes:
            mine = [f"{job}:{index}" for job, index, _e, n in merged if n == node]
            pipe.hincrby(keys.node(node), "completed", len(mine))
            pipe.lpush(keys.node_merged(node), *mine)
            pipe.ltrim(keys.node_merged(node), 0, MERGED_MEMORY - 1)
            node_seen(pipe, node)
        for job_id, count in Counter(job for job, *_x in merged).items():
            pipe.hincrby(keys.job_stats(job_id), "verified", count)
        for node in nodes:
            pipe.hget(keys.node(node), "banned")
        replies = pipe.execute()
        outcomes = [Commit(o.decode() if isinstance(o, bytes) else str(o)) for o in replies[0]]
        banned = frozenset(n for n, b in zip(nodes, replies[-len(nodes) :], strict=True) if b == b"1")
        return outcomes, banned

    def commit(self, job_id: str, index: int, entry_id: bytes) -> Commit:
        """The result is merged: add the index to the done set and dispose of the entry."""
        outcome = self._commit(
            keys=[keys.job(job_id), keys.job_done(job_id), keys.RESULTS, keys.STATS],
            args=[keys.AGGREGATORS_GROUP, entry_id, index, job_id],
        )
        return Commit(outcome.decode() if isinstance(outcome, bytes) else str(outcome))

    def unmerge(self, job_id: str, index: int) -> bool:
        """Take a merged index back while its job runs (its node was banned); False if the
        job is not running or the index is not merged."""
        return bool(
            int(self._unmerge(keys=[keys.job(job_id), keys.job_done(job_id), keys.job_claims(job_id)], args=[index]))
        )

    def finish_early(self, job_id: str) -> bool:
        """running -> finalizing once; gateways hear `cancel_job` and stop its tasks."""
        won = bool(int(self._early(keys=[keys.job(job_id)], args=[job_id])))
        if won:
            publish_control(self.r, CancelJob(job_id=job_id))
        return won

    def fail_job(self, job_id: str, reason: str) -> None:
        """Ask the scheduler to fail the job (it owns that move)."""
        send_command(self.r, Fail(job_id=job_id, reason=reason))

    def finalizing_jobs(self) -> list[str]:
        """Active jobs in `finalizing` (the sweep enqueues their finalize job again)."""
        job_ids = [j.decode() for j in self.r.zrange(keys.ACTIVE_JOBS, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "state")
        states = pipe.execute()
        return [j for j, s in zip(job_ids, states, strict=True) if s == JobState.FINALIZING.value.encode()]

    def count(self, stat: str) -> None:
        """One more of a cluster-wide counter (`keys.STATS`)."""
        self.r.hincrby(keys.STATS, stat, 1)

    # ------------------------------------------------------------ votes

    def vote(self, job_id: str, index: int, node: str, output: bytes, voter: str | None = None) -> Vote:
        """Record the vote of `voter` (default: the node itself) for node `node`'s result (the
        sha256 of it), then read what a decision needs. A first vote is remembered, with the
        result, before the reads, so that a `decide` handled meanwhile finds it."""
        voter = voter or node
        votes_key = keys.job_votes(job_id, index)
        digest = hashlib.sha256(output).hexdigest()
        fresh, count, same = (int(x) for x in self._vote(keys=[votes_key], args=[voter, digest, VOTES_TTL_S]))
        ballot = Ballot(fresh=bool(fresh), count=count, same=same)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.job_vote_nodes(job_id, index), voter, node)
        pipe.expire(keys.job_vote_nodes(job_id, index), VOTES_TTL_S)
        if ballot.first:
            pipe.set(keys.job_first_vote(job_id, index), node.encode() + b"\n" + output, ex=VOTES_TTL_S)
        pipe.hgetall(votes_key)
        pipe.exists(keys.job_decided(job_id, index))
        pipe.zrangebyscore(keys.NODES, live_since(self.node_timeout_s), "+inf")
        pipe.hgetall(keys.job_vote_nodes(job_id, index))
        *_, votes, decided, live, nodes = pipe.execute()
        return Vote(
            ballot=ballot,
            digest=digest,
            votes={n.decode(): d.decode() for n, d in votes.items()},
            decided=bool(decided),
            live=set(voters_of(self.r, sorted(node_ids(live))).values()),
            nodes={v.decode(): n.decode() for v, n in nodes.items()},
        )

    def vote_nodes(self, job_id: str, index: int) -> dict[str, str]:
        """voter -> the node whose result it voted, for a replicated subtask."""
        return {v.decode(): n.decode() for v, n in self.r.hgetall(keys.job_vote_nodes(job_id, index)).items()}

    def live_voters(self) -> set[str]:
        """The voters of the live nodes (`store.nodes.live_voters`)."""
        return live_voters(self.r, self.node_timeout_s)

    def votes(self, job_id: str, index: int) -> dict[str, str]:
        """voter -> sha256 of its result, for every vote on a replicated subtask."""
        return {n.decode(): d.decode() for n, d in self.r.hgetall(keys.job_votes(job_id, index)).items()}

    def first_vote(self, job_id: str, index: int) -> tuple[str, bytes] | None:
        """The node and result of a replicated subtask's only vote, if it is in."""
        first = self.r.get(keys.job_first_vote(job_id, index))
        if first is None:
            return None
        node, _, output = bytes(first).partition(b"\n")
        return node.decode(), output

    def forget_first_vote(self, job_id: str, index: int) -> None:
        self.r.delete(keys.job_first_vote(job_id, index))

    def live_nodes(self) -> set[str]:
        """The ids of the live nodes."""
        return node_ids(self.r.zrangebyscore(keys.NODES, live_since(self.node_timeout_s), "+inf"))

    def mark_returned(self, job_id: str, index: int, node: str) -> None:
        """Record that `node` (its voter) returned a result for the subtask
        (`keys.job_returned`, as a gateway does for replicated copies): its copies go to other voters."""
        pipe = self.r.pipeline(transaction=False)
        pipe.sadd(keys.job_returned(job_id, index), node)
        pipe.expire(keys.job_returned(job_id, index), VOTES_TTL_S)
        pipe.execute()

    def mark_decided(self, job_id: str, index: int) -> None:
        """Remember a `decide` that came before the one result: that result is accepted."""
        self.r.set(keys.job_decided(job_id, index), 1, ex=VOTES_TTL_S)

    # ------------------------------------------------------------ nodes

    def banned(self, node: str) -> bool:
        return bool(self.r.hget(keys.node(node), "banned") == b"1")

    def credit(self, node: str, job_id: str, index: int) -> None:
        """Count a merged result for its node, and remember it: a later ban has it redone."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(keys.node(node), "completed", 1)
        pipe.hincrby(keys.job_stats(job_id), "verified", 1)
        pipe.lpush(keys.node_merged(node), f"{job_id}:{index}")
        pipe.ltrim(keys.node_merged(node), 0, MERGED_MEMORY - 1)
        node_seen(pipe, node)  # LPUSH made the list: it expires with the node's record
        pipe.execute()

    def reject(self, node: str, job_id: str = "") -> int:
        """Count a wrong result against its node (and in its job's counters); returns the
        node's count with this one."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(keys.node(node), "rejected", 1)
        pipe.hincrby(keys.STATS, "tasks_rejected", 1)
        if job_id:
            pipe.hincrby(keys.job_stats(job_id), "rejected", 1)
        return int(pipe.execute()[0])

    def ban(self, node: str, reason: str = "too many wrong results") -> bool:
        """Ban the node (gateways close its sockets and refuse it, saying `reason`). False if
        it was banned already: only the first ban goes on to redo what it merged."""
        if not self.r.hsetnx(keys.node(node), "banned_at", time.time()):
            return False
        self.r.hset(keys.node(node), "banned", 1)
        queue_event(self.r, "node", node_id=node, what="banned", detail=reason[:200])
        publish_control(self.r, Ban(node_id=node, reason=reason[:200]))
        return True

    def merged_by(self, node: str) -> list[tuple[str, int]]:
        """(job id, index) of the results the node merged, newest first."""
        items = (item.decode().rpartition(":") for item in self.r.lrange(keys.node_merged(node), 0, -1))
        return [(job_id, int(index)) for job_id, _, index in items]

    def forget_merged(self, node: str) -> None:
        self.r.delete(keys.node_merged(node))
