"""Prometheus metrics for the collector, on a registry of our own (so tests can run several apps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("refinery_collector_requests", "Collector requests by call and HTTP status.", ["call", "status"], registry=r)
        self.accepted = Counter("refinery_events_accepted", "Events stored in the clean zone, by source.", ["source"], registry=r)
        self.duplicates = Counter("refinery_events_duplicate", "Events absorbed as retries of a known messageId.", ["source"], registry=r)
        self.suppressed = Counter("refinery_events_suppressed", "Events not stored because their person was erased (suppression list).", ["source"], registry=r)
        self.failed = Counter("refinery_events_failed", "Events quarantined in the failed zone, by reason.", ["source", "reason"], registry=r)
        self.rejected = Counter("refinery_requests_rejected", "Requests refused with a 4xx/5xx, by reason.", ["reason"], registry=r)
        self.latency = Histogram(
            "refinery_ack_latency_seconds",
            "Time from request start to durable acknowledgement.",
            ["call"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.commit_size = Histogram(
            "refinery_commit_events", "Events per group commit.", buckets=(1, 10, 100, 1000, 5000, 20000), registry=r
        )
        self.writer_queue = Gauge("refinery_writer_queue", "Jobs waiting for the writer.", registry=r)
