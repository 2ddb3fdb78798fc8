"""What the agents tell the controller (`gateway/agent_log.py`), written to the events
stream as `node_log` events, beside the jobs' events, so a view of recent events (the
dashboard, `processdistro top`) can show them. Text arrives here already made safe and cut."""

from __future__ import annotations

import json
import time

import redis.asyncio as aredis

from .. import keys


async def record(client: aredis.Redis, node_id: str, *, level: str, event: str, message: str) -> None:
    """One `node_log` event (`dropped` events: a summary, with `event` "dropped")."""
    payload = {
        "type": "node_log",
        "ts": time.time(),
        "node": node_id,
        "level": level,
        "event": event,
        "message": message,
    }
    await client.xadd(keys.EVENTS, {"event": json.dumps(payload)}, maxlen=keys.EVENTS_MAXLEN, approximate=True)
