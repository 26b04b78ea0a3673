"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram

_STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fashionrec_gateway_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fashionrec_gateway_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "fashionrec_gateway_stage_seconds",
            "time per stage of a request (upload, validate, store, embed, queue, infer, search, …)",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.query_cache = Counter(
            "fashionrec_gateway_query_cache_total",
            "query-vector cache lookups",
            ["result"],
            registry=self.registry,
        )
        self.reembeds = Counter(
            "fashionrec_gateway_reembed_total",
            "searches re-embedded after the indexer reported a new model version",
            registry=self.registry,
        )


class StageTimer:
    """Times named stages for the Server-Timing header and the stage histogram."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.durations: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.durations[name] = self.durations.get(name, 0.0) + elapsed
            self.metrics.stages.labels(name).observe(elapsed)

    def record(self, name: str, seconds: float) -> None:
        """A stage timed elsewhere (the embedder's or the indexer's own timings)."""
        self.durations[name] = self.durations.get(name, 0.0) + max(seconds, 0.0)
        self.metrics.stages.labels(name).observe(max(seconds, 0.0))

    def header(self) -> str:
        return ", ".join(f"{name};dur={sec * 1000:.1f}" for name, sec in self.durations.items())
