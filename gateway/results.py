"""A node's results, one `result` frame or several in a `results` frame: each checked on its
own (held by this connection, its output base64), then all handed to the results stream in
one script call with the node's figures in the same round trip (`store/handover.py`).

A result for a task this connection gave back (stolen, or another copy won) is ignored; one
for a task it does not hold, or named twice in a frame, is refused with `unknown_task`; the
other results of the frame are kept either way.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..shared.capacity import EWMA_PREFIX
from ..shared.core import dispatch
from ..shared.core.dispatch import Held
from ..shared.messages import DropCopies
from ..shared.protocol import ErrorCode, TaskResult, b64_bytes
from ..shared.store.handover import Handover

if TYPE_CHECKING:
    from .session import NodeSession


async def take_results(session: NodeSession, results: Sequence[TaskResult]) -> None:
    """Hand over the node's `results` (in order) and keep its speed figures."""
    s = session
    taken: dict[str, tuple[TaskResult, Held, bytes]] = {}
    for m in results:
        held = s.held.get(m.task_id)
        if held is None or m.task_id in taken:
            if m.task_id not in s.given_back:  # else it had started after all: another node has it now
                await s.refuse(ErrorCode.UNKNOWN_TASK, f"task {m.task_id} is not held by this connection")
            continue
        try:
            output = b64_bytes(m.output_b64)  # decoded once, by the model's check
        except (binascii.Error, ValueError):  # the model validated it; belt and braces
            await s.refuse(ErrorCode.INVALID, f"output_b64 of task {m.task_id} is not base64")
            continue
        taken[m.task_id] = (m, held, output)
    if not taken:
        return
    now = time.monotonic()
    items: list[Handover] = []
    averages: dict[str, float] = {}
    for m, held, output in taken.values():
        kind = held.fields.kind
        field = EWMA_PREFIX.decode() + kind
        sample = dispatch.sample_ms(m.elapsed_ms, now - held.sent)
        s.ewma[field] = averages[field] = dispatch.ewma(s.ewma.get(field), sample)
        s.peak[kind] = dispatch.peak(s.peak.get(kind), sample)
        items.append(Handover(m.task_id, held.fields, output, m.elapsed_ms, sample))
    # a replicated copy stays in `held` until the handover has also recorded that this
    # node returned it, so the node never takes the other copy in between
    backed_up = await s.handovers.hand_over(s.node_id, s.voter, items, averages)
    for (m, held, _output), backup in zip(taken.values(), backed_up, strict=True):
        s.held.pop(m.task_id, None)
        s.done += 1
        s.metrics.latency.observe(now - held.sent)
        if dispatch.drops_copies(held.fields, backed_up=backup):
            await s.store.publish(DropCopies(job_id=held.fields.job, index=held.fields.index, winner=m.task_id))
