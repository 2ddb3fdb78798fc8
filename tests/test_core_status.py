"""The operator's view, decided (shared/core/status.py): node states, job progress, rates and
ETAs, the short texts; and `store.status.StatusReader` reading a frame out of a real Redis."""

from __future__ import annotations

import json
import time

import pytest
from processdistro.shared import keys
from processdistro.shared.core import status
from processdistro.shared.store.events import queue_event
from processdistro.shared.store.status import StatusReader

NOW = 1_000_000.0

NODE_STATES = [
    ("a report, no heartbeat yet", {}, True, "joined"),
    ("heartbeat with tasks", {"running": "2"}, True, "busy"),
    ("heartbeat without tasks", {"running": "0"}, True, "idle"),
    ("benched until later", {"running": "0", "benched_until": str(NOW + 5)}, True, "benched"),
    ("a bench that is over", {"running": "0", "benched_until": str(NOW - 5)}, True, "idle"),
    ("banned, even if live", {"running": "1", "banned": "1"}, True, "banned"),
    ("gone", {"running": "1"}, False, "left"),
    ("banned and gone", {"banned": "1"}, False, "banned"),
]


@pytest.mark.parametrize(("fields", "live", "want"), [c[1:] for c in NODE_STATES], ids=[c[0] for c in NODE_STATES])
def test_node_state(fields: dict[str, str], live: bool, want: str) -> None:
    assert status.node_state(fields, live=live, now=NOW) == want


def test_rates_are_the_slope_over_the_window_and_restart_on_a_lower_count() -> None:
    r = status.Rates(window_s=60)
    assert r.rate("x") == 0.0
    r.observe("x", NOW, 10)
    assert r.rate("x") == 0.0  # one sample: no slope yet
    r.observe("x", NOW + 10, 30)
    assert r.rate("x") == pytest.approx(2.0)
    for t in range(11, 200):
        r.observe("x", NOW + t, 30 + (t - 10) * 5)  # 5/s from now on
    assert r.rate("x") == pytest.approx(5.0)  # the old 2/s fell out of the window
    r.observe("x", NOW + 201, 3)  # a restarted counter
    assert r.rate("x") == 0.0
    r.forget(["y"])
    assert r.rate("x") == 0.0


JOBS = [
    ("half done, 1/s: ETA 50 s", {"state": "running", "done": "50", "total": "100"}, 1.0, 50.0, 50.0),
    ("no progress: no ETA", {"state": "running", "done": "0", "total": "100"}, 0.0, 0.0, None),
    ("done: no ETA, 100 %", {"state": "done", "done": "100", "total": "100"}, 0.0, 100.0, None),
    ("queued with no subtasks", {"state": "queued", "done": "0", "total": "0"}, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize(("fields", "per_s", "percent", "eta"), [c[1:] for c in JOBS], ids=[c[0] for c in JOBS])
def test_job_row(fields: dict[str, str], per_s: float, percent: float, eta: float | None) -> None:
    rates = status.Rates()
    h = {"id": "j", "kind": "mandelbrot", **fields}
    done = int(fields["done"])
    status.job_row({**h, "done": str(max(0, done - int(per_s * 10)))}, tally={}, stats={}, now=NOW - 10, rates=rates)
    row = status.job_row(h, tally={"a:failed": "2", "b:failed": "1", "a:ok": "9"}, stats={}, now=NOW, rates=rates)
    assert (row.percent, row.eta_s, row.failures) == (percent, eta, 3)
    assert row.image


@pytest.mark.parametrize(
    ("score", "text"),
    [(0, "-"), (950, "950 it/s"), (2_500_000, "2.5 Mit/s"), (389_022_660, "389 Mit/s"), (1.2e9, "1.2 Git/s")],
)
def test_format_score(score: float, text: str) -> None:
    assert status.format_score(score) == text


@pytest.mark.parametrize(("s", "text"), [(None, "-"), (0, "0s"), (59.6, "1m00s"), (125, "2m05s"), (7300, "2h01m")])
def test_format_eta(s: float | None, text: str) -> None:
    assert status.format_eta(s) == text


def test_events_read_as_lines() -> None:
    assert status.event_row({"type": "job", "ts": 1, "job_id": "j1", "state": "failed", "error": "boom"}).text == (
        "job j1 failed: boom"
    )
    assert status.event_row({"type": "node", "node_id": "n1", "what": "banned", "detail": "3 wrong"}).text == (
        "node n1 banned (3 wrong)"
    )
    log = {"type": "node_log", "node": "n2", "level": "warning", "event": "reconnect", "message": "socket closed"}
    assert status.event_row(log).text == "node n2 warning: reconnect: socket closed"


def test_reader_builds_a_frame_from_redis(r: object) -> None:
    """A real Redis with a live node, a node that left, a job and events: one frame."""
    client = r  # the session's Redis, flushed
    now = time.time()
    client.hset(keys.node("n1"), mapping={"id": "n1", "kind": "native", "slots": 2, "running": 1, "returned": 5})
    client.hset(keys.node("n2"), mapping={"id": "n2", "kind": "browser", "browser": "Chrome", "banned": 1})
    client.zadd(keys.NODES, {"n1~c1": now})
    client.hset(
        keys.job("j1"),
        mapping={
            "id": "j1",
            "kind": "mandelbrot",
            "state": "running",
            "done": 3,
            "total": 8,
            "outputs": json.dumps({"png": "/x.png"}),
        },
    )
    client.zadd(keys.JOBS, {"j1": now})
    client.hset(keys.job_stats("j1"), mapping={"verified": 3, "rejected": 1})
    queue_event(client, "node", node_id="n1", what="joined", detail="native")
    reader = StatusReader(node_timeout_s=4.0)
    reader._seen["n2"] = now - 10  # it was live a moment ago
    frame = reader.read(client, now)
    states = {n.id: n.state for n in frame.nodes}
    assert states == {"n1": "busy", "n2": "banned"}
    (job,) = frame.jobs
    assert (job.done, job.total, job.verified, job.rejected, job.outputs) == (3, 8, 3, 1, ("png",))
    assert [e.text for e in frame.events] == ["node n1 joined (native)"]
    assert frame.totals["nodes_live"] == 1.0
    json.dumps(frame.to_json())  # what the dashboard feed sends


def test_reader_on_an_empty_redis(r: object) -> None:
    """Before any service made the streams: an empty frame, not an error."""
    frame = StatusReader(node_timeout_s=4.0).read(r)
    assert (frame.nodes, frame.jobs, frame.events) == ([], [], [])
