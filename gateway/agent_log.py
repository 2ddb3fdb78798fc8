"""The agents' notable events (`AgentLog` frames: errors, reconnects, modules that failed) in
the controller's log, so what goes wrong on a phone across the room is seen at the terminal.

A node is a stranger: its text is made literal and cut (`logs.safe_text`), and its frames
pass a token bucket per node (`core.ratelimit`): a burst of `BURST`, then one every
`1 / RATE` seconds. The first event over that logs "dropping them"; the rest are counted,
and the next event that passes first logs "N events from node X dropped". The buckets are
per gateway and keyed by node id, so a node that reconnects (to this gateway) does not get a
fresh burst. Every event that passes is also written to the events stream as `node_log`
(`store/node_log.py`).

The level a node claims is capped at WARNING: a node's error is the node's trouble, not the
controller's, and an operator's `ERROR` lines stay the controller's own.
"""

from __future__ import annotations

import logging
import time

from ..shared.core.ratelimit import Admit, Bucket, idle, take
from ..shared.logs import safe_text
from ..shared.protocol import AgentLog
from ..shared.store import node_log
from ..shared.store.gateway import GatewayStore

log = logging.getLogger(__name__)

RATE = 0.2  # events per second a node may send once its burst is spent (12 a minute)
BURST = 10
MESSAGE_LIMIT = 500  # characters of a message in the log line and the event
KEPT_BUCKETS = 10_000  # nodes remembered; past it, buckets that changed nothing are forgotten
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.WARNING}


class AgentLogs:
    """The per-node buckets of one gateway and what it does with an `AgentLog` frame."""

    def __init__(self, *, rate: float = RATE, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.buckets: dict[str, Bucket] = {}

    def admit(self, node_id: str, now: float) -> tuple[Admit, int]:
        """Take one token for `node_id`: (PASS, drops to report before this event) or (DROP,
        drops so far, this one included)."""
        decision = take(self.buckets.get(node_id), now=now, rate=self.rate, burst=self.burst)
        self.buckets[node_id] = decision.bucket
        if len(self.buckets) > KEPT_BUCKETS:
            self.buckets = {
                k: b for k, b in self.buckets.items() if not idle(b, now=now, rate=self.rate, burst=self.burst)
            }
        if decision.admit is Admit.DROP:
            return Admit.DROP, decision.bucket.dropped
        return Admit.PASS, decision.dropped

    async def receive(self, store: GatewayStore, node_id: str, m: AgentLog, now: float | None = None) -> None:
        """Log `m` from `node_id` (and record it as a `node_log` event), or count it as dropped."""
        admit, dropped = self.admit(node_id, time.monotonic() if now is None else now)
        if admit is Admit.DROP:
            if dropped == 1:  # said at once, in case the node says nothing more
                log.warning("node %s: agent events over %d a minute: dropping them", node_id, int(self.rate * 60))
            return
        if dropped:
            log.warning(
                "node %s: %d events from node %s dropped (over %s a minute)",
                node_id,
                dropped,
                node_id,
                int(self.rate * 60),
            )
            await node_log.record(
                store.r,
                node_id,
                level="warning",
                event="dropped",
                message=f"{dropped} events from node {node_id} dropped",
            )
        message = safe_text(m.message, MESSAGE_LIMIT)
        log.log(LEVELS[m.level], "node %s: agent %s: %s", node_id, m.event, message)
        await node_log.record(store.r, node_id, level=m.level, event=m.event, message=message)


#: the gateway process's buckets (sessions come and go; a node's bucket outlives its socket)
AGENT_LOGS = AgentLogs()
