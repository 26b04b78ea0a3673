"""Query photos to vectors: the Redis cache first, the embedder for what it lacks.

One photo (search) is one EMBED_QUERY task; several (a recommendation's examples) are one
EMBED_QUERIES task for all the photos the cache lacks, so they share one model batch.
"""

from __future__ import annotations

from fashionrec_shared.tasks import EmbedQueryResult, ImageRef

from fashionrec_gateway.embedding import QueryEmbedder, QueryVectorCache
from fashionrec_gateway.metrics import GatewayMetrics, StageTimer

# The embedder's own timings (EmbedQueryResult.timings_ms) shown as stages of their own; the rest
# of the embed round trip is "queue": send, waiting for a free worker, result delivery.
WORKER_STAGES = ("fetch", "decode", "infer")


def _cached(
    cache: QueryVectorCache, metrics: GatewayMetrics, model_version: str | None, sha256: str
) -> EmbedQueryResult | None:
    """None as version: the embedder chooses, so no entry can be known to be of its version."""
    found = cache.get(model_version, sha256) if model_version else None
    metrics.query_cache.labels("hit" if found is not None else "miss").inc()
    return found


def embed_one(
    ref: ImageRef,
    embedder: QueryEmbedder,
    cache: QueryVectorCache,
    metrics: GatewayMetrics,
    timeout_s: float,
    model_version: str | None,
) -> tuple[EmbedQueryResult, bool]:
    """(the query vector of `model_version`, whether it came from the cache); None as version:
    the embedder's choice."""
    cached = _cached(cache, metrics, model_version, ref.sha256)
    if cached is not None:
        return cached, True
    result = embedder(ref, timeout_s, model_version)
    cache.put(ref.sha256, result)
    return result, False


def embed_many(
    refs: list[ImageRef],
    embedder: QueryEmbedder,
    cache: QueryVectorCache,
    metrics: GatewayMetrics,
    timeout_s: float,
    model_version: str | None,
) -> tuple[list[EmbedQueryResult], EmbedQueryResult | None]:
    """(one vector per photo, in order, all of one model version; the fresh batch's first result
    for its timings, None when all came from the cache)."""
    results: list[EmbedQueryResult | None] = [
        _cached(cache, metrics, model_version, ref.sha256) for ref in refs
    ]
    missing = [n for n, result in enumerate(results) if result is None]
    if not missing:
        return [r for r in results if r is not None], None
    fresh = embedder.batch([refs[n] for n in missing], timeout_s, model_version)
    for n, result in zip(missing, fresh, strict=True):
        results[n] = result
        cache.put(refs[n].sha256, result)
    version = fresh[0].model_version
    stale = [n for n, r in enumerate(results) if r is not None and r.model_version != version]
    if stale:
        # The embedder did not hold the version asked for (it answered with its primary): the
        # cached vectors are of another model and cannot be mixed with these.
        again = embedder.batch([refs[n] for n in stale], timeout_s, version)
        for n, result in zip(stale, again, strict=True):
            results[n] = result
            cache.put(refs[n].sha256, result)
    return [r for r in results if r is not None], fresh[0]


def record_embed(timer: StageTimer, result: EmbedQueryResult, round_trip_s: float) -> None:
    """The worker's stages of a fresh embedding, and the rest of the round trip as `queue`."""
    worker = {k: result.timings_ms[k] / 1000 for k in WORKER_STAGES if k in result.timings_ms}
    for name, seconds in worker.items():
        timer.record(name, seconds)
    timer.record("queue", round_trip_s - sum(worker.values()))
