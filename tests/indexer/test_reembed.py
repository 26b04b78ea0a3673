"""Model changes in the indexer: MODEL_ONLINE opens a re-embed job, its results complete it,
the build of the new version is requested only then, and searches never mix versions."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from alembic import command
from fashionrec_indexer import repository as repo
from fashionrec_indexer.api import create_app
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.db import alembic_config, make_engine
from fashionrec_indexer.ingest import give_up, store_embeddings
from fashionrec_indexer.model_change import REEMBED_BATCH, model_online
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_indexer.worker import create_worker_app
from fashionrec_shared.settings import BrokerSettings, StorageSettings
from fashionrec_shared.storage import LocalBlobStore
from fashionrec_shared.tasks import (
    EmbedItems,
    ItemEmbedding,
    ItemFailure,
    ModelOnline,
    StoreEmbeddings,
    TaskName,
)
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text

from tests.indexer.conftest import DIM, MODEL, add_item, embed, random_vectors, upsert

NEW = "test-model-v2"
N = 20


def online(engine: Engine, version: str = NEW):  # type: ignore[no-untyped-def]
    return model_online(engine, ModelOnline(model_version=version, dim=DIM, hostname="h"))


def new_vectors_for(batch: EmbedItems, seed: int = 1) -> StoreEmbeddings:
    """What an embedder holding NEW answers to one EMBED_ITEMS of a re-embed job."""
    vectors = random_vectors(len(batch.items), seed=seed)
    return StoreEmbeddings(
        job_id=batch.job_id,
        model_version=str(batch.model_version),
        dim=DIM,
        embeddings=[
            ItemEmbedding(
                item_id=item.item_id, image_sha256=item.image.sha256, vector=encode_vector(v)
            )
            for item, v in zip(batch.items, vectors, strict=True)
        ],
    )


@pytest.fixture
def inventory(engine: Engine, store: LocalBlobStore) -> list[uuid.UUID]:
    """N items embedded with MODEL and built: MODEL is the served version."""
    ids = [add_item(engine, f"S{i:02d}", v) for i, v in enumerate(random_vectors(N))]
    assert build_index(engine, store, n_trees=2, settle_s=0).status == "ready"
    return ids


def item_state(engine: Engine) -> dict[uuid.UUID, tuple[str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(select(repo.items.c.id, repo.items.c.status, repo.items.c.change_seq))
        return {r.id: (r.status, r.change_seq) for r in rows}


# ---- migration -------------------------------------------------------------------------------


def test_migration_0002_adds_the_job_model_version_and_downgrades(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0001")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO jobs (kind) VALUES ('ingest')"))
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT kind, model_version FROM jobs")).one() == (
                "ingest",
                None,
            )
        command.downgrade(config, "0001")
        with engine.connect() as conn:
            columns = conn.execute(
                text("SELECT column_name FROM information_schema.columns WHERE table_name='jobs'")
            ).scalars()
            assert "model_version" not in set(columns)
    finally:
        engine.dispose()


# ---- MODEL_ONLINE ----------------------------------------------------------------------------


def test_served_or_unknown_versions_start_nothing(engine: Engine, store: LocalBlobStore) -> None:
    assert online(engine).embed == []  # nothing stored yet: nothing to re-embed
    add_item(engine, "only", random_vectors(1)[0])
    plan = online(engine, MODEL)
    assert plan.embed == [] and plan.build is None and "served" in plan.detail


def test_a_new_version_opens_one_reembed_job_in_batches(
    engine: Engine, inventory: list[uuid.UUID]
) -> None:
    plan = online(engine)
    assert plan.job_id is not None and plan.build is None
    assert [len(b.items) for b in plan.embed] == [REEMBED_BATCH, N - REEMBED_BATCH]
    assert {b.model_version for b in plan.embed} == {NEW}
    assert {b.job_id for b in plan.embed} == {str(plan.job_id)}
    assert {uuid.UUID(i.item_id) for b in plan.embed for i in b.items} == set(inventory)
    with engine.connect() as conn:
        job = repo.get_job(conn, plan.job_id)
        assert (job.kind, job.model_version) == ("reembed", NEW)
        summary = repo.job_summary(conn, plan.job_id)
        assert (summary["status"], summary["total"], summary["done"]) == ("queued", N, 0)
    # Every embedder process announces: the job is not opened twice.
    again = online(engine)
    assert again.embed == [] and again.job_id == plan.job_id


def test_concurrent_announcements_open_a_single_job(
    engine: Engine, inventory: list[uuid.UUID]
) -> None:
    plans = []
    barrier = threading.Barrier(4)

    def announce() -> None:
        barrier.wait()
        plans.append(online(engine))

    threads = [threading.Thread(target=announce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for p in plans if p.embed) == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs WHERE kind='reembed'")).scalar() == 1


def test_a_stalled_job_is_sent_again(engine: Engine, inventory: list[uuid.UUID]) -> None:
    plan = online(engine)
    store_embeddings(engine, new_vectors_for(plan.embed[0]))
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = :id"),
            {"id": plan.job_id},
        )
    again = online(engine)
    assert again.job_id == plan.job_id
    assert [len(b.items) for b in again.embed] == [N - REEMBED_BATCH]  # only the queued ones


# ---- STORE_EMBEDDINGS of a re-embed job, builds -------------------------------------------------


def test_reembed_results_complete_the_job_then_request_the_build(
    engine: Engine, store: LocalBlobStore, inventory: list[uuid.UUID]
) -> None:
    before = item_state(engine)
    plan = online(engine)
    first = store_embeddings(engine, new_vectors_for(plan.embed[0]))
    assert first.plan is not None and first.plan.build is None and first.plan.embed == []
    # Items keep their status and change_seq: the served index and its delta see no change.
    assert item_state(engine) == before
    with engine.connect() as conn:
        summary = repo.job_summary(conn, plan.job_id)
        assert (summary["status"], summary["done"]) == ("running", REEMBED_BATCH)
        assert repo.active_model_version(conn) == MODEL
    # A timer build meanwhile builds the served version, never the half-embedded new one.
    timer = build_index(engine, store, n_trees=2, settle_s=0, force=True, reason="timer")
    assert timer.manifest["model_version"] == MODEL and timer.manifest["item_count"] == N

    last = store_embeddings(engine, new_vectors_for(plan.embed[1], seed=2))
    assert last.plan.build is not None
    assert last.plan.build.model_dump() == {
        "reason": "model change",
        "force": True,
        "model_version": NEW,
    }
    with engine.connect() as conn:
        summary = repo.job_summary(conn, plan.job_id)
        assert (summary["status"], summary["done"], summary["total"]) == ("completed", N, N)
    # A redelivered store changes nothing and asks for no second build.
    assert store_embeddings(engine, new_vectors_for(plan.embed[1], seed=2)).plan.build is None

    built = build_index(engine, store, n_trees=2, settle_s=0, **last.plan.build.model_dump())
    assert built.manifest["model_version"] == NEW and built.manifest["item_count"] == N
    with engine.connect() as conn:
        assert repo.active_model_version(conn) == NEW
    # After the swap a plain build keeps the new version.
    again = build_index(engine, store, n_trees=2, settle_s=0, force=True)
    assert again.manifest["model_version"] == NEW
    assert online(engine).embed == []


def test_building_a_version_without_vectors_is_skipped(
    engine: Engine, store: LocalBlobStore, inventory: list[uuid.UUID]
) -> None:
    result = build_index(engine, store, settle_s=0, force=True, model_version="nope")
    assert result.status == "skipped" and "nope" in result.detail


def test_items_added_during_the_change_are_caught_up_before_the_build(
    engine: Engine, inventory: list[uuid.UUID]
) -> None:
    plan = online(engine)
    # Added meanwhile and embedded by a process that only had the old model.
    late_id, late_image = upsert(engine, "late")
    embed(engine, late_id, late_image, random_vectors(1, seed=9)[0])
    store_embeddings(engine, new_vectors_for(plan.embed[0]))
    done = store_embeddings(engine, new_vectors_for(plan.embed[1]))
    assert done.plan.build is None
    [catch_up] = done.plan.embed
    assert [i.item_id for i in catch_up.items] == [str(late_id)]
    final = store_embeddings(engine, new_vectors_for(catch_up, seed=5))
    assert final.plan.build is not None and final.plan.build.model_version == NEW
    with engine.connect() as conn:
        assert repo.job_summary(conn, plan.job_id)["total"] == N + 1


def test_too_many_failures_keep_the_old_model(engine: Engine, inventory: list[uuid.UUID]) -> None:
    plan = online(engine)
    store_embeddings(engine, new_vectors_for(plan.embed[0]))
    batch = plan.embed[1]
    result = new_vectors_for(batch)
    result.failures = [ItemFailure(item_id=result.embeddings[0].item_id, error="broken")]
    result.embeddings = result.embeddings[1:]
    outcome = store_embeddings(engine, result)
    assert outcome.plan.build is None and "not switching" in outcome.plan.detail
    with engine.connect() as conn:
        failed_id = uuid.UUID(result.failures[0].item_id)
        assert repo.get_item(conn, failed_id).status == "indexed"  # still served by MODEL
        assert repo.job_summary(conn, plan.job_id)["failed"] == 1
    # An embedder restart announces again: a new job retries just the failed item.
    retry = online(engine)
    assert retry.job_id != plan.job_id
    assert [i.item_id for b in retry.embed for i in b.items] == [str(failed_id)]


def test_poison_results_of_a_reembed_job_only_fail_the_job_entries(
    engine: Engine, inventory: list[uuid.UUID]
) -> None:
    plan = online(engine)
    store_embeddings(engine, new_vectors_for(plan.embed[0]))
    final = give_up(engine, new_vectors_for(plan.embed[1]), "gave up after 3 deliveries")
    assert final is not None and final.build is None  # 4 of 20 failed
    with engine.connect() as conn:
        assert repo.job_summary(conn, plan.job_id)["failed"] == N - REEMBED_BATCH
        assert {repo.get_item(conn, i).status for i in inventory} == {"indexed"}


def test_before_the_first_build_a_version_being_reembedded_is_not_served(engine: Engine) -> None:
    for i, v in enumerate(random_vectors(4)):
        add_item(engine, f"U{i}", v)
    plan = online(engine)
    half = new_vectors_for(plan.embed[0])
    half.embeddings = half.embeddings[:2]
    store_embeddings(engine, half)  # the newest embeddings are NEW now
    with engine.connect() as conn:
        assert repo.active_model_version(conn) == MODEL
        assert repo.unbuilt_model(conn) == (MODEL, DIM)
    done = store_embeddings(engine, new_vectors_for(plan.embed[0]))
    assert done.plan.build is not None
    with engine.connect() as conn:
        assert repo.active_model_version(conn) == NEW


# ---- the API during a change -----------------------------------------------------------------


@pytest.fixture
def client(migrated_url: str, redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = IndexerSettings(
        database_url=migrated_url,
        broker=BrokerSettings(url=redis_url),
        storage=StorageSettings(backend="local", local_dir=tmp_path / "blobs"),
        index_dir=tmp_path / "cache",
        refresh_interval_s=0.05,
        settle_s=0,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def wait_for(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def query(client: TestClient, version: str, vector: np.ndarray) -> dict:
    response = client.post(
        "/search", json={"vector": encode_vector(vector), "model_version": version, "k": 5}
    )
    return {"status": response.status_code, **response.json()}


def test_api_serves_the_old_version_until_the_new_build_is_swapped_in(
    engine: Engine, store: LocalBlobStore, inventory: list[uuid.UUID], client: TestClient
) -> None:
    wait_for(lambda: client.get("/index").json().get("index_version") is not None)
    info = client.get("/index").json()
    assert info["model_version"] == MODEL and info["pending_model_version"] is None
    vector = random_vectors(1, seed=42)[0]

    plan = online(engine)
    info = client.get("/index").json()
    assert info["pending_model_version"] == NEW and info["reembed_job_id"] == str(plan.job_id)
    assert client.get(f"/jobs/{plan.job_id}").json()["kind"] == "reembed"
    store_embeddings(engine, new_vectors_for(plan.embed[0]))
    during = query(client, MODEL, vector)
    assert during["status"] == 200 and len(during["results"]) == 5
    rejected = query(client, NEW, vector)
    assert rejected["status"] == 409 and rejected["model_version"] == MODEL

    # An item uploaded now needs a vector of the coming version too, even if its image has one
    # of the served version already.
    response = client.post(
        "/items",
        json={
            "metadata": {"sku": "copy", "title": "t"},
            "image": plan.embed[1].items[0].image.model_dump(),  # not re-embedded yet
        },
    )
    assert response.status_code == 200 and response.json()["embed_queued"] is True

    # The batch embeds that image for the new version: the copy needs no catch-up.
    final = store_embeddings(engine, new_vectors_for(plan.embed[1]))
    assert final.plan.embed == [] and final.plan.build is not None
    # Still the old version until the build is ready.
    assert query(client, MODEL, vector)["status"] == 200
    build_index(engine, store, n_trees=2, settle_s=0, **final.plan.build.model_dump())
    wait_for(lambda: client.get("/index").json()["model_version"] == NEW)
    info = client.get("/index").json()
    assert info["pending_model_version"] is None and info["reembed_job_id"] is None
    after = query(client, NEW, vector)
    assert after["status"] == 200 and after["model_version"] == NEW
    assert len(after["results"]) == 5 and len(after["results"]) == len(
        {r["item_id"] for r in after["results"]}
    )
    stale = query(client, MODEL, vector)
    assert stale["status"] == 409 and stale["model_version"] == NEW
    job = client.get(f"/jobs/{plan.job_id}").json()
    assert job["status"] == "completed" and job["done"] == job["total"] == N


# ---- the Celery tasks ------------------------------------------------------------------------


def pop_tasks(client: redis.Redis, queue: str) -> list[tuple[str, dict]]:
    tasks = []
    while (raw := client.rpop(queue)) is not None:
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        tasks.append((message["headers"]["task"], args[0]))
    return tasks


def test_worker_tasks_drive_a_model_change_end_to_end(
    engine: Engine, inventory: list[uuid.UUID], migrated_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = IndexerSettings(
        database_url=migrated_url,
        broker=BrokerSettings(url=redis_url),
        storage=StorageSettings(backend="local", local_dir=tmp_path / "blobs"),
        index_dir=tmp_path / "cache",
        settle_s=0,
    )
    app = create_worker_app(settings)
    client = redis.Redis.from_url(redis_url)
    announce = ModelOnline(model_version=NEW, dim=DIM, hostname="h").model_dump(mode="json")
    online_task = app.tasks[str(TaskName.MODEL_ONLINE)]
    first = online_task.apply(args=[announce], task_id="m-1").get()
    assert first["embed_tasks"] == 2 and first["job_id"]
    assert online_task.apply(args=[announce], task_id="m-2").get()["embed_tasks"] == 0
    sent = pop_tasks(client, "embed")
    assert [name for name, _ in sent] == [str(TaskName.EMBED_ITEMS)] * 2

    store_task = app.tasks[str(TaskName.STORE_EMBEDDINGS)]
    results = [
        store_task.apply(
            args=[new_vectors_for(EmbedItems.model_validate(p), seed=n).model_dump(mode="json")],
            task_id=f"s-{n}",
        ).get()
        for n, (_, p) in enumerate(sent)
    ]
    assert [r["build_requested"] for r in results] == [False, True]
    [(name, build)] = pop_tasks(client, "index")
    assert name == str(TaskName.BUILD_INDEX) and build["model_version"] == NEW

    built = app.tasks[str(TaskName.BUILD_INDEX)].apply(args=[build], task_id="b-1").get()
    assert built["status"] == "ready"
    with engine.connect() as conn:
        assert repo.active_model_version(conn) == NEW
    client.close()
