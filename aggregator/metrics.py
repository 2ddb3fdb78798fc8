"""An aggregator's own `/metrics` (Prometheus text), served on `PD_METRICS_PORT` when set.

The aggregator has no other HTTP port; under compose and swarm Prometheus finds every
replica by DNS (services/prometheus/prometheus.yml) and scrapes this endpoint. Cluster-wide
figures (queued, running, completed) stay with the gateway, which reads them from Redis and
labels them `scope="cluster"`; these are per replica (no `scope` label, summed over replicas:
docs/monitoring.md): what this consumer did with the results it handled."""

from __future__ import annotations

import logging

from prometheus_client import Counter, start_http_server

log = logging.getLogger(__name__)

RESULTS_HANDLED = Counter(
    "processdistro_aggregator_results",
    "Result entries this aggregator handled, by what became of them",
    ["outcome"],
)


def serve_metrics(port: int) -> None:
    """Serve the default registry's `/metrics` on all interfaces (a daemon thread)."""
    start_http_server(port)
    log.info("aggregator metrics on :%d/metrics", port)


def count(outcome: str, n: int = 1) -> None:
    RESULTS_HANDLED.labels(outcome).inc(n)
