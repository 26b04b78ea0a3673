"""Query photos to vectors: the cache per photo, one batch for the rest, one model version."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from fashionrec_gateway.embedding import QueryVectorCache
from fashionrec_gateway.metrics import GatewayMetrics
from fashionrec_gateway.query_vectors import embed_many
from fashionrec_shared.tasks import EmbedQueryResult, ImageRef
from fashionrec_shared.vectors import encode_vector

from tests.gateway.fakes import unit_vector


def ref(n: int) -> ImageRef:
    sha = f"{n:064x}"
    return ImageRef(key=f"uploads/{sha}.jpg", sha256=sha)


def result(version: str) -> EmbedQueryResult:
    return EmbedQueryResult(vector=encode_vector(unit_vector()), dim=8, model_version=version)


@dataclass
class BatchEmbedder:
    """Answers every batch with its primary version, whatever was asked (an embedder that does
    not hold the asked version does so)."""

    version: str
    batches: list[tuple[list[str], str | None]] = field(default_factory=list)

    def __call__(
        self, image: ImageRef, timeout_s: float, model_version: str | None = None
    ) -> EmbedQueryResult:
        raise AssertionError("photos of a recommendation are embedded in batches")

    def batch(
        self, images: list[ImageRef], timeout_s: float, model_version: str | None = None
    ) -> list[EmbedQueryResult]:
        self.batches.append(([i.sha256 for i in images], model_version))
        return [result(self.version) for _ in images]


@pytest.fixture
def cache(redis_url: str) -> Iterator[QueryVectorCache]:
    client = redis.Redis.from_url(redis_url)  # database 15, flushed around each test
    yield QueryVectorCache(client, ttl_s=60)
    client.close()


def test_only_photos_the_cache_lacks_are_embedded(cache: QueryVectorCache) -> None:
    cache.put(ref(1).sha256, result("m1"))
    embedder = BatchEmbedder("m1")
    metrics = GatewayMetrics()
    vectors, fresh = embed_many([ref(0), ref(1), ref(2)], embedder, cache, metrics, 5, "m1")
    assert [v.model_version for v in vectors] == ["m1"] * 3
    assert embedder.batches == [([ref(0).sha256, ref(2).sha256], "m1")]
    assert fresh is not None
    assert metrics.query_cache.labels("hit")._value.get() == 1
    # All cached now: no batch, no fresh result.
    again, fresh = embed_many([ref(0), ref(1), ref(2)], embedder, cache, metrics, 5, "m1")
    assert len(again) == 3 and fresh is None and len(embedder.batches) == 1


def test_cached_vectors_of_another_version_are_embedded_again(cache: QueryVectorCache) -> None:
    cache.put(ref(1).sha256, result("m1"))
    embedder = BatchEmbedder("m2")  # asked for m1, it answers m2
    vectors, _ = embed_many([ref(0), ref(1)], embedder, cache, GatewayMetrics(), 5, "m1")
    assert [v.model_version for v in vectors] == ["m2", "m2"]
    assert embedder.batches == [([ref(0).sha256], "m1"), ([ref(1).sha256], "m2")]


def test_an_unknown_version_skips_the_cache(cache: QueryVectorCache) -> None:
    cache.put(ref(0).sha256, result("m1"))
    embedder = BatchEmbedder("m1")
    embed_many([ref(0)], embedder, cache, GatewayMetrics(), 5, None)
    assert embedder.batches == [([ref(0).sha256], None)]
