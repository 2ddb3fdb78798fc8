"""The operator's view, decided: what the dashboard and `processdistro top` show, from plain
values read out of Redis (`store.status` reads them). No I/O; `now` is passed in.

- `node_row` / `job_row` turn a node's or a job's hash (text fields) into a row: a node's
  state (joined, busy, idle, benched, banned, left), a job's progress, rate and ETA.
- `Rates` keeps counter samples over a sliding window and answers "how fast lately": the
  per-node tasks/min, a job's subtasks/s (and so its ETA), the cluster's throughput series.
  It is the one stateful piece, held by whoever samples (a gateway's dashboard feed, `top`).
- `format_score`, `format_eta`, `format_rate`: the short texts both views print.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: How far back "lately" reaches: a node's rate, a job's rate (and so its ETA).
RATE_WINDOW_S = 60.0
#: How much throughput history the chart keeps (one point per sample).
HISTORY_S = 600.0
#: A node that left stays listed (state `left` or `banned`) this long.
KEEP_LEFT_S = 600.0


def _num(value: str | None, default: float = 0.0) -> float:
    try:
        x = float(value) if value not in (None, "") else default
    except ValueError:
        return default
    return x if math.isfinite(x) else default


@dataclass(frozen=True)
class NodeRow:
    id: str
    kind: str  #: browser | native
    agent: str  #: browser and OS, or the native worker's description
    gpu: str
    address: str
    slots: int
    running: int  #: tasks it holds now (its last heartbeat)
    done: int  #: results it returned
    rate_per_min: float  #: results per minute over the last `RATE_WINDOW_S`
    score: float  #: benchmark (Mandelbrot iterations per second per core)
    state: str  #: joined | busy | idle | benched | banned | left
    joined: float


@dataclass(frozen=True)
class JobRow:
    id: str
    kind: str
    state: str
    done: int
    total: int
    percent: float
    rate: float  #: subtasks per second over the last `RATE_WINDOW_S`
    eta_s: float | None  #: None when unknown (no progress yet) or over
    failures: int  #: failed runs reported by nodes
    verified: int  #: results that passed the kind's checks and were merged
    rejected: int  #: results that failed them
    replicate: float
    created: float
    finished: float | None
    note: str
    error: str
    outputs: tuple[str, ...]
    image: bool  #: the kind renders an image that fills in as it runs (a live preview)


@dataclass(frozen=True)
class Event:
    ts: float
    type: str
    text: str


@dataclass
class ClusterStatus:
    """One frame of the operator's view."""

    now: float
    nodes: list[NodeRow]
    jobs: list[JobRow]
    events: list[Event]
    totals: dict[str, float]
    throughput: list[tuple[float, float]] = field(default_factory=list)  #: (time, results/s)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Rates:
    """Counter samples per key over a sliding window; `rate` is the slope between the
    oldest kept sample and the newest (per second). A counter that goes down (a restart,
    a record that expired and came back) starts the key over."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, key: str, now: float, value: float) -> None:
        q = self._samples.setdefault(key, deque())
        if q and value < q[-1][1]:
            q.clear()
        q.append((now, value))
        while len(q) > 2 and q[1][0] <= now - self.window_s:
            q.popleft()

    def rate(self, key: str) -> float:
        q = self._samples.get(key)
        if not q or len(q) < 2:
            return 0.0
        (t0, v0), (t1, v1) = q[0], q[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0

    def forget(self, keep: Iterable[str]) -> None:
        """Drop every key not in `keep` (nodes and jobs no longer shown)."""
        kept = set(keep)
        for key in [k for k in self._samples if k not in kept]:
            del self._samples[key]


def node_state(h: Mapping[str, str], *, live: bool, now: float) -> str:
    if h.get("banned") in ("1", "true"):
        return "banned"
    if not live:
        return "left"
    if _num(h.get("benched_until")) > now:
        return "benched"
    if "running" not in h:
        return "joined"
    return "busy" if _num(h.get("running")) > 0 else "idle"


def node_row(h: Mapping[str, str], *, live: bool, now: float, rates: Rates) -> NodeRow:
    node_id = h.get("id", "")
    done = int(_num(h.get("returned")))
    rates.observe("node:" + node_id, now, done)
    agent = " / ".join(p for p in (h.get("browser", ""), h.get("os", "")) if p)
    return NodeRow(
        id=node_id,
        kind=h.get("kind", ""),
        agent=agent,
        gpu=h.get("gpu", ""),
        address=h.get("address", ""),
        slots=int(_num(h.get("slots"))),
        running=int(_num(h.get("running"))) if live else 0,
        done=done,
        rate_per_min=round(rates.rate("node:" + node_id) * 60.0, 1),
        score=_num(h.get("score")),
        state=node_state(h, live=live, now=now),
        joined=_num(h.get("joined")),
    )


#: Kinds whose output fills in as an image while they run.
IMAGE_KINDS = frozenset({"mandelbrot"})


def job_row(
    h: Mapping[str, str],
    *,
    tally: Mapping[str, str],
    stats: Mapping[str, str],
    now: float,
    rates: Rates,
) -> JobRow:
    """A job's row. `tally` is its per-node tally hash (`<node>:ok`, `<node>:failed`),
    `stats` its counters hash (`verified`, `rejected`; missing counts are 0)."""
    job_id = h.get("id", "")
    state = h.get("state", "")
    done, total = int(_num(h.get("done"))), int(_num(h.get("total")))
    live = state in ("queued", "running", "finalizing")
    if live:
        rates.observe("job:" + job_id, now, done)
    rate = rates.rate("job:" + job_id) if live else 0.0
    try:
        outputs = json.loads(h.get("outputs") or "{}")
    except ValueError:
        outputs = {}
    finished = _num(h.get("finished")) or None
    return JobRow(
        id=job_id,
        kind=h.get("kind", ""),
        state=state,
        done=done,
        total=total,
        percent=round(100.0 * done / total, 1) if total else (100.0 if state == "done" else 0.0),
        rate=round(rate, 2),
        eta_s=eta(total - done, rate) if state in ("queued", "running") else None,
        failures=sum(int(_num(v)) for k, v in tally.items() if k.endswith(":failed")),
        verified=int(_num(stats.get("verified"))) or done,
        rejected=int(_num(stats.get("rejected"))),
        replicate=_num(h.get("replicate")),
        created=_num(h.get("created")),
        finished=finished,
        note=h.get("note", "") if live else "",
        error=h.get("error", ""),
        outputs=tuple(sorted(outputs)) if isinstance(outputs, dict) else (),
        image=h.get("kind", "") in IMAGE_KINDS,
    )


def eta(remaining: int, rate: float) -> float | None:
    """Seconds to go at `rate` subtasks/s; None if nothing is moving."""
    if remaining <= 0:
        return 0.0
    return round(remaining / rate, 1) if rate > 0 else None


def event_row(payload: Mapping[str, Any]) -> Event:
    """One events-stream entry (`store.jobs.event`) as a line people read."""
    kind = str(payload.get("type", ""))
    ts = _num(str(payload.get("ts", "")))
    fields = {k: v for k, v in payload.items() if k not in ("type", "ts")}
    if kind == "job":
        text = f"job {fields.get('job_id', '?')} {fields.get('state', '')}"
        if fields.get("error"):
            text += f": {fields['error']}"
    elif kind == "node":
        text = f"node {fields.get('node_id', '?')} {fields.get('what', '')}"
        if fields.get("detail"):
            text += f" ({fields['detail']})"
    elif kind == "node_log":  # what an agent told the controller (`gateway/agent_log.py`)
        text = f"node {fields.get('node', '?')} {fields.get('level', '')}: {fields.get('event', '')}"
        if fields.get("message"):
            text += f": {fields['message']}"
    else:
        text = " ".join(f"{k}={v}" for k, v in fields.items())
    return Event(ts=ts, type=kind, text=text[:300])


def format_score(score: float) -> str:
    """A benchmark score (iterations/s) as people read it: 389 M it/s."""
    if score <= 0:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if score >= scale:
            return f"{score / scale:.1f} {unit}it/s" if score < 10 * scale else f"{score / scale:.0f} {unit}it/s"
    return f"{score:.0f} it/s"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(per_s: float) -> str:
    if per_s <= 0:
        return "-"
    return f"{per_s:.1f}/s" if per_s < 100 else f"{per_s:.0f}/s"
