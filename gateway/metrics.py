"""`/metrics` (Prometheus text) and `/metrics.json` (the seed's field names).

Two kinds of series, told apart by one label (docs/monitoring.md):
- **cluster figures** (nodes connected, tasks queued and running, the `STATS` counters, jobs
  active) are read from Redis at scrape time, so every gateway reports the same numbers.
  They carry `scope="cluster"`, and the one aggregation that means anything over several
  gateways is `max` (`max(processdistro_nodes_connected{scope="cluster"})`): a `sum` would
  count them once per gateway.
- **this process's own** (the latency histogram, refused frames and connections) carry no
  `scope` label and are summed across gateways, as Prometheus does with any per-instance
  figure.

Scores and latencies come from nodes. Reports are validated now, but Redis may hold a
non-finite figure written before (issue 9.2), and one `inf` made `/metrics.json` a 500 (JSON
has no Infinity) until 200 newer results pushed it out: figures are read through
`capacity.finite`, so every value served is a finite number.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..shared.capacity import MAX_TASK_MS, finite
from ..shared.protocol import MAX_SCORE
from ..shared.store.gateway import GatewayStore

COUNTERS = {  # STATS field -> (metric name, help)
    "tasks_completed": ("processdistro_tasks_completed", "Subtask results merged"),
    "tasks_duplicate": ("processdistro_tasks_duplicate", "Duplicate results discarded"),
    "tasks_rejected": ("processdistro_tasks_rejected", "Results that failed verification"),
    "tasks_requeued": ("processdistro_tasks_requeued", "Subtasks requeued from gone or failing nodes"),
    "tasks_stolen": (
        "processdistro_tasks_stolen",
        "Unstarted subtasks moved from slower to idle nodes",
    ),
    "tasks_backup": ("processdistro_tasks_backup", "Backup copies of stragglers' subtasks"),
    "copies_cancelled": ("processdistro_copies_cancelled", "Losing copies stopped when the first result came"),
    "parts_bundled": ("processdistro_parts_bundled", "Subtasks sent as further parts of a longer task"),
    "replicas_confirmed": ("processdistro_replicas_confirmed", "Replicated subtasks two nodes agreed on"),
    "replicas_disputed": ("processdistro_replicas_disputed", "Replicated subtasks whose results differed"),
    "replicas_unconfirmed": (
        "processdistro_replicas_unconfirmed",
        "Replicated subtasks accepted on one checked result (no other node to ask)",
    ),
}


def mean(values: list[float], cap: float) -> float:
    """The mean of the finite figures in [0, `cap`] (huge ones capped), to one decimal; 0.0
    when there is none."""
    kept = [v for x in values if (v := finite(x, cap)) is not None]
    return round(sum(kept) / len(kept), 1) if kept else 0.0


GAUGES = {  # snapshot field -> (metric name, help)
    "nodes_connected": ("processdistro_nodes_connected", "Nodes with a live connection"),
    "avg_score": (
        "processdistro_node_score_avg",
        "Mean benchmark score of live nodes (Mandelbrot iterations per second per core)",
    ),
    "tasks_queued": ("processdistro_tasks_queued", "Subtasks not yet sent to a node"),
    "tasks_running": ("processdistro_tasks_running", "Subtasks held by nodes"),
    "jobs_active": ("processdistro_jobs_active", "Jobs not yet done, failed or cancelled"),
}

SCOPE = "scope"  # the label of cluster figures: the same on every gateway, aggregate with max
CLUSTER = "cluster"
_CLUSTER_NOTE = " (cluster-wide, the same on every gateway: aggregate with max, never sum)"


class _ClusterCollector(Collector):
    """Yields the cluster-wide figures of the last snapshot (counters as counters), each
    labelled `scope="cluster"`."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        s = self.last
        for field, (name, doc) in GAUGES.items():
            gauge = GaugeMetricFamily(name, doc + _CLUSTER_NOTE, labels=[SCOPE])
            gauge.add_metric([CLUSTER], float(s.get(field, 0)))
            yield gauge
        for field, (name, doc) in COUNTERS.items():
            counter = CounterMetricFamily(name, doc + _CLUSTER_NOTE, labels=[SCOPE])
            counter.add_metric([CLUSTER], float(s.get(field, 0)))
            yield counter


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cluster = _ClusterCollector()
        r.register(self.cluster)
        self.latency = Histogram(
            "processdistro_task_latency_seconds",
            "Time from sending a subtask to a node to receiving its result (this gateway)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.messages_rejected = Counter(
            "processdistro_ws_messages_rejected", "Inbound WebSocket frames refused", ["reason"], registry=r
        )
        self.connections_refused = Counter(
            "processdistro_ws_connections_refused", "WebSocket connections refused", ["reason"], registry=r
        )

    async def snapshot(self, store: GatewayStore, node_timeout_s: float) -> dict[str, Any]:
        """The seed's figures (`/metrics.json`), read from Redis now."""
        f = await store.cluster_figures(node_timeout_s)
        return {
            "nodes_connected": len(f.live_nodes),
            "avg_score": mean(f.scores, MAX_SCORE),
            "tasks_queued": max(0, f.stream_length - f.pending),
            "tasks_running": f.pending,
            "avg_latency_ms": mean(f.latencies_ms, MAX_TASK_MS),
            **{field: f.stats.get(field, 0) for field in COUNTERS},
            "jobs_active": f.active_jobs,
        }

    async def render(self, store: GatewayStore, node_timeout_s: float) -> bytes:
        """`/metrics` in Prometheus text format."""
        self.cluster.last = await self.snapshot(store, node_timeout_s)
        return generate_latest(self.registry)
