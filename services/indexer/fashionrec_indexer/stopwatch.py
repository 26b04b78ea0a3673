"""Stage timings of one query, for the search-latency histogram and the Server-Timing header."""

from __future__ import annotations

import time

from fashionrec_indexer.metrics import Metrics


class Stopwatch:
    """Stage durations of one request, observed as `search_latency{endpoint, stage}`.

    A stage lapped more than once (a collapsing query's rounds) adds up; each stage is observed
    once, by `total`."""

    def __init__(self, metrics: Metrics, endpoint: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.started = self._last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        """The time since the previous lap (or the start) is `stage`'s."""
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._last
        self._last = now

    def total(self) -> None:
        elapsed = time.perf_counter() - self.started
        for stage, seconds in self.stages.items():
            self.metrics.search_latency.labels(self.endpoint, stage).observe(seconds)
        self.metrics.search_latency.labels(self.endpoint, "total").observe(elapsed)

    def server_timing(self) -> str:
        return ", ".join(f"{name};dur={value * 1000:.2f}" for name, value in self.stages.items())
