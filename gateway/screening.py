"""Is a task entry read for a node to be sent to it? `dispatch.screen` and the replica rule
carried out for one session (`gateway/session.py`): dropped, parked or decided otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..shared.core import dispatch
from ..shared.core.dispatch import Replica, Verdict
from ..shared.queue import TaskFields
from . import failures

if TYPE_CHECKING:
    from .session import NodeSession


async def usable(s: NodeSession, task_id: str, fields: TaskFields) -> bool:
    """Carry out `dispatch.screen` and the replica rule: False if the task is not to be
    sent (dropped, parked, or decided)."""
    over = await s.store.job_is_over(fields.job)
    index_done = (
        not over and dispatch.needs_index_done(fields, s.node_id) and await s.store.index_done(fields.job, fields.index)
    )
    verdict = dispatch.screen(fields, node_id=s.node_id, job_over=over, index_done=index_done)
    match await failures.rescreen(s.store, s.node_id, fields, verdict):
        case Verdict.DROP:
            await s.store.drop(task_id)
            return False
        case Verdict.PARK:  # taken from the parked set by another node (`NodeSession._unpark`)
            await s.store.park(task_id)
            return False
        case Verdict.REPLICA:
            return await may_replicate(s, task_id, fields)
        case Verdict.SEND:
            return True


async def may_replicate(s: NodeSession, task_id: str, fields: TaskFields) -> bool:
    """The replica rule (`dispatch.replica_rule`), reading only what each step needs."""
    held_here = dispatch.holds(s.held, fields.job, fields.index)
    if not held_here and dispatch.may_take_replica(
        holds=False, returned_here=await s.store.has_returned(fields.job, fields.index, s.voter)
    ):
        return True
    returned, votes, live = await s.store.replica_view(fields.job, fields.index, s.settings.node_timeout_s)
    if dispatch.replica_fallback(node_id=s.voter, returned=returned, votes=votes, live=live) is Replica.PARK:
        await s.store.park(task_id)
    else:  # Replica.DECIDE: the aggregator accepts the one result
        await s.store.hand_over(task_id, fields, node_id=s.node_id, output=b"", elapsed_ms=0, returned=False, decide=1)
    return False
