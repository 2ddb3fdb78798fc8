"""The events stream (`keys.EVENTS`): a capped log of what happened, for people (the
dashboard's and `processdistro top`'s recent events, `core.status.event_row`); no service
reads it to decide anything.

`queue_event` adds an entry on a pipeline (sync or async), so an event is written in the same
round trip, and the same transaction where there is one, as the change it tells of.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .. import keys


def queue_event(pipe: Any, kind: str, **fields: Any) -> None:
    """Queue one event on `pipe`: `kind` is "job" (job_id, state, ...) or "node" (node_id,
    what: joined | left | banned | benched | failed, detail)."""
    payload = {"type": kind, "ts": time.time(), **fields}
    pipe.xadd(keys.EVENTS, {"event": json.dumps(payload)}, maxlen=keys.EVENTS_MAXLEN, approximate=True)
