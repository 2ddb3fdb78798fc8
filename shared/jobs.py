"""Jobs: the state machine, its allowed moves, and the record the CLI reads.

    queued -> running -> finalizing -> done
       \\         \\            \\
        `---------`------------`--> failed | cancelled

The one move out of a terminal state is `failed -> finalizing`: `processdistro retry` of a
job whose finalize failed (disk full); its merged work was kept for it (`RETRY_FINALIZE`).

`TRANSITIONS` is the table of allowed moves; every write of a job's state goes through
`store.jobs.JobStore.transition` (or the same compare-and-set inside a store script), which
refuses a move not in it. Each job is a hash at `keys.job(id)`; `keys.JOBS` orders all jobs
by submit time and `keys.ACTIVE_JOBS` holds the ones not yet terminal (what the scheduler feeds).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINALIZING = "finalizing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def live(self) -> bool:
        """Its tasks may still run: queued or running (not finalizing: a search that found
        its answer stops its other tasks)."""
        return self in LIVE


LIVE = frozenset({JobState.QUEUED, JobState.RUNNING})
TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

# (from, to) -> who makes the move. Anything else is refused.
TRANSITIONS: dict[tuple[JobState, JobState], str] = {
    (JobState.QUEUED, JobState.RUNNING): "scheduler: first subtasks fed",
    (JobState.RUNNING, JobState.FINALIZING): "aggregator: last index merged, or the answer found early",
    (JobState.FINALIZING, JobState.DONE): "finalizer: output files written",
    (JobState.FINALIZING, JobState.FAILED): "finalizer: output files could not be written",
    (JobState.QUEUED, JobState.CANCELLED): "scheduler: cancel command",
    (JobState.RUNNING, JobState.CANCELLED): "scheduler: cancel command",
    (JobState.FINALIZING, JobState.CANCELLED): "scheduler: cancel command",
    (JobState.QUEUED, JobState.FAILED): "scheduler: fail command",
    (JobState.RUNNING, JobState.FAILED): "scheduler: fail command",
    (JobState.FAILED, JobState.FINALIZING): "operator: retry a failed finalize (`processdistro retry`)",
}

#: The job hash field the finalizer writes with a failed finalize ("finalize"): the merged
#: work was kept, and `failed -> finalizing` (a retry) is allowed for this job only.
RETRY_FINALIZE = "retry"


def allowed(frm: JobState, to: JobState) -> bool:
    return (frm, to) in TRANSITIONS


def sources(to: JobState) -> frozenset[JobState]:
    """The states a job may move to `to` from."""
    return frozenset(f for f, t in TRANSITIONS if t is to)


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
    note: str = ""  # why a live job waits (a subtask failed on a lone node: `gateway/failures.py`)

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
            note=s.get("note", ""),
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
            "note": self.note if self.state.live else "",
            "outputs": self.outputs,
            "params": self.params,
        }
