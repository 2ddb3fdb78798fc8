"""Replication decisions: which subtasks run on two distinct nodes.

(The aggregator's votes, quorum and decide rules join this module.)
"""

from __future__ import annotations

import hashlib

REPLICA_FREE_TAIL = 0.1  # the share of a job's last subtasks never replicated (unless --replicate 1)


def sampled(job_id: str, index: int, total: int, share: float) -> bool:
    """Is subtask `index` one of the job's replicated share? Stable across restarts. Below
    a share of 1 the last tenth of a job is left out: a confirmation that only a slow node
    can give would hold up the job's end."""
    if share <= 0 or (share < 1 and index >= total * (1 - REPLICA_FREE_TAIL)):
        return False
    digest = hashlib.sha256(f"{job_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64
