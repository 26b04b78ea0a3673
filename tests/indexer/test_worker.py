"""The indexer's Celery tasks through Celery's own retry path, against real Redis and Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest
from fashionrec_indexer import repository as repo
from fashionrec_indexer import worker
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_indexer.worker import create_worker_app
from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.tasks import ItemEmbedding, StoreEmbeddings, TaskName
from fashionrec_shared.vectors import encode_vector
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from tests.indexer.conftest import DIM, MODEL, random_vectors, upsert


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
