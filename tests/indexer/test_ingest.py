from __future__ import annotations

import uuid

import numpy as np
import redis
from fashionrec_indexer import repository as repo
from fashionrec_indexer.ingest import store_embeddings
from fashionrec_indexer.schema import embeddings
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_indexer.worker import create_worker_app
from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.tasks import ItemEmbedding, ItemFailure, StoreEmbeddings, TaskName
from fashionrec_shared.vectors import encode_vector
from sqlalchemy import Engine, func, select

from tests.indexer.conftest import DIM, MODEL, embed, random_vectors, upsert


def _job(engine: Engine) -> uuid.UUID:
    with engine.begin() as conn:
        return repo.create_job(conn, "ingest")


def _summary(engine: Engine, job_id: uuid.UUID) -> dict:
    with engine.connect() as conn:
        return repo.job_summary(conn, job_id)


def test_job_counts_are_derived_and_idempotent_under_redelivery(engine: Engine) -> None:
    job_id = _job(engine)
    assert _summary(engine, job_id)["status"] == "queued"  # nothing attached yet
    ids = [upsert(engine, f"SKU-{i}", job_id=job_id) for i in range(3)]
    summary = _summary(engine, job_id)
    assert (summary["status"], summary["total"], summary["done"]) == ("queued", 3, 0)

    vectors = random_vectors(3)
    payload = StoreEmbeddings(
        job_id=str(job_id),
        model_version=MODEL,
        dim=DIM,
        embeddings=[
            ItemEmbedding(item_id=str(i), image_sha256=img.sha256, vector=encode_vector(v))
            for (i, img), v in zip(ids[:2], vectors[:2], strict=True)
        ],
        failures=[ItemFailure(item_id=str(ids[2][0]), error="cannot decode image")],
    )
    store_embeddings(engine, payload)
    store_embeddings(engine, payload)  # redelivered: nothing changes

    summary = _summary(engine, job_id)
    assert summary["status"] == "completed"
    assert (summary["total"], summary["done"], summary["failed"]) == (3, 2, 1)
    assert summary["errors"] == [
        {"item_id": str(ids[2][0]), "sku": "SKU-2", "error": "cannot decode image"}
    ]
    with engine.connect() as conn:
        assert repo.get_item(conn, ids[0][0]).status == "indexed"
        failed = repo.get_item(conn, ids[2][0])
        assert (failed.status, failed.error) == ("failed", "cannot decode image")
        assert conn.execute(select(func.count()).select_from(embeddings)).scalar_one() == 2


def test_running_and_failed_job_status(engine: Engine) -> None:
    job_id = _job(engine)
    a = upsert(engine, "A", job_id=job_id)
    b = upsert(engine, "B", job_id=job_id)
    store_embeddings(
        engine,
        StoreEmbeddings(
            job_id=str(job_id),
            model_version=MODEL,
            dim=DIM,
            failures=[ItemFailure(item_id=str(a[0]), error="boom")],
        ),
    )
    assert _summary(engine, job_id)["status"] == "running"
    store_embeddings(
        engine,
        StoreEmbeddings(
            job_id=str(job_id),
            model_version=MODEL,
            dim=DIM,
            failures=[ItemFailure(item_id=str(b[0]), error="boom")],
        ),
    )
    assert _summary(engine, job_id)["status"] == "failed"


def test_same_image_is_embedded_once_and_reused_on_upsert(engine: Engine) -> None:
    first, image = upsert(engine, "A", "shared-image")
    embed(engine, first, image, random_vectors(1)[0])
    second, _ = upsert(engine, "B", "shared-image")  # same image, another sku
    with engine.connect() as conn:
        assert repo.get_item(conn, second).status == "indexed"  # no embedding task needed
        assert conn.execute(select(func.count()).select_from(embeddings)).scalar_one() == 1


def test_embedding_of_a_replaced_image_does_not_mark_the_item(engine: Engine) -> None:
    item_id, old_image = upsert(engine, "A", "old")
    upsert(engine, "A", "new")
    embed(engine, item_id, old_image, random_vectors(1)[0])
    with engine.connect() as conn:
        assert repo.get_item(conn, item_id).status == "pending"


def test_bad_vector_fails_the_item(engine: Engine) -> None:
    item_id, image = upsert(engine, "A")
    store_embeddings(
        engine,
        StoreEmbeddings(
            model_version=MODEL,
            dim=DIM,
            embeddings=[
                ItemEmbedding(
                    item_id=str(item_id),
                    image_sha256=image.sha256,
                    vector=encode_vector(np.ones(DIM - 1)),
                )
            ],
        ),
    )
    with engine.connect() as conn:
        assert repo.get_item(conn, item_id).status == "failed"


def test_task_guards_poison_messages_and_requests_builds(
    engine: Engine, migrated_url: str, redis_url: str, tmp_path
) -> None:
    settings = IndexerSettings(
        database_url=migrated_url,
        broker=BrokerSettings(url=redis_url),
        index_dir=tmp_path / "cache",
        rebuild_min_new=1,
    )
    app = create_worker_app(settings)
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
    result = task.apply(args=[payload], task_id="t-1").get()
    assert result["status"] == "ok" and result["indexed"] == 1
    assert result["build_requested"] is True
    client = redis.Redis.from_url(redis_url)
    assert client.llen("index") == 1  # BUILD_INDEX sent on the index queue

    poison_item, _ = upsert(engine, "B")
    poison = StoreEmbeddings(
        model_version=MODEL,
        dim=DIM,
        failures=[ItemFailure(item_id=str(poison_item), error="x")],
    ).model_dump(mode="json")
    for _ in range(3):
        client.incr("fashionrec:deliveries:t-2")
    assert task.apply(args=[poison], task_id="t-2").get() == {"status": "poison"}
    with engine.connect() as conn:
        row = repo.get_item(conn, poison_item)
    assert row.status == "failed" and "gave up" in row.error
