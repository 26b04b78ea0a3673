"""The indexer's Celery tasks through Celery's own retry path and a real worker, against real
Redis and Postgres."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import current_app
from celery.contrib.testing.worker import start_worker
from fashionrec_indexer import repository as repo
from fashionrec_indexer import worker
from fashionrec_indexer.schema import items
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_indexer.upserts import upsert_items
from fashionrec_indexer.worker import create_worker_app
from fashionrec_shared.celery_app import send
from fashionrec_shared.schemas import ItemMetadata, UpsertItem
from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.tasks import (
    EmbedItems,
    ItemEmbedding,
    Queue,
    StoreEmbeddings,
    SweepPending,
    TaskName,
)
from fashionrec_shared.vectors import encode_vector
from sqlalchemy import Engine, func, update
from sqlalchemy.exc import OperationalError

from tests.indexer.conftest import DIM, MODEL, image_for, random_vectors, upsert


def _settings(migrated_url: str, redis_url: str, tmp_path: Path) -> IndexerSettings:
    return IndexerSettings(
        database_url=migrated_url,
        broker=BrokerSettings(url=redis_url),
        index_dir=tmp_path / "cache",
    )


def test_transient_database_errors_within_max_retries_do_not_poison_a_valid_item(
    engine: Engine,
    migrated_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries re-send the message under the same task id: they are not redeliveries."""
    app = create_worker_app(_settings(migrated_url, redis_url, tmp_path))
    task = app.tasks[str(TaskName.STORE_EMBEDDINGS)]
    item_id, image = upsert(engine, "A")
    payload = StoreEmbeddings(
        model_version=MODEL,
        dim=DIM,
        embeddings=[
            ItemEmbedding(
                item_id=str(item_id),
                image_sha256=image.sha256,
                vector=encode_vector(random_vectors(1)[0]),
            )
        ],
    ).model_dump(mode="json")

    real_store = worker.store_embeddings
    attempts: list[int] = []

    def database_down_three_times(*args: object, **kwargs: object) -> object:
        attempts.append(len(attempts))
        if len(attempts) <= task.max_retries:
            raise OperationalError(
                "INSERT INTO embeddings ...", {}, Exception("server closed the connection")
            )
        return real_store(*args, **kwargs)

    monkeypatch.setattr(worker, "store_embeddings", database_down_three_times)
    # Eager apply runs Celery's autoretry: each retry is applied again with retries + 1.
    result = task.apply(args=[payload], task_id="t-flaky")

    assert result.successful(), result.traceback
    with engine.connect() as conn:
        row = repo.get_item(conn, item_id)
    assert (row.status, row.error) == ("indexed", None)
    assert result.get()["status"] == "ok" and result.get()["indexed"] == 1
    assert len(attempts) == task.max_retries + 1


# ---- the pending sweep through a real worker -------------------------------------------------


def _age_items(engine: Engine, seconds: float = 3600) -> None:
    """Every item's upsert and last re-queue `seconds` older (state, not waiting)."""
    ago = func.make_interval(0, 0, 0, 0, 0, 0, seconds)
    with engine.begin() as conn:
        conn.execute(
            update(items).values(
                updated_at=items.c.updated_at - ago, requeued_at=items.c.requeued_at - ago
            )
        )


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _status(engine: Engine, item_id: str) -> str:
    with engine.connect() as conn:
        return repo.get_item(conn, repo.parse_uuid(item_id)).status


def sorted_items(task: EmbedItems) -> list:
    return sorted(task.items, key=lambda item: item.item_id)


def test_the_beat_runs_the_pending_sweep_on_its_interval(
    migrated_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = _settings(migrated_url, redis_url, tmp_path).model_copy(
        update={"pending_sweep_interval_s": 42.0}
    )
    entry = create_worker_app(settings).conf.beat_schedule["indexer-pending-sweep"]
    assert entry["task"] == str(TaskName.SWEEP_PENDING) and entry["schedule"] == 42.0
    assert entry["options"] == {"queue": "index"}


def test_lost_embed_tasks_end_indexed_or_failed_through_a_real_worker(
    engine: Engine, migrated_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Two accepted items whose EMBED_ITEMS were lost (never sent). The sweep re-sends them to
    an embedder stand-in on the real broker: one is embedded, the other's task is lost again
    every time (as when its embedder dies on it) until the sweep gives up on it."""
    settings = _settings(migrated_url, redis_url, tmp_path).model_copy(
        update={"pending_timeout_s": 60.0, "pending_max_requeues": 2}
    )
    app = create_worker_app(settings)
    bad = image_for("never-embedded")
    received: list[EmbedItems] = []

    @app.task(name=str(TaskName.EMBED_ITEMS), shared=False)
    def embedder_stand_in(raw: dict) -> None:
        request = EmbedItems.model_validate(raw)
        received.append(request)
        done = [i for i in request.items if i.image.sha256 != bad.sha256]
        if done:
            store = StoreEmbeddings(
                job_id=request.job_id,
                model_version=MODEL,
                dim=DIM,
                embeddings=[
                    ItemEmbedding(
                        item_id=i.item_id,
                        image_sha256=i.image.sha256,
                        vector=encode_vector(random_vectors(1)[0]),
                    )
                    for i in done
                ],
            )
            send(app, TaskName.STORE_EMBEDDINGS, store)

    plan = upsert_items(
        engine,
        [
            UpsertItem(metadata=ItemMetadata(sku="GOOD"), image=image_for("GOOD")),
            UpsertItem(metadata=ItemMetadata(sku="BAD"), image=bad),
        ],
        None,
    )  # its plan.embed is never sent: lost with a broker flush
    good_id, bad_id = (r.item_id for r in plan.results)
    [original] = plan.embed

    def sweep() -> dict:
        return send(app, TaskName.SWEEP_PENDING, SweepPending()).get(timeout=60)

    previous = current_app._get_current_object()
    try:
        with start_worker(
            app,
            pool="solo",
            perform_ping_check=False,
            shutdown_timeout=30,
            queues=[str(Queue.INDEX), str(Queue.EMBED)],
        ):
            assert sweep()["requeued"] == 0  # accepted just now: not overdue
            _age_items(engine)
            assert sweep() == {"status": "ok", "requeued": 2, "failed": 0, "embed_tasks": 1}
            _wait_for(lambda: _status(engine, good_id) == "indexed", "GOOD never indexed")
            # The very task the upsert would have sent (its items in another order).
            [resent] = received
            assert resent.model_copy(update={"items": sorted_items(resent)}) == original.model_copy(
                update={"items": sorted_items(original)}
            )
            _age_items(engine)  # BAD's re-sent task was lost again
            assert sweep()["requeued"] == 1  # its 2nd and last re-queue
            _wait_for(lambda: len(received) == 2, "BAD never re-sent")
            _age_items(engine)
            assert sweep() == {"status": "ok", "requeued": 0, "failed": 1, "embed_tasks": 0}
    finally:
        previous.set_current()
    assert [i.item_id for i in received[-1].items] == [bad_id]
    assert received[-1].job_id == str(plan.job_id)
    with engine.connect() as conn:
        failed = repo.get_item(conn, repo.parse_uuid(bad_id))
        job = repo.job_summary(conn, plan.job_id)
    assert failed.status == "failed" and "not embedded after 2 re-queues" in failed.error
    assert (job["status"], job["done"], job["failed"]) == ("completed", 1, 1)
    assert job["errors"][0]["error"] == failed.error


def test_the_sweep_waits_while_the_embed_queue_has_a_backlog(
    engine: Engine, migrated_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Items behind a long ingest are waiting their turn, not lost: nothing is counted."""
    app = create_worker_app(_settings(migrated_url, redis_url, tmp_path))
    item_id, _ = upsert(engine, "WAITING")
    _age_items(engine)
    task = app.tasks[str(TaskName.SWEEP_PENDING)]
    send(app, TaskName.EMBED_ITEMS, EmbedItems(items=[]))  # queued, no embedder running
    assert task.apply(args=[SweepPending().model_dump()]).get() == {
        "status": "deferred",
        "embed_backlog": 1,
    }
    redis.Redis.from_url(redis_url).delete(str(Queue.EMBED))  # the backlog drained
    assert task.apply(args=[SweepPending().model_dump()]).get()["requeued"] == 1
    with engine.connect() as conn:
        assert repo.get_item(conn, item_id).requeues == 1
