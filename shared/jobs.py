"""Jobs in Redis: the state machine and the records the CLI reads.

    queued -> running -> finalizing -> done
       \\         \\            \\
        `---------`------------`--> failed | cancelled

Each job is a hash at `keys.job(id)`; `keys.JOBS` orders all jobs by submit time and
`keys.ACTIVE_JOBS` holds the ones not yet terminal (what the scheduler feeds).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import keys


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


@dataclass
class JobRecord:
    id: str
    kind: str
    state: JobState
    params: dict[str, Any]
    total: int
    done: int
    next_index: int
    created: float
    priority: int = 0
    replicate: float = 0.0  # share of subtasks computed on two distinct nodes
    error: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    finished: float | None = None
    finalized: int = 0
    module: str = ""  # sha256 of the WASM module its subtasks run

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> JobRecord:
        s = {k.decode(): v.decode() for k, v in h.items()}
        return cls(
            id=s["id"],
            kind=s["kind"],
            state=JobState(s["state"]),
            params=json.loads(s.get("params", "{}")),
            total=int(s.get("total", 0)),
            done=int(s.get("done", 0)),
            next_index=int(s.get("next_index", 0)),
            created=float(s.get("created", 0)),
            priority=int(s.get("priority", 0)),
            replicate=float(s.get("replicate", 0) or 0),
            error=s.get("error", ""),
            outputs=json.loads(s.get("outputs", "{}")),
            finished=float(s["finished"]) if s.get("finished") else None,
            finalized=int(s.get("finalized", 0)),
            module=s.get("module", ""),
        )

    def to_public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state.value,
            "done": self.done,
            "total": self.total,
            "priority": self.priority,
            "replicate": self.replicate,
            "created": self.created,
            "finished": self.finished,
            "error": self.error,
            "outputs": self.outputs,
            "params": self.params,
        }


def load_job(client: Any, job_id: str) -> JobRecord | None:
    h = client.hgetall(keys.job(job_id))
    return JobRecord.from_hash(h) if h else None


def event(client: Any, kind: str, **fields: Any) -> None:
    payload = {"type": kind, "ts": time.time(), **fields}
    client.xadd(keys.EVENTS, {"event": json.dumps(payload)}, maxlen=keys.EVENTS_MAXLEN, approximate=True)


def store_blocks(client: Any, job_id: str, blocks: dict[str, bytes]) -> None:
    """Store a job's shared input blocks (by sha256) before its tasks refer to them."""
    if not blocks:
        return
    pipe = client.pipeline(transaction=False)
    for sha, data in blocks.items():
        pipe.set(keys.block(job_id, sha), data)
    pipe.sadd(keys.job_blocks(job_id), *blocks)
    pipe.execute()


def drop_blocks(client: Any, job_id: str) -> None:
    """Free what a finished job kept in Redis for its subtasks: blocks and merge claims."""
    shas = [s.decode() for s in client.smembers(keys.job_blocks(job_id))]
    pipe = client.pipeline(transaction=False)
    for sha in shas:
        pipe.delete(keys.block(job_id, sha))
    pipe.delete(keys.job_blocks(job_id))
    pipe.delete(keys.job_claims(job_id))
    pipe.execute()


def block_reader(client: Any, job_id: str) -> Callable[[str], bytes]:
    def read(sha: str) -> bytes:
        data = client.get(keys.block(job_id, sha))
        if data is None:
            raise KeyError(f"block {sha} of job {job_id} is gone")
        return bytes(data)

    return read
