"""Jobs in Redis: the record, its state moves, its shared input blocks, the events stream.

`JobStore.transition` is the only way a job's state is written outside the two store
scripts that move `running -> finalizing` inside a larger atomic step (`COMMIT_LUA`,
`EARLY_LUA`): both go through the same Lua `move`, a compare-and-set checked against
`jobs.TRANSITIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import redis

from .. import keys
from ..jobs import RETRY_FINALIZE, JobRecord, JobState, allowed
from . import expiry, modules
from .events import queue_event
from .scripts import TRANSITION_LUA


def load_job(client: redis.Redis, job_id: str) -> JobRecord | None:
    h = client.hgetall(keys.job(job_id))
    return JobRecord.from_hash(h) if h else None


def event(client: redis.Redis, kind: str, **fields: Any) -> None:
    """Write one event now (`events.queue_event`)."""
    queue_event(client, kind, **fields)


class JobStore:
    """A job's record and its state machine, with a sync client (scheduler, aggregator, CLI)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._transition = client.register_script(TRANSITION_LUA)

    def load(self, job_id: str) -> JobRecord | None:
        return load_job(self.r, job_id)

    def transition(
        self, job_id: str, frm: JobState | Iterable[JobState], to: JobState, **fields: str | float | int
    ) -> bool:
        """Move the job to `to` if it is in (one of) `frm`, writing `fields` with the move, in
        one compare-and-set. False if its state was another one by then. Raises ValueError
        for a move `jobs.TRANSITIONS` does not allow."""
        sources = [frm] if isinstance(frm, JobState) else list(frm)
        for f in sources:
            if not allowed(f, to):
                raise ValueError(f"a job may not move from {f.value} to {to.value}")
        if not sources:
            return False
        flat = [x for kv in fields.items() for x in kv]
        args = [job_id, to.value, ",".join(s.value for s in sources), *flat]
        return bool(self._transition(keys=[keys.job(job_id), keys.ACTIVE_JOBS], args=args))

    def create(self, job_id: str, record: dict[str, str | float | int], *, priority: int, created: float) -> bool:
        """Write a new job's record and list it in `keys.JOBS` and `keys.ACTIVE_JOBS`, in one
        transaction; False (nothing written) if the job exists already (a replayed submit)."""
        if self.r.exists(keys.job(job_id)):
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.job(job_id), mapping=record)
        pipe.zadd(keys.JOBS, {job_id: created})
        pipe.zadd(keys.ACTIVE_JOBS, {job_id: -priority * 1e10 + created})
        pipe.execute()
        return True

    def retry_finalize(self, job_id: str) -> bool:
        """Move a job whose finalize failed (marked `jobs.RETRY_FINALIZE`, its merged work
        kept) back to `finalizing` (listed active again by the move), where an aggregator's
        sweep enqueues its finalize. False for any other job."""
        if self.r.hget(keys.job(job_id), RETRY_FINALIZE) != b"finalize":
            return False
        # the mark is cleared with the move: a finalize that fails again sets it again
        fields: dict[str, str | float | int] = {"error": "", "finished": "", RETRY_FINALIZE: ""}
        return self.transition(job_id, JobState.FAILED, JobState.FINALIZING, **fields)

    def active(self) -> list[JobRecord]:
        """The jobs not yet terminal, in `keys.ACTIVE_JOBS` order (priority, then age)."""
        ids = [i.decode() for i in self.r.zrange(keys.ACTIVE_JOBS, 0, -1)]
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        return [JobRecord.from_hash(h) for h in pipe.execute() if h] if ids else []


def store_blocks(client: redis.Redis, job_id: str, blocks: dict[str, bytes]) -> None:
    """Store a job's shared input blocks (by sha256) before its tasks refer to them."""
    if not blocks:
        return
    pipe = client.pipeline(transaction=False)
    for sha, data in blocks.items():
        pipe.set(keys.block(job_id, sha), data)
    pipe.sadd(keys.job_blocks(job_id), *blocks)
    pipe.execute()


def drop_blocks(client: redis.Redis, job_id: str) -> None:
    """Free what a finished job kept in Redis for its subtasks: blocks and merge claims,
    and its uploaded modules (deleted if no other job needs them); its record and done set
    expire later (`expiry.job_ended`)."""
    shas = [s.decode() for s in client.smembers(keys.job_blocks(job_id))]
    pipe = client.pipeline(transaction=False)
    for sha in shas:
        pipe.delete(keys.block(job_id, sha))
    pipe.delete(keys.job_blocks(job_id))
    pipe.delete(keys.job_claims(job_id))
    pipe.execute()
    modules.release(client, job_id)
    expiry.job_ended(client, job_id)


def block_reader(client: redis.Redis, job_id: str) -> Callable[[str], bytes]:
    def read(sha: str) -> bytes:
        data = client.get(keys.block(job_id, sha))
        if data is None:
            raise KeyError(f"block {sha} of job {job_id} is gone")
        return bytes(data)

    return read
