"""Prometheus metrics of one API app (own registry, so several apps can live in one process)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    search_latency: Histogram
    search_fallbacks: Counter
    items_in_index: Gauge


def make_metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry=registry,
        search_latency=Histogram(
            "fashionrec_indexer_search_seconds",
            "Search latency by endpoint and stage",
            ["endpoint", "stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        ),
        search_fallbacks=Counter(
            "fashionrec_indexer_search_exact_fallbacks_total",
            "Searches where Annoy returned too few candidates and an exact scan answered",
            registry=registry,
        ),
        items_in_index=Gauge(
            "fashionrec_indexer_items_in_index",
            "Items in the loaded index build",
            registry=registry,
        ),
    )
