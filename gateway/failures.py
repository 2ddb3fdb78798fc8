"""What a gateway does when a node reports a task failing or its connection drops: carry out
`shared/core/failures.py` (failures are evidence about the node, not the task).

A failure is recorded per distinct node and subtask; the job fails only when two distinct
nodes failed the same subtask, and while no other live node could try it the job's record
says so. A node whose failures stand out is benched (`keys.node_bench`: no new tasks), and
banned if it goes on. A dropped connection spends no attempt; a subtask that took down
several distinct nodes fails its job.
"""

from __future__ import annotations

import logging

from ..shared.core.dispatch import Verdict
from ..shared.core.failures import FailureOutcome, Standing, judge_drops, judge_failure, standing
from ..shared.logs import safe_text
from ..shared.messages import Fail
from ..shared.queue import TaskFields
from ..shared.settings import Settings
from ..shared.store.gateway import GatewayStore

log = logging.getLogger(__name__)


async def on_failure(
    store: GatewayStore,
    settings: Settings,
    node_id: str,
    fields: TaskFields,
    message: str,
    voter: str = "",
    task_id: str = "",
) -> FailureOutcome:
    """Log and record the failure, fail the job or say why it waits, and bench or ban the
    node if its failures stand out. The caller requeues the task unless the job fails."""
    log.warning(
        "node %s: task %s (job %s #%d) failed: %s",
        node_id,
        task_id,
        fields.job,
        fields.index,
        safe_text(message),  # the node's own text: literal, one line
    )
    view = await store.failures.record_failure(fields, node_id, message[:1000], settings.node_timeout_s, voter)
    decision = judge_failure(index=fields.index, node=node_id, failed_on=view.failed_on, live=view.live)
    match decision.outcome:
        case FailureOutcome.FAIL_JOB:
            await store.send_command(Fail(job_id=fields.job, reason=decision.text[:2000]))
            await store.failures.unbench(*view.failed_on)  # their failures were the job's
            return decision.outcome
        case FailureOutcome.WAIT:
            log.warning("job %s: %s", fields.job, decision.text)
            await store.note_job(fields.job, decision.text)
    if not view.benched:  # failures of tasks held while benched say nothing new
        match standing(total=view.total, on_job=view.on_job, peers=view.peers, benches=view.benches):
            case Standing.BENCH:
                log.warning(
                    "node %s: failures stand out (%d of %d on job %s, %d of %d overall); benched for %.0fs",
                    node_id,
                    view.on_job.failed,
                    view.on_job.samples,
                    fields.job,
                    view.total.failed,
                    view.total.samples,
                    settings.bench_s,
                )
                await store.failures.bench(node_id, settings.bench_s)
            case Standing.BAN:
                log.warning("node %s: to be banned: it went on failing tasks its peers completed", node_id)
                await store.failures.request_ban(node_id, fields)
    return decision.outcome


async def on_drop(store: GatewayStore, node_id: str, held: list[TaskFields]) -> None:
    """The node's connection dropped while holding `held`: count a drop per subtask, and
    fail the job of a subtask that brought down several distinct nodes."""
    subtasks = sorted({(f.job, f.index) for f in held})
    try:
        for (job_id, index), drops in zip(subtasks, await store.failures.record_drops(node_id, subtasks), strict=True):
            if reason := judge_drops(index=index, drops=drops):
                log.warning("job %s: %s", job_id, reason)
                await store.send_command(Fail(job_id=job_id, reason=reason))
    except Exception:  # counting must never keep the tasks from going back (the caller requeues them)
        log.exception("node %s: could not count the drops of its tasks", node_id)


async def rescreen(store: GatewayStore, node_id: str, fields: TaskFields, verdict: Verdict) -> Verdict:
    """A copy of a subtask this node reported failing is parked, for another node or for
    one that comes (only a requeued copy, `attempt` > 0, can have failed anywhere)."""
    if (
        verdict is not Verdict.DROP
        and fields.attempt
        and await store.failures.failed_here(fields.job, fields.index, node_id)
    ):
        return Verdict.PARK
    return verdict
