"""How long Redis keeps what belongs to a job or a node once it is gone (issue 9.10).

Every per-job and per-node key kind is listed in `keys.JOB_KEY_ENDS` / `keys.NODE_KEY_ENDS`
with how it goes (tests/hostile/test_hostile_edges.py checks the list is complete and true):

- a job's record, done set and result counters get a TTL of `JOB_KEEP_S` when the job ends (`job_ended`,
  called by `jobs.drop_blocks` on every way a job ends), so `processdistro jobs` still shows
  it for a while; its id leaves `keys.JOBS` once the record has expired (`prune_jobs`);
- its blocks, block list, merge claims and module list are deleted then (`drop_blocks`);
- its per-subtask replication keys carry a TTL from the moment they are written;
- a node's record and its merged list carry a TTL of `NODE_KEEP_S` from its last sign of
  life (report, heartbeat, departure, merged result), so nodes that are gone (every
  report with a new device id made one) do not pile up.
"""

from __future__ import annotations

from typing import Any

from .. import keys

JOB_KEEP_S = 7 * 86_400  # a finished job's record and done set
NODE_KEEP_S = 7 * 86_400  # a node's record and merged list after its last sign of life
PRUNE_LOOK = 100  # oldest ids of `keys.JOBS` checked per ended job
RETURNED_TTL_S = 86_400  # how long a replicated subtask remembers who returned it (gateways write it)


def job_ended(client: Any, job_id: str) -> None:
    """Give the job's kept keys their TTL and forget ids of jobs whose record expired."""
    pipe = client.pipeline(transaction=False)
    pipe.expire(keys.job(job_id), JOB_KEEP_S)
    pipe.expire(keys.job_done(job_id), JOB_KEEP_S)
    pipe.expire(keys.job_stats(job_id), JOB_KEEP_S)
    pipe.execute()
    prune_jobs(client)


def prune_jobs(client: Any) -> list[str]:
    """Drop from `keys.JOBS` the oldest ids whose record is gone (expired); returns them."""
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in client.zrange(keys.JOBS, 0, PRUNE_LOOK - 1)]
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.exists(keys.job(job_id))
    gone = [j for j, exists in zip(ids, pipe.execute(), strict=True) if not exists]
    if gone:
        client.zrem(keys.JOBS, *gone)
    return gone


def node_seen(pipe: Any, node_id: str) -> None:
    """Queue on `pipe` (sync or async) the TTL of a node's keys, from now."""
    pipe.expire(keys.node(node_id), NODE_KEEP_S)
    pipe.expire(keys.node_merged(node_id), NODE_KEEP_S)
