"""Prometheus metrics: what a bridge is doing, for dashboards and alerts.

Served at `http://BRIDGE_METRICS_HOST:BRIDGE_METRICS_PORT/metrics` when the
port is set. Everything is counted once per request (or read on scrape),
never per chunk.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bridge.core.plugin import Plugin

if TYPE_CHECKING:
    from bridge.core.errors import ProtocolError
    from bridge.core.job import Job
    from bridge.core.plugin import Host
    from bridge.core.settings import Settings

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class MetricsPlugin(Plugin):
    """Counts requests, errors, tokens and latencies; serves them over HTTP."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "llm_bridge_requests", "Requests answered, by outcome (done or an error code)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "llm_bridge_time_to_first_token_seconds",
            "From taking a request in hand to the first piece of the reply", buckets=_LATENCY,
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "llm_bridge_request_duration_seconds", "From taking a request in hand to its terminal",
            buckets=_DURATION, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "llm_bridge_tokens", "Tokens the API reported, by kind", ["kind"], registry=r
        )
        self.chunks = Counter(
            "llm_bridge_chunks", "Reply messages published (chunks and terminals)", registry=r
        )
        self.active = Gauge(
            "llm_bridge_active_streams", "Requests streaming from the API now", registry=r
        )
        self.queued = Gauge(
            "llm_bridge_queue_depth", "Requests waiting for a free stream", registry=r
        )
        self.mqtt_up = Gauge(
            "llm_bridge_mqtt_connected", "1 while connected to the broker", registry=r
        )

    def attach(self, host: Host) -> None:
        self.active.set_function(lambda: host.jobs_running()[0])
        self.queued.set_function(lambda: host.jobs_running()[1])
        self.mqtt_up.set_function(lambda: float(host.connected))
        if self.settings.metrics_port:
            start_http_server(
                self.settings.metrics_port, self.settings.metrics_host, registry=self.registry
            )

    def refused(self, device: str, error: ProtocolError) -> None:
        self.requests.labels(error.code).inc()
        self.chunks.inc()

    def streaming(self, job: Job) -> None:
        self.ttft.observe(time.monotonic() - job.started)

    def finished(self, job: Job) -> None:
        usage = job.usage
        self.requests.labels(job.outcome).inc()
        self.duration.observe(time.monotonic() - job.started)
        self.chunks.inc(job.seq + 1)
        if isinstance(usage, dict):
            for kind in ("prompt_tokens", "completion_tokens"):
                value = usage.get(kind)
                if isinstance(value, int):
                    self.tokens.labels(kind.removesuffix("_tokens")).inc(value)
