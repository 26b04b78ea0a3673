from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery, current_app
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown
from fashionrec_embedder import worker
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.preprocess import decode_image
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.worker import (
    TRANSIENT_ERRORS,
    EmbedderResources,
    Heartbeat,
    ImageMismatch,
    WorkerContext,
    create_worker_app,
    embed_items,
    embed_queries,
    embed_query,
)
from fashionrec_shared.celery_app import MAX_DELIVERIES
from fashionrec_shared.storage import (
    BlobNotFound,
    LocalBlobStore,
    StorageUnavailable,
    content_key,
)
from fashionrec_shared.task_base import PoisonMessage
from fashionrec_shared.tasks import (
    EmbedQueriesResult,
    EmbedQueryResult,
    StoreEmbeddings,
    TaskName,
)
from fashionrec_shared.vectors import decode_vector

from .conftest import encode, pattern_image, small_settings
from .test_colours import garment_on


@pytest.fixture
def context(tmp_path: Path, redis_url: str, random_model: Embedder) -> WorkerContext:
    settings = small_settings(
        tmp_path,
        broker={"url": redis_url},
        storage={"backend": "local", "local_dir": tmp_path / "blobs"},
    )
    client = redis.Redis.from_url(redis_url)
    ctx = WorkerContext(
        settings=settings,
        store=LocalBlobStore(settings.storage.local_dir),
        redis=client,
        model=random_model,
    )
    yield ctx
    client.close()


def _put(ctx: WorkerContext, data: bytes, prefix: str = "inventory", ext: str = "jpg") -> dict:
    key, digest = content_key(prefix, data, ext)
    ctx.store.put(key, data)
    return {"key": key, "sha256": digest}


def _missing_ref() -> dict:
    return {"key": "inventory/" + "0" * 64 + ".jpg", "sha256": "0" * 64}


class Collector(list):
    def __call__(self, result: StoreEmbeddings) -> None:
        self.append(result)


@contextmanager
def worker_process(app: Celery) -> Iterator[None]:
    """What the prefork pool does in each child it forks: make `app` current and send
    worker_process_init; worker_process_shutdown when the child exits."""
    previous = current_app._get_current_object()
    app.set_current()
    worker_process_init.send(sender=None)
    try:
        yield
    finally:
        worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        previous.set_current()


def app_for(ctx: WorkerContext) -> Celery:
    """The worker's app running on `ctx` (as a worker process would after its init)."""
    return create_worker_app(ctx.settings, resources=EmbedderResources(ctx.settings, ctx))


def _sent_to_indexer(client: redis.Redis) -> list[StoreEmbeddings]:
    """The STORE_EMBEDDINGS messages on the index queue, oldest first (taken off it)."""
    sent = []
    while client.llen("index"):
        headers, (args, _kwargs, _embed) = _pop_task(client, "index")
        assert headers["task"] == str(TaskName.STORE_EMBEDDINGS)
        sent.append(StoreEmbeddings.model_validate(args[0]))
    return sent


def test_embed_query_returns_a_unit_vector_with_timings(context: WorkerContext) -> None:
    data = encode(pattern_image(120, 100), "JPEG", quality=90)
    ref = _put(context, data, "uploads")
    result = EmbedQueryResult.model_validate(embed_query(context, {"image": ref}))
    assert result.dim == 2048 and result.model_version == "resnet50-random-s7-px64"
    vector = decode_vector(result.vector, 2048)
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    assert set(result.timings_ms) == {"fetch", "decode", "colours", "infer"}
    expected = context.model.embed([decode_image(data, draft_size=64)])[0]
    np.testing.assert_allclose(vector, expected, atol=1e-6)


def test_embed_query_and_embed_items_carry_the_dominant_colours(context: WorkerContext) -> None:
    navy = _put(context, encode(garment_on((25, 35, 90)), "JPEG", quality=90), "uploads")
    red = _put(context, encode(garment_on((200, 30, 40)), "JPEG", quality=90))
    query = EmbedQueryResult.model_validate(embed_query(context, {"image": navy}))
    assert query.colours and query.colours[0].name == "navy" and query.colours[0].share > 0.8
    sent = Collector()
    items = [{"item_id": "n", "image": navy}, {"item_id": "r", "image": red}]
    embed_items(context, {"items": items}, store_results=sent)
    [message] = sent
    by_id = {e.item_id: e.colours for e in message.embeddings}
    assert by_id["n"] == query.colours  # the same image gives the same colours either way
    assert by_id["r"] and by_id["r"][0].name == "red"


def test_embed_query_errors(context: WorkerContext) -> None:
    with pytest.raises(BlobNotFound):
        embed_query(context, {"image": _missing_ref()})
    ref = _put(context, b"not an image at all", "uploads")
    with pytest.raises(ValueError, match="cannot decode"):
        embed_query(context, {"image": ref})
    context.store.put(ref["key"], encode(pattern_image()))  # bytes no longer match the sha
    with pytest.raises(ImageMismatch):
        embed_query(context, {"image": ref})


def test_embed_queries_embeds_every_photo_in_one_model_call_in_order(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    fills = [(200, 30, 40), (25, 35, 90), (30, 110, 60), (240, 200, 40)]
    refs = [_put(context, encode(garment_on(f), "JPEG", quality=90), "uploads") for f in fills]
    singles = [EmbedQueryResult.model_validate(embed_query(context, {"image": r})) for r in refs]
    real_run = context.model._run
    calls: list[int] = []

    def counting_run(batch: np.ndarray) -> list:
        calls.append(len(batch))
        return real_run(batch)

    monkeypatch.setattr(context.model, "_run", counting_run)
    raw = embed_queries(context, {"images": refs, "model_version": "not-loaded-here"})
    assert calls == [len(refs)]  # one model call for the four photos
    results = EmbedQueriesResult.model_validate(raw).results
    assert [r.colours[0].name for r in results if r.colours] == ["red", "navy", "green", "yellow"]
    for single, result in zip(singles, results, strict=True):
        # A version this process does not hold: the primary embeds, as for EMBED_QUERY.
        assert result.model_version == context.model.model_version and result.dim == 2048
        np.testing.assert_allclose(
            decode_vector(result.vector), decode_vector(single.vector), atol=1e-5
        )
        assert result.colours == single.colours
        assert set(result.timings_ms) == {"fetch", "decode", "colours", "infer"}


def test_embed_queries_fails_as_embed_query_does_for_a_bad_photo(context: WorkerContext) -> None:
    good = _put(context, encode(pattern_image(), "JPEG"), "uploads")
    with pytest.raises(BlobNotFound):
        embed_queries(context, {"images": [good, _missing_ref()]})
    garbage = _put(context, b"not an image at all", "uploads")
    with pytest.raises(ValueError, match="cannot decode"):
        embed_queries(context, {"images": [good, garbage]})
    context.store.put(garbage["key"], encode(pattern_image()))  # bytes no longer match the sha
    with pytest.raises(ImageMismatch):
        embed_queries(context, {"images": [garbage, good]})


def test_embed_items_embeds_good_images_and_reports_failures(context: WorkerContext) -> None:
    good = [encode(pattern_image(seed=i), "JPEG", quality=90) for i in range(5)]
    items = [{"item_id": f"good-{i}", "image": _put(context, d)} for i, d in enumerate(good)]
    items.insert(2, {"item_id": "missing", "image": _missing_ref()})
    items.append({"item_id": "garbage", "image": _put(context, b"\x89PNG garbage", ext="png")})
    sent = Collector()

    summary = embed_items(context, {"job_id": "job-1", "items": items}, store_results=sent)

    assert summary["embedded"] == 5 and summary["failed"] == 2 and not summary["poison"]
    assert len(sent) == 1
    message = sent[0]
    assert message.job_id == "job-1" and message.dim == 2048
    assert message.model_version == context.model.model_version
    assert [e.item_id for e in message.embeddings] == [f"good-{i}" for i in range(5)]
    failures = {f.item_id: f.error for f in message.failures}
    assert "not found" in failures["missing"]
    assert "cannot decode" in failures["garbage"]
    # Inventory and query images go through the same code: same image, same vector.
    query = embed_query(context, {"image": items[0]["image"]})
    np.testing.assert_allclose(
        decode_vector(message.embeddings[0].vector), decode_vector(query["vector"]), atol=1e-5
    )
    assert message.embeddings[0].image_sha256 == items[0]["image"]["sha256"]


def test_a_many_item_task_runs_in_pipelined_model_batches(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    context.settings = context.settings.model_copy(update={"batch_size": 2})
    data = [encode(pattern_image(seed=i), "JPEG", quality=90) for i in range(9)]
    items = [{"item_id": f"i{i}", "image": _put(context, d)} for i, d in enumerate(data)]
    items.insert(4, {"item_id": "missing", "image": _missing_ref()})
    real = context.model.embed_and_predict
    calls: list[int] = []

    def spy(sources: list, **kwargs: object) -> list:
        calls.append(len(sources))
        return real(sources, **kwargs)

    monkeypatch.setattr(context.model, "embed_and_predict", spy)
    sent = Collector()
    summary = embed_items(context, {"items": items}, store_results=sent)
    # Windows of PIPELINE_BATCHES model batches: decoding overlaps inference inside each.
    assert calls == [2 * worker.PIPELINE_BATCHES, 10 - 2 * worker.PIPELINE_BATCHES]
    assert summary["embedded"] == 9 and summary["failed"] == 1
    [result] = sent
    assert [e.item_id for e in result.embeddings] == [f"i{i}" for i in range(9)]
    assert [f.item_id for f in result.failures] == ["missing"]
    # The same vectors as one image at a time.
    single = context.model.embed([decode_image(data[3])])[0]
    assert np.allclose(decode_vector(result.embeddings[3].vector), single, atol=1e-4)


def test_poison_guard_stops_after_max_deliveries(context: WorkerContext) -> None:
    app = app_for(context)
    embed_items_task = app.tasks[str(TaskName.EMBED_ITEMS)]
    items = [{"item_id": "a", "image": _missing_ref()}, {"item_id": "b", "image": _missing_ref()}]
    for _ in range(MAX_DELIVERIES):  # the same message delivered again (a worker crashed)
        summary = embed_items_task.apply(args=[{"items": items}], task_id="t-poison").get()
        assert not summary["poison"]
    summary = embed_items_task.apply(args=[{"items": items}], task_id="t-poison").get()
    sent = _sent_to_indexer(context.redis)
    assert summary["poison"] and summary["failed"] == 2
    expected = f"poison message: gave up after {MAX_DELIVERIES + 1} deliveries"
    assert [f.error for f in sent[-1].failures] == [expected, expected]
    assert sent[-1].embeddings == []

    context.redis.set("fashionrec:deliveries:q-poison", MAX_DELIVERIES)
    embed_query_task = app.tasks[str(TaskName.EMBED_QUERY)]
    with pytest.raises(PoisonMessage):
        embed_query_task.apply(args=[{"image": _missing_ref()}], task_id="q-poison").get()


def test_retries_are_not_counted_as_redeliveries(context: WorkerContext) -> None:
    context.redis.set("fashionrec:deliveries:t-retry", MAX_DELIVERIES)
    items = [{"item_id": "a", "image": _missing_ref()}]
    task = app_for(context).tasks[str(TaskName.EMBED_ITEMS)]
    summary = task.apply(args=[{"items": items}], task_id="t-retry", retries=1).get()
    assert not summary["poison"]


def test_soft_time_limit_reports_unfinished_items(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pipelined calls of 2 items: the second one hits the time limit.
    monkeypatch.setattr(worker, "PIPELINE_BATCHES", 2)
    context.settings = context.settings.model_copy(update={"batch_size": 1})
    items = [
        {"item_id": f"i{i}", "image": _put(context, encode(pattern_image(seed=i)), ext="png")}
        for i in range(5)
    ]
    real_embed = context.model.embed_and_predict
    calls: list[int] = []

    def embed_then_time_out(sources: list, **kwargs: object) -> list:
        calls.append(len(sources))
        if len(calls) == 2:
            raise SoftTimeLimitExceeded()
        return real_embed(sources, **kwargs)

    monkeypatch.setattr(context.model, "embed_and_predict", embed_then_time_out)
    sent = Collector()
    summary = embed_items(context, {"items": items}, store_results=sent)
    assert summary["embedded"] == 2 and summary["failed"] == 3
    assert [e.item_id for e in sent[0].embeddings] == ["i0", "i1"]
    assert [f.item_id for f in sent[0].failures] == ["i2", "i3", "i4"]
    assert all("timed out" in f.error for f in sent[0].failures)


def test_transient_storage_errors_propagate_for_retry(context: WorkerContext) -> None:
    class DownStore(LocalBlobStore):
        def get(self, key: str) -> bytes:
            raise StorageUnavailable("S3 endpoint unreachable")

    context.store = DownStore(context.settings.storage.local_dir)
    sent = Collector()
    with pytest.raises(StorageUnavailable):
        embed_items(
            context,
            {"items": [{"item_id": "a", "image": _missing_ref()}]},
            store_results=sent,
        )
    assert sent == []


def test_task_policy(context: WorkerContext) -> None:
    app = create_worker_app(context.settings)
    for name in (TaskName.EMBED_QUERY, TaskName.EMBED_QUERIES, TaskName.EMBED_ITEMS):
        task = app.tasks[str(name)]
        assert task.autoretry_for == TRANSIENT_ERRORS
        assert Exception not in task.autoretry_for
        assert task.max_retries == 3 and task.retry_backoff is True
        assert task.acks_late and task.reject_on_worker_lost
        assert task.soft_time_limit and task.time_limit
    assert app.conf.task_routes[str(TaskName.EMBED_ITEMS)] == {"queue": "embed"}
    assert app.conf.task_routes[str(TaskName.EMBED_QUERIES)] == {"queue": "embed"}


def _pop_task(client: redis.Redis, queue: str) -> tuple[dict[str, Any], list]:
    raw = client.rpop(queue)
    assert raw is not None, f"no message on queue {queue!r}"
    message = json.loads(raw)
    body = json.loads(base64.b64decode(message["body"]))
    return message["headers"], body


def test_celery_tasks_run_end_to_end_and_send_store_embeddings(context: WorkerContext) -> None:
    app = app_for(context)
    ref = _put(context, encode(pattern_image(), "JPEG"))
    payload = {"job_id": "j", "items": [{"item_id": "x", "image": ref}]}
    result = app.tasks[str(TaskName.EMBED_ITEMS)].apply(args=[payload], task_id="e2e-1")
    assert result.successful(), result.traceback
    assert result.get()["embedded"] == 1

    headers, (args, _kwargs, _embed) = _pop_task(context.redis, "index")
    assert headers["task"] == str(TaskName.STORE_EMBEDDINGS)
    stored = StoreEmbeddings.model_validate(args[0])
    assert [e.item_id for e in stored.embeddings] == ["x"] and stored.failures == []

    query = app.tasks[str(TaskName.EMBED_QUERY)].apply(args=[{"image": ref}], task_id="q")
    assert query.successful(), query.traceback
    np.testing.assert_allclose(
        decode_vector(query.get()["vector"]), decode_vector(stored.embeddings[0].vector), 1e-5
    )
    assert context.redis.get("fashionrec:deliveries:e2e-1") == b"1"

    queries = app.tasks[str(TaskName.EMBED_QUERIES)].apply(
        args=[{"images": [ref, ref]}], task_id="qs"
    )
    assert queries.successful(), queries.traceback
    results = EmbedQueriesResult.model_validate(queries.get()).results
    assert len(results) == 2
    for result in results:  # a batch of two: the same vector up to float rounding
        np.testing.assert_allclose(
            decode_vector(result.vector), decode_vector(query.get()["vector"]), atol=1e-5
        )


def test_heartbeat_writes_the_alive_key_with_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    info = {"model_version": "resnet50-random-s1", "dim": 2048, "device": "cpu"}
    beat = Heartbeat(client, info, interval_s=0.05)
    assert beat.key.startswith("fashionrec:embedder:alive:")
    hostname, pid = beat.key.rsplit(":", 2)[1:]
    assert hostname and int(pid) > 0
    beat.start()
    try:
        deadline = time.monotonic() + 5
        while client.get(beat.key) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert json.loads(client.get(beat.key)) == info
        assert 0 < client.ttl(beat.key) <= 30
        client.expire(beat.key, 1)
        time.sleep(0.2)
        assert client.ttl(beat.key) > 1  # refreshed by the thread
    finally:
        beat.stop()
    assert client.get(beat.key) is None
    client.close()


def test_worker_process_init_loads_the_model_and_announces_it(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_WEIGHTS", "random:3")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_DEVICE", "cpu")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_IMAGE_SIZE", "64")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASHIONREC_BROKER_URL", redis_url)
    monkeypatch.setenv("FASHIONREC_STORAGE_BACKEND", "local")
    monkeypatch.setenv("FASHIONREC_STORAGE_LOCAL_DIR", str(tmp_path / "blobs"))
    settings = EmbedderSettings()
    resources = EmbedderResources(settings)
    app = create_worker_app(settings, resources=resources)
    client = redis.Redis.from_url(redis_url)
    with worker_process(app):
        context = resources.context
        assert context is not None
        assert context.model.loaded
        assert context.heartbeat is not None
        alive = json.loads(client.get(context.heartbeat.key))
        assert alive == {
            "model_version": "resnet50-random-s3-px64",
            "dim": 2048,
            "device": "cpu",
            "backbone": "resnet50",
            "weights": "random:3",
            "pooling": "global",
            "runtime": "openvino",
            "precision": "fp32",
            "model_versions": ["resnet50-random-s3-px64"],
        }
        key = context.heartbeat.key
    assert client.get(key) is None
    assert resources.context is None
    client.close()
