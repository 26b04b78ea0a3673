"""Dynamic batching (fashionrec_embedder.batching): the Batcher alone with a stand-in model, then
the real worker (Celery threads pool, Redis, the random ResNet50) gathering concurrent tasks,
failing a bad row alone, serving queries before queued bulk rows, and a killed worker's batch
redelivered with the poison message ending failed alone."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery, current_app
from celery.contrib.testing.worker import start_worker
from celery.exceptions import SoftTimeLimitExceeded
from fashionrec_cli.infra import EmbeddedRedis
from fashionrec_embedder.batching import Batcher, Priority, batching_active, worker_tasks
from fashionrec_embedder.model import Embedded, Embedder
from fashionrec_embedder.preprocess import decode_image
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.worker import (
    EmbedderResources,
    WorkerContext,
    create_worker_app,
    worker_argv,
)
from fashionrec_shared.celery_app import MAX_DELIVERIES, send
from fashionrec_shared.keys import deliveries_key
from fashionrec_shared.storage import LocalBlobStore, content_key
from fashionrec_shared.tasks import (
    EmbedItem,
    EmbedItems,
    EmbedQueries,
    EmbedQueriesResult,
    EmbedQuery,
    ImageRef,
    Queue,
    StoreEmbeddings,
    TaskName,
)
from fashionrec_shared.vectors import decode_vector
from PIL import Image

from ..conftest import private_dir
from .conftest import SMALL, encode, pattern_image, small_settings

# ---- the Batcher with a stand-in model ------------------------------------------------------


class FakeModel:
    """Doubles each row; raises for a row whose first value is -1; can hold its first call."""

    def __init__(self, batch_size: int = 8, version: str = "fake") -> None:
        self.settings = SimpleNamespace(batch_size=batch_size)
        self.model_version = version
        self.calls: list[np.ndarray] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def _run(self, batch: np.ndarray) -> list[Embedded]:
        self.calls.append(batch.copy())
        self.entered.set()
        if self.gate is not None:
            gate, self.gate = self.gate, None
            assert gate.wait(30), "gate never opened"
        if np.any(batch[:, 0] == -1):
            raise ValueError("poisoned row")
        return [Embedded(row * 2, None) for row in batch]


def rows(*values: float) -> np.ndarray:
    return np.array([[v, v] for v in values], dtype=np.float32)


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls concurrently; their results (or exceptions) in order."""
    out: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            out[i] = call()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@pytest.fixture
def batcher() -> Iterator[Batcher]:
    b = Batcher(window_s=5.0)  # long: tests see the gathering, not the clock
    yield b
    b.stop()


def _task_then_run(
    batcher: Batcher, model: FakeModel, value: float, priority: Priority, prepare_s: float = 0
) -> Callable[[], list[Embedded]]:
    def call() -> list[Embedded]:
        with batcher.task():
            time.sleep(prepare_s)  # fetching and decoding
            return batcher.run(model, rows(value), priority=priority)  # type: ignore[arg-type]

    return call


def test_concurrent_tasks_share_one_model_call(batcher: Batcher) -> None:
    model = FakeModel(batch_size=8)
    calls = [
        _task_then_run(
            batcher, model, i, Priority.QUERY if i % 2 else Priority.ITEMS, 0.1 + 0.05 * i
        )
        for i in range(6)
    ]
    results = in_threads(*calls)
    # The batch waited while tasks were still preparing, then ran once with every row.
    assert len(model.calls) == 1 and len(model.calls[0]) == 6
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result[0].vector, [2 * i, 2 * i])
    assert batcher.stats.snapshot()["sizes"] == {6: 1}


def test_a_received_task_not_started_yet_holds_the_batch_open(batcher: Batcher) -> None:
    model = FakeModel(batch_size=8)
    batcher.expect("late")  # the consumer received it; its pool thread has not started

    def late() -> list[Embedded]:
        time.sleep(0.3)
        with batcher.task("late"):
            return batcher.run(model, rows(2), priority=Priority.QUERY)  # type: ignore[arg-type]

    first = _task_then_run(batcher, model, 1, Priority.QUERY)
    in_threads(first, late)
    assert [len(c) for c in model.calls] == [2]
    fresh = Batcher(window_s=5.0)
    fresh.expect("never-runs")
    fresh.forget("never-runs")  # revoked: no longer waited for
    started = time.monotonic()
    with fresh.task():
        fresh.run(model, rows(3), priority=Priority.QUERY)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0
    fresh.stop()


def test_clients_served_together_share_the_next_batch_too() -> None:
    """Under load the clients of one batch come back at slightly different times; the next
    batch waits for them (within the window) instead of leaving with the first."""
    batcher = Batcher(window_s=1.0)
    model = FakeModel(batch_size=8)

    def client(value: float, think_s: float) -> list[float]:
        out = []
        for _ in range(3):
            with batcher.task():
                time.sleep(0.05)  # fetch and decode
                out.append(
                    float(batcher.run(model, rows(value), priority=Priority.QUERY)[0].vector[0])
                )  # type: ignore[arg-type]
            time.sleep(think_s)  # the result travels back, the next request comes in
        return out

    results = in_threads(lambda: client(1, 0.01), lambda: client(2, 0.15))
    assert results == [[2.0] * 3, [4.0] * 3]
    assert [len(c) for c in model.calls] == [2, 2, 2]
    batcher.stop()


def test_a_lone_request_does_not_wait_for_the_window(batcher: Batcher) -> None:
    model = FakeModel()
    started = time.monotonic()
    with batcher.task():
        [one] = batcher.run(model, rows(3), priority=Priority.QUERY)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.0  # the window is 5 s
    np.testing.assert_array_equal(one.vector, [6, 6])


def test_a_batch_is_cut_at_the_model_batch_size(batcher: Batcher) -> None:
    model = FakeModel(batch_size=4)
    with batcher.task():
        out = batcher.run(model, rows(*range(10)), priority=Priority.ITEMS)  # type: ignore[arg-type]
    assert [len(c) for c in model.calls] == [4, 4, 2]
    assert [e.vector[0] for e in out] == [2 * i for i in range(10)]


def test_a_failing_row_fails_alone(batcher: Batcher) -> None:
    model = FakeModel(batch_size=8)
    calls = [_task_then_run(batcher, model, v, Priority.QUERY, 0.02) for v in (1, 2, -1, 4)]
    results = in_threads(*calls)
    assert isinstance(results[2], ValueError) and "poisoned" in str(results[2])
    assert [r[0].vector[0] for i, r in enumerate(results) if i != 2] == [2, 4, 8]
    assert batcher.stats.reruns == 1
    # One batch of 4, then each row alone.
    assert [len(c) for c in model.calls] == [4, 1, 1, 1, 1]


def test_queries_go_before_queued_item_rows(batcher: Batcher) -> None:
    model = FakeModel(batch_size=4)
    gate = model.gate = threading.Event()
    batches: list[list[int]] = []
    batcher.on_batch = lambda batch: batches.append([r.priority for r in batch])
    first = threading.Thread(
        target=lambda: batcher.run(model, rows(0, 0, 0, 0), priority=Priority.ITEMS)  # type: ignore[arg-type]
    )
    first.start()
    assert model.entered.wait(10)  # the model is busy with a batch of items
    bulk = threading.Thread(
        target=lambda: batcher.run(model, rows(*range(1, 9)), priority=Priority.ITEMS)  # type: ignore[arg-type]
    )
    bulk.start()
    _wait_for(lambda: len(batcher._rows) == 8, "bulk rows never queued")
    query = threading.Thread(
        target=lambda: batcher.run(model, rows(9), priority=Priority.QUERY)  # type: ignore[arg-type]
    )
    query.start()
    _wait_for(lambda: len(batcher._rows) == 9, "query never queued")
    gate.set()
    for t in (first, bulk, query):
        t.join(10)
    q, i = int(Priority.QUERY), int(Priority.ITEMS)
    # The query, queued behind 8 item rows, is in the very next batch, first.
    assert batches == [[i, i, i, i], [q, i, i, i], [i, i, i, i], [i]]


def test_older_tasks_rows_go_first(batcher: Batcher) -> None:
    model = FakeModel(batch_size=2)
    gate = model.gate = threading.Event()
    order_a, order_b = batcher.next_order(), batcher.next_order()
    busy = threading.Thread(
        target=lambda: batcher.run(model, rows(0), priority=Priority.ITEMS)  # type: ignore[arg-type]
    )
    busy.start()
    assert model.entered.wait(10)
    b = threading.Thread(
        target=lambda: batcher.run(model, rows(20, 21), priority=Priority.ITEMS, order=order_b)  # type: ignore[arg-type]
    )
    b.start()
    _wait_for(lambda: len(batcher._rows) == 2, "rows of B never queued")
    a = threading.Thread(
        target=lambda: batcher.run(model, rows(10, 11), priority=Priority.ITEMS, order=order_a)  # type: ignore[arg-type]
    )
    a.start()
    _wait_for(lambda: len(batcher._rows) == 4, "rows of A never queued")
    gate.set()
    for t in (busy, a, b):
        t.join(10)
    # A's task is older, so its rows go first although they arrived later.
    assert [list(c[:, 0]) for c in model.calls] == [[0], [10, 11], [20, 21]]


def test_isolated_rows_and_other_models_get_batches_of_their_own(batcher: Batcher) -> None:
    model, other = FakeModel(batch_size=8), FakeModel(batch_size=8, version="other")
    gate = model.gate = threading.Event()
    batches: list[tuple[str, list[float]]] = []
    batcher.on_batch = lambda batch: batches.append(
        (batch[0].model.model_version, [float(r.array[0]) for r in batch])
    )
    busy = threading.Thread(
        target=lambda: batcher.run(model, rows(0), priority=Priority.QUERY)  # type: ignore[arg-type]
    )
    busy.start()
    assert model.entered.wait(10)
    threads = [
        threading.Thread(target=lambda: batcher.run(model, rows(1, 2), priority=Priority.ITEMS)),  # type: ignore[arg-type]
        threading.Thread(
            target=lambda: batcher.run(model, rows(3), priority=Priority.QUERY, isolated=True)  # type: ignore[arg-type]
        ),
        threading.Thread(target=lambda: batcher.run(other, rows(4), priority=Priority.QUERY)),  # type: ignore[arg-type]
        threading.Thread(target=lambda: batcher.run(model, rows(5), priority=Priority.QUERY)),  # type: ignore[arg-type]
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    _wait_for(lambda: len(batcher._rows) == 5, "rows never queued")
    gate.set()
    for t in (busy, *threads):
        t.join(10)
    assert batches[0] == ("fake", [0.0])
    assert sorted(batches[1:]) == sorted(
        [("fake", [5.0, 1.0, 2.0]), ("fake", [3.0]), ("other", [4.0])]
    )


def test_past_the_deadline_rows_are_withdrawn_and_the_soft_limit_raised(batcher: Batcher) -> None:
    model = FakeModel(batch_size=2)
    gate = model.gate = threading.Event()
    busy = threading.Thread(
        target=lambda: batcher.run(model, rows(0), priority=Priority.ITEMS)  # type: ignore[arg-type]
    )
    busy.start()
    assert model.entered.wait(10)
    with pytest.raises(SoftTimeLimitExceeded):
        batcher.run(model, rows(1), priority=Priority.QUERY, deadline=time.monotonic() + 0.2)  # type: ignore[arg-type]
    assert batcher._rows == []
    gate.set()
    busy.join(10)
    assert len(model.calls) == 1


def test_bulk_slots_bound_the_multi_item_tasks_at_once() -> None:
    batcher = Batcher(window_s=0, bulk_tasks=2)
    inside, most = 0, 0
    lock = threading.Lock()

    def bulk_task() -> None:
        nonlocal inside, most
        with batcher.task(), batcher.bulk_slot():
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.05)
            with lock:
                inside -= 1

    in_threads(*[bulk_task] * 6)
    assert most == 2


def test_stop_fails_rows_nobody_will_run() -> None:
    batcher = Batcher(window_s=0)
    batcher.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.run(FakeModel(), rows(1), priority=Priority.QUERY)  # type: ignore[arg-type]


def test_worker_argv_and_when_batching_applies() -> None:
    on = small_settings(batching=True)
    assert batching_active(on) and worker_tasks(on) == 2 * on.batch_size
    assert worker_argv(on, "info")[:9] == [
        "worker", "-Q", "embed", "--pool", "threads", "--concurrency", "8", "-n", "embedder@%h",
    ]  # fmt: skip
    assert worker_argv(small_settings(batching=True, batch_tasks=5), "info")[6] == "5"
    off = small_settings(batching=False)
    assert not batching_active(off) and worker_argv(off, "info")[4:7] == [
        "prefork", "--concurrency", "1",
    ]  # fmt: skip
    # each prefork process sees one task at a time
    several = small_settings(batching=True, concurrency=3)
    assert not batching_active(several) and worker_argv(several, "info")[4:7] == [
        "prefork", "--concurrency", "3",
    ]  # fmt: skip


def test_batching_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_BATCHING", "false")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_BATCH_WINDOW_MS", "2.5")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_BATCH_TASKS", "24")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_BULK_TASKS", "3")
    s = EmbedderSettings()
    assert (s.batching, s.batch_window_ms, s.batch_tasks, s.bulk_tasks) == (False, 2.5, 24, 3)
    for name in ("BATCHING", "BATCH_WINDOW_MS", "BATCH_TASKS", "BULK_TASKS"):
        monkeypatch.delenv(f"FASHIONREC_EMBEDDER_{name}")
    default = EmbedderSettings()
    assert (default.batching, default.batch_window_ms, default.batch_tasks) == (None, 10.0, None)
    assert default.bulk_tasks == 2
    # auto: off on CPU (prefork), on for a GPU
    assert not batching_active(small_settings(device="cpu"))
    assert batching_active(small_settings(device="cuda"))
    assert not batching_active(small_settings(device="cuda", concurrency=2))


# ---- the real worker: Celery threads pool, Redis, the random model ----------------------------


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.01)


class SlowStore(LocalBlobStore):
    """Fetching takes a while, so every task of a burst is received before any is ready."""

    delay_s = 0.2

    def get(self, key: str) -> bytes:
        time.sleep(self.delay_s)
        return super().get(key)


@pytest.fixture(scope="module")
def worker_redis_server() -> Iterator[str]:
    """A Redis of this module alone: a worker consumes whatever its queue holds, so it must not
    share one with test runs beside it (they flush and fill database 15 of a shared server)."""
    with private_dir("fashionrec-test-batching-redis-") as root:
        server = EmbeddedRedis(root)
        url = server.start()
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture
def worker_redis(worker_redis_server: str) -> Iterator[str]:
    client = redis.Redis.from_url(worker_redis_server)
    client.flushdb()
    yield worker_redis_server
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def model8() -> Embedder:
    model = Embedder(small_settings(batch_size=8))
    model.load()
    return model


@pytest.fixture
def context(tmp_path: Path, worker_redis: str, model8: Embedder) -> Iterator[WorkerContext]:
    settings = small_settings(
        tmp_path,
        batching=True,
        batch_size=8,
        batch_window_ms=1000,
        broker={"url": worker_redis},
        storage={"backend": "local", "local_dir": tmp_path / "blobs"},
    )
    client = redis.Redis.from_url(worker_redis)
    ctx = WorkerContext(
        settings=settings,
        store=SlowStore(settings.storage.local_dir),
        redis=client,
        model=model8,
    )
    yield ctx
    client.close()


def _put(ctx: WorkerContext, data: bytes, prefix: str = "inventory") -> ImageRef:
    key, digest = content_key(prefix, data, "png")
    ctx.store.put(key, data)
    return ImageRef(key=key, sha256=digest)


def _images(n: int, seed: int = 0) -> list[bytes]:
    return [encode(pattern_image(seed=seed + i)) for i in range(n)]


@contextmanager
def batching_worker(app: Celery, settings: EmbedderSettings) -> Iterator[Batcher]:
    """The app's worker as `fashionrec-embedder worker` runs it: threads pool, queue embed."""
    previous = current_app._get_current_object()
    try:
        with start_worker(
            app,
            pool="threads",
            concurrency=worker_tasks(settings),
            perform_ping_check=False,
            shutdown_timeout=30,
            queues=[str(Queue.EMBED)],
        ):
            yield app.fashionrec_batching.batcher  # type: ignore[attr-defined]
    finally:
        previous.set_current()


def _stored(client: redis.Redis) -> list[StoreEmbeddings]:
    """The STORE_EMBEDDINGS messages sent to the index queue (taken off it)."""
    out = []
    while (raw := client.rpop(str(Queue.INDEX))) is not None:
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        out.append(StoreEmbeddings.model_validate(body[0][0]))
    return out


def _expected(model: Embedder, data: bytes) -> np.ndarray:
    return model.embed([decode_image(data, draft_size=SMALL)])[0]


def test_the_worker_embeds_concurrent_queries_and_single_items_in_one_batch(
    context: WorkerContext,
) -> None:
    app = create_worker_app(
        context.settings, resources=EmbedderResources(context.settings, context)
    )
    queries, items = _images(4), _images(4, seed=10)
    query_refs = [_put(context, d, "uploads") for d in queries]
    item_refs = [_put(context, d) for d in items]
    # Sent before the worker starts: a burst that is all there at once.
    sent_queries = [send(app, TaskName.EMBED_QUERY, EmbedQuery(image=r)) for r in query_refs]
    sent_items = [
        send(app, TaskName.EMBED_ITEMS, EmbedItems(items=[EmbedItem(item_id=f"i{n}", image=r)]))
        for n, r in enumerate(item_refs)
    ]
    with batching_worker(app, context.settings) as batcher:
        vectors = [decode_vector(r.get(timeout=60)["vector"]) for r in sent_queries]
        summaries = [r.get(timeout=60) for r in sent_items]
    # Four queries and four single-item writes: one model call of 8.
    assert batcher.stats.snapshot()["sizes"] == {8: 1}
    for data, vector in zip(queries, vectors, strict=True):
        np.testing.assert_allclose(vector, _expected(context.model, data), atol=1e-4)
    assert [s["embedded"] for s in summaries] == [1, 1, 1, 1]
    stored = {m.embeddings[0].item_id: m for m in _stored(context.redis)}
    assert sorted(stored) == ["i0", "i1", "i2", "i3"]
    np.testing.assert_allclose(
        decode_vector(stored["i2"].embeddings[0].vector),
        _expected(context.model, items[2]),
        atol=1e-4,
    )
    # Each message was counted once by the poison guard and acknowledged.
    for result in [*sent_queries, *sent_items]:
        assert context.redis.get(deliveries_key(result.id)) == b"1"
    assert context.redis.hlen("unacked") == 0


def test_the_worker_embeds_a_queries_task_in_one_model_call_in_request_order(
    context: WorkerContext,
) -> None:
    app = create_worker_app(
        context.settings, resources=EmbedderResources(context.settings, context)
    )
    photos = _images(5, seed=20)
    refs = [_put(context, d, "uploads") for d in photos]
    garbage = _put(context, b"\x89PNG but not really", "uploads")
    sent = send(app, TaskName.EMBED_QUERIES, EmbedQueries(images=refs))
    bad = send(app, TaskName.EMBED_QUERIES, EmbedQueries(images=[refs[0], garbage]))
    with batching_worker(app, context.settings) as batcher:
        raw = sent.get(timeout=60)
        with pytest.raises(ValueError, match="cannot decode"):  # as EMBED_QUERY fails
            bad.get(timeout=60)
    results = EmbedQueriesResult.model_validate(raw).results
    assert len(results) == len(photos)
    for data, result in zip(photos, results, strict=True):
        assert result.model_version == context.model.model_version and result.colours
        np.testing.assert_allclose(
            decode_vector(result.vector), _expected(context.model, data), atol=1e-4
        )
    # The five photos went to the model together; the failed task sent none.
    assert batcher.stats.snapshot()["sizes"] == {5: 1}
    assert context.redis.get(deliveries_key(sent.id)) == b"1"


def test_a_bad_image_in_a_batch_fails_alone_and_the_rest_succeed(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = context.model._run

    def run(batch: np.ndarray) -> list[Embedded]:
        # A uniform image breaks "the model" (like an input that makes a runtime raise).
        if any(all(float(np.ptp(channel)) == 0.0 for channel in row) for row in batch):
            raise FloatingPointError("the runtime failed on this input")
        return real_run(batch)

    monkeypatch.setattr(context.model, "_run", run)
    app = create_worker_app(
        context.settings, resources=EmbedderResources(context.settings, context)
    )
    good = [_put(context, d, "uploads") for d in _images(3)]
    uniform = _put(context, encode(Image.new("RGB", (90, 70), (120, 120, 120))), "uploads")
    garbage = _put(context, b"\x89PNG but not really", "uploads")
    sent = [send(app, TaskName.EMBED_QUERY, EmbedQuery(image=r)) for r in good]
    bad_model = send(app, TaskName.EMBED_QUERY, EmbedQuery(image=uniform))
    bad_bytes = send(app, TaskName.EMBED_QUERY, EmbedQuery(image=garbage))
    with batching_worker(app, context.settings) as batcher:
        vectors = [r.get(timeout=60)["vector"] for r in sent]
        with pytest.raises(FloatingPointError):
            bad_model.get(timeout=60)
        with pytest.raises(ValueError, match="cannot decode"):
            bad_bytes.get(timeout=60)
    assert len(vectors) == 3
    # The 4 decodable images went in one batch; it failed, so each row ran alone.
    assert batcher.stats.reruns == 1 and batcher.stats.sizes[4] == 1


def test_the_worker_serves_a_query_before_queued_bulk_items(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    context.settings = context.settings.model_copy(update={"batch_window_ms": 0})
    context.store = LocalBlobStore(context.settings.storage.local_dir)
    model = Embedder(small_settings(batch_size=4))
    model.load()
    context.model = model
    gate, entered = threading.Event(), threading.Event()
    real_run = model._run

    def run(batch: np.ndarray) -> list[Embedded]:
        if not entered.is_set():  # hold the first batch until the test has queued the rest
            entered.set()
            assert gate.wait(30)
        return real_run(batch)

    monkeypatch.setattr(model, "_run", run)
    app = create_worker_app(
        context.settings, resources=EmbedderResources(context.settings, context)
    )
    bulk = [
        EmbedItems(items=[EmbedItem(item_id=f"{t}{n}", image=_put(context, d)) for n, d in
                          enumerate(_images(8, seed=20 * k))])
        for k, t in enumerate("ab")
    ]  # fmt: skip
    query = _put(context, _images(1, seed=99)[0], "uploads")
    with batching_worker(app, context.settings) as batcher:
        batches: list[list[int]] = []
        batcher.on_batch = lambda rows: batches.append([r.priority for r in rows])
        sent_bulk = [send(app, TaskName.EMBED_ITEMS, b) for b in bulk]
        assert entered.wait(30)
        # a's first 4 items are being inferred; b's first 4 wait in the queue.
        _wait_for(lambda: len(batcher._rows) >= 4, "bulk rows never queued")
        sent_query = send(app, TaskName.EMBED_QUERY, EmbedQuery(image=query))
        _wait_for(lambda: any(r.priority == Priority.QUERY for r in batcher._rows), "no query")
        gate.set()
        assert sent_query.get(timeout=60)["dim"] == 2048
        assert [r.get(timeout=60)["embedded"] for r in sent_bulk] == [8, 8]
    q = int(Priority.QUERY)
    assert batches[0] == [1, 1, 1, 1]
    assert batches[1][0] == q  # the very next model call starts with the query
    assert sum(b.count(q) for b in batches) == 1 and sum(map(len, batches)) == 17


# ---- a killed worker: its batch comes back, the poison message ends failed alone --------------

LAUNCHER = """
import json, os, signal, sys, time
from fashionrec_embedder import batching, worker
from fashionrec_shared.storage import LocalBlobStore
from fashionrec_embedder.settings import EmbedderSettings

settings = EmbedderSettings()
app = worker.create_worker_app(settings)
# Unacknowledged messages of a dead worker come back after 1 s (the test's restart is later).
app.conf.broker_transport_options = {"visibility_timeout": 1}
log = open(sys.argv[1], "a")
real = batching.Batcher._execute

def execute(self, batch):
    labels = [row.label for row in batch]
    log.write(json.dumps({"pid": os.getpid(), "labels": labels}) + "\\n")
    log.flush()
    if "culprit" in labels:  # this message kills its worker, whatever the batch
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch)

batching.Batcher._execute = execute
# Slow fetches, so every task of the burst is received before the first batch forms.
real_get = LocalBlobStore.get
LocalBlobStore.get = lambda self, key: (time.sleep(0.2), real_get(self, key))[1]
app.worker_main(worker.worker_argv(settings, "info"))
"""


def test_a_killed_workers_batch_is_redelivered_and_the_poison_message_fails_alone(
    tmp_path: Path, worker_redis: str
) -> None:
    blobs = tmp_path / "blobs"
    store = LocalBlobStore(blobs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASHIONREC_", "REDIS_URL"))}
    env.update(
        FASHIONREC_EMBEDDER_BACKBONE="resnet50",
        FASHIONREC_EMBEDDER_WEIGHTS="random:7",
        FASHIONREC_EMBEDDER_DEVICE="cpu",
        FASHIONREC_EMBEDDER_IMAGE_SIZE=str(SMALL),
        FASHIONREC_EMBEDDER_RUNTIME="torch",
        FASHIONREC_EMBEDDER_BATCHING="true",
        FASHIONREC_EMBEDDER_BATCH_SIZE="8",
        FASHIONREC_EMBEDDER_BATCH_WINDOW_MS="1000",
        FASHIONREC_EMBEDDER_CACHE_DIR=str(tmp_path / "cache"),
        FASHIONREC_BROKER_URL=worker_redis,
        FASHIONREC_STORAGE_BACKEND="local",
        FASHIONREC_STORAGE_LOCAL_DIR=str(blobs),
    )
    settings = small_settings(tmp_path, broker={"url": worker_redis})
    client_app = create_worker_app(settings)  # only sends
    refs = []
    for data in _images(5):
        key, digest = content_key("inventory", data, "png")
        store.put(key, data)
        refs.append(ImageRef(key=key, sha256=digest))
    culprit = EmbedItems(items=[EmbedItem(item_id="culprit", image=refs[0])])
    innocents = [EmbedItems(items=[EmbedItem(item_id=f"ok{i}", image=r)]) for i, r in
                 enumerate(refs[1:3])]  # fmt: skip
    sent = {"culprit": send(client_app, TaskName.EMBED_ITEMS, culprit, task_id="culprit")}
    for i, payload in enumerate(innocents):
        sent[f"ok{i}"] = send(client_app, TaskName.EMBED_ITEMS, payload, task_id=f"ok{i}")
    for i, ref in enumerate(refs[3:]):
        sent[f"q{i}"] = send(client_app, TaskName.EMBED_QUERY, EmbedQuery(image=ref),
                             task_id=f"q{i}")  # fmt: skip
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    batches_log = tmp_path / "batches.jsonl"
    client = redis.Redis.from_url(worker_redis)
    starts = 0
    worker_log = (tmp_path / "worker.log").open("ab")
    try:
        while not all(r.ready() for r in sent.values()):
            assert starts < MAX_DELIVERIES + 2, (
                "not all tasks ended: "
                f"{[n for n, r in sent.items() if not r.ready()]}; batches: "
                f"{batches_log.read_text() if batches_log.exists() else '-'}; queued "
                f"{client.llen(str(Queue.EMBED))}, unacked {client.hkeys('unacked')}"
            )
            starts += 1
            worker = subprocess.Popen(
                [sys.executable, str(launcher), str(batches_log)],
                env=env,
                cwd=tmp_path,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
            try:
                deadline = time.monotonic() + 120
                while worker.poll() is None and time.monotonic() < deadline:
                    if all(r.ready() for r in sent.values()):
                        break
                    time.sleep(0.1)
                assert worker.poll() in (None, -signal.SIGKILL), worker.returncode
            finally:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
                    worker.wait(60)
            time.sleep(1.2)  # past the visibility timeout: the dead worker's messages return
        results = {name: r.get(timeout=10) for name, r in sent.items()}
    finally:
        client.close()
        worker_log.close()
    batches = [json.loads(line)["labels"] for line in batches_log.read_text().splitlines()]
    # The first worker's batch with the culprit held its batch-mates too; it died with them.
    killed = next(i for i, labels in enumerate(batches) if "culprit" in labels)
    first = batches[killed]
    assert len(first) == 5, batches
    # The batch-mates came back (acks late), ran alone as suspects and succeeded: counted
    # twice, never blamed for the culprit's later kills.
    counts = redis.Redis.from_url(worker_redis)
    for name in ("ok0", "ok1", "q0", "q1"):
        deliveries = int(counts.get(deliveries_key(name)))
        assert deliveries == 2 if name in first else deliveries in (1, 2), (name, deliveries)
    counts.close()
    assert results["ok0"]["embedded"] == 1 and results["ok1"]["embedded"] == 1
    assert results["q0"]["dim"] == 2048 and results["q1"]["dim"] == 2048
    later = batches[killed + 1 :]
    # Suspects (the killed batch's rows, delivered again) never share a batch.
    assert all(len(labels) == 1 for labels in later if set(labels) & set(first)), batches
    # The culprit killed a worker on each of its MAX_DELIVERIES deliveries, then ended failed.
    assert sum(labels == ["culprit"] for labels in later) == MAX_DELIVERIES - 1
    assert results["culprit"]["poison"] and results["culprit"]["failed"] == 1
    assert starts == MAX_DELIVERIES + 1
