"""What the agents tell the controller (`gateway/agent_log.py`), written to the events
stream as `node_log` events, beside the jobs' events, so a view of recent events (the
dashboard, `processdistro top`) can show them. Text arrives here already made safe and cut."""

from __future__ import annotations

import redis.asyncio as aredis

from .events import queue_event


async def record(client: aredis.Redis, node_id: str, *, level: str, event: str, message: str) -> None:
    """One `node_log` event (`dropped` events: a summary, with `event` "dropped")."""
    pipe = client.pipeline(transaction=False)
    queue_event(pipe, "node_log", node=node_id, level=level, event=event, message=message)
    await pipe.execute()
