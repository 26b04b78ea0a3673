"""The Celery round trip against a real Redis broker, with this test playing the embedder worker."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from celery import Celery
from fashionrec_gateway.embedding import (
    QVEC_PREFIX,
    CeleryQueryEmbedder,
    QueryVectorCache,
    tune_for_requests,
)
from fashionrec_shared.celery_app import make_celery
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.tasks import EmbedQueryResult, ImageRef, TaskName
from fashionrec_shared.vectors import encode_vector

from tests.gateway.fakes import unit_vector

REF = ImageRef(key="uploads/" + "a" * 64 + ".jpg", sha256="a" * 64)
RESULT = EmbedQueryResult(vector=encode_vector(unit_vector()), dim=8, model_version="m1")


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    app = tune_for_requests(make_celery("test-gateway", BrokerSettings(url=redis_url)))
    yield app
    app.close()


def fake_worker(app: Celery, redis_url: str, seen: list[dict]) -> threading.Thread:
    """Takes one message off the `embed` queue and stores a result as a worker would."""

    def work() -> None:
        client = redis.Redis.from_url(redis_url)
        popped = client.brpop(["embed"], timeout=10)
        assert popped is not None
        message = json.loads(popped[1])
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        seen.append({"task": message["headers"]["task"], "args": args})
        app.backend.store_result(
            message["headers"]["id"], RESULT.model_dump(mode="json"), "SUCCESS"
        )
        client.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_embed_query_round_trip(celery_app: Celery, redis_url: str) -> None:
    seen: list[dict] = []
    worker = fake_worker(celery_app, redis_url, seen)
    result = CeleryQueryEmbedder(celery_app)(REF, timeout_s=10)
    worker.join(5)
    assert result == RESULT
    assert seen == [
        {
            "task": TaskName.EMBED_QUERY.value,
            "args": [{"image": REF.model_dump(), "model_version": None}],
        }
    ]


def test_no_worker_is_a_504(celery_app: Celery) -> None:
    with pytest.raises(ProblemError) as info:
        CeleryQueryEmbedder(celery_app)(REF, timeout_s=0.3)
    assert info.value.status == 504


def test_unreachable_broker_is_a_503() -> None:
    app = make_celery("test-gateway", BrokerSettings(url="redis://127.0.0.1:1/0"))
    tune_for_requests(app)
    try:
        with pytest.raises(ProblemError) as info:
            CeleryQueryEmbedder(app)(REF, timeout_s=1)
        assert info.value.status == 503
    finally:
        app.close()


def test_query_cache(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    cache = QueryVectorCache(client, ttl_s=60)
    assert cache.get("m1", "b" * 64) is None
    cache.put("b" * 64, RESULT)
    assert cache.get("m1", "b" * 64) == RESULT
    assert cache.get("m2", "b" * 64) is None  # keyed by model version
    assert 0 < client.ttl(f"{QVEC_PREFIX}m1:" + "b" * 64) <= 60
    client.set(f"{QVEC_PREFIX}m1:" + "c" * 64, "garbage")
    assert cache.get("m1", "c" * 64) is None
    assert not client.exists(f"{QVEC_PREFIX}m1:" + "c" * 64)
    cache.drop("m1", "b" * 64)
    assert cache.get("m1", "b" * 64) is None
    assert QueryVectorCache(client, ttl_s=0).get("m1", "b" * 64) is None
    client.close()


def test_cache_treats_redis_trouble_as_a_miss() -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    cache = QueryVectorCache(client, ttl_s=60)
    assert cache.get("m1", "b" * 64) is None
    cache.put("b" * 64, RESULT)
    cache.drop("m1", "b" * 64)


def test_concurrent_queries_get_their_own_results(celery_app: Celery, redis_url: str) -> None:
    """Searches run in a threadpool: each waiting thread must receive its own task's result."""
    n = 12

    def worker() -> None:
        client = redis.Redis.from_url(redis_url)
        for _ in range(n):
            _, raw = client.brpop(["embed"], timeout=10)
            message = json.loads(raw)
            [payload], _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            # The model version echoes the image sha, so a mix-up would show.
            answer = RESULT.model_copy(update={"model_version": payload["image"]["sha256"]})
            celery_app.backend.store_result(
                message["headers"]["id"], answer.model_dump(mode="json"), "SUCCESS"
            )
        client.close()

    threading.Thread(target=worker, daemon=True).start()
    embedder = CeleryQueryEmbedder(celery_app)

    def one(i: int) -> bool:
        sha = f"{i:064x}"
        return embedder(ImageRef(key=f"uploads/{sha}.jpg", sha256=sha), 10).model_version == sha

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(one, range(n)))


def batch_worker(
    app: Celery, redis_url: str, seen: list[dict], answer: Any = None
) -> threading.Thread:
    """Takes one EMBED_QUERIES message and answers one result per image (or `answer`)."""

    def work() -> None:
        client = redis.Redis.from_url(redis_url)
        popped = client.brpop(["embed"], timeout=10)
        assert popped is not None
        message = json.loads(popped[1])
        [payload], _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        seen.append({"task": message["headers"]["task"], "payload": payload})
        results = [RESULT.model_dump(mode="json") for _ in payload["images"]]
        app.backend.store_result(
            message["headers"]["id"],
            answer if answer is not None else {"results": results},
            "SUCCESS",
        )
        client.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_a_batch_of_photos_is_one_embed_queries_task(celery_app: Celery, redis_url: str) -> None:
    seen: list[dict] = []
    refs = [REF, ImageRef(key="uploads/" + "b" * 64 + ".png", sha256="b" * 64)]
    worker = batch_worker(celery_app, redis_url, seen)
    results = CeleryQueryEmbedder(celery_app).batch(refs, timeout_s=10, model_version="m1")
    worker.join(5)
    assert results == [RESULT, RESULT]
    assert seen == [
        {
            "task": TaskName.EMBED_QUERIES.value,
            "payload": {"images": [r.model_dump() for r in refs], "model_version": "m1"},
        }
    ]


def test_a_batch_answer_that_does_not_fit_is_a_502(celery_app: Celery, redis_url: str) -> None:
    seen: list[dict] = []
    one = {"results": [RESULT.model_dump(mode="json")]}
    worker = batch_worker(celery_app, redis_url, seen, answer=one)
    with pytest.raises(ProblemError) as info:
        CeleryQueryEmbedder(celery_app).batch([REF, REF], timeout_s=10)
    worker.join(5)
    assert info.value.status == 502 and "1 results" in str(info.value.detail)


def test_no_worker_for_a_batch_is_a_504(celery_app: Celery) -> None:
    with pytest.raises(ProblemError) as info:
        CeleryQueryEmbedder(celery_app).batch([REF], timeout_s=0.3)
    assert info.value.status == 504
