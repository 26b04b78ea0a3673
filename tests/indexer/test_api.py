from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fashionrec_indexer.api import create_app
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_shared.problems import PROBLEM_JSON
from fashionrec_shared.settings import BrokerSettings, StorageSettings
from fashionrec_shared.storage import LocalBlobStore
from fashionrec_shared.tasks import TaskName
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.indexer.conftest import DIM, MODEL, SCORE_ATOL, add_item, image_for, random_vectors


@pytest.fixture
def settings(migrated_url: str, redis_url: str, tmp_path: Path) -> IndexerSettings:
    return IndexerSettings(
        database_url=migrated_url,
        broker=BrokerSettings(url=redis_url),
        storage=StorageSettings(backend="local", local_dir=tmp_path / "blobs"),
        index_dir=tmp_path / "cache",
        refresh_interval_s=0.05,
        settle_s=0,
    )


@pytest.fixture
def client(settings: IndexerSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "indexer never became ready"
            time.sleep(0.02)
        yield client


def problem(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status and body["title"]
    return body


def item_body(sku: str, tag: str | None = None, job_id: str | None = None) -> dict:
    return {
        "metadata": {"sku": sku, "title": "t", "category": "shoes", "price": 12.5},
        "image": image_for(tag or sku).model_dump(),
        "job_id": job_id,
    }


def query(vector: np.ndarray, k: int = 5, model: str = MODEL, **filters) -> dict:  # type: ignore[no-untyped-def]
    return {"vector": encode_vector(vector), "model_version": model, "k": k, "filters": filters}


def test_health_and_empty_inventory(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "model_version": None, "index_version": None, "items": 0}
    response = client.post("/search", json=query(random_vectors(1)[0], model="whatever"))
    assert response.status_code == 200
    assert response.json() == {"results": [], "model_version": "whatever", "index_version": None}
    assert "fashionrec_indexer_search_seconds" in client.get("/metrics").text


def test_post_item_queues_embedding_and_job(client: TestClient, redis_url: str) -> None:
    response = client.post("/items", json=item_body("SKU-1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["created"] is True and body["embed_queued"] is True
    messages = redis.Redis.from_url(redis_url).lrange("embed", 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == str(TaskName.EMBED_ITEMS)
    args = json.loads(base64.b64decode(message["body"]))[0][0]
    assert args["items"] == [{"item_id": body["item_id"], "image": item_body("SKU-1")["image"]}]
    assert args["job_id"] == body["job_id"]

    again = client.post("/items", json=item_body("SKU-1")).json()
    assert again["item_id"] == body["item_id"] and again["created"] is False

    item = client.get(f"/items/{body['item_id']}").json()
    assert item["sku"] == "SKU-1" and item["status"] == "pending" and item["price"] == 12.5
    job = client.get(f"/jobs/{body['job_id']}").json()
    assert (job["status"], job["total"], job["done"]) == ("queued", 1, 0)


def test_known_embedding_indexes_at_once(client: TestClient, engine: Engine, redis_url) -> None:  # type: ignore[no-untyped-def]
    add_item(engine, "A", random_vectors(1)[0])  # embeds image of "A"
    job = client.post("/jobs", json={"kind": "ingest"})
    assert job.status_code == 201
    job_id = job.json()["job_id"]
    body = client.post("/items", json=item_body("B", tag="A", job_id=job_id)).json()
    assert body["embed_queued"] is False and body["job_id"] == job_id
    assert redis.Redis.from_url(redis_url).llen("embed") == 0
    assert client.get(f"/items/{body['item_id']}").json()["status"] == "indexed"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "completed"


def test_not_found_problems(client: TestClient) -> None:
    problem(client.post("/items", json=item_body("X", job_id=str(uuid.uuid4()))), 404)
    problem(client.post("/items", json=item_body("X", job_id="nope")), 404)
    problem(client.get(f"/items/{uuid.uuid4()}"), 404)
    problem(client.get("/items/not-a-uuid"), 404)
    problem(client.delete(f"/items/{uuid.uuid4()}"), 404)
    problem(client.get(f"/items/{uuid.uuid4()}/similar"), 404)
    problem(client.get(f"/jobs/{uuid.uuid4()}"), 404)
    problem(client.get("/jobs/zzz"), 404)


def test_validation_problems(client: TestClient, engine: Engine) -> None:
    add_item(engine, "A", random_vectors(1)[0])
    problem(client.post("/search", json=query(np.ones(DIM + 1))), 422)
    bad = query(np.ones(DIM))
    bad["vector"] = "%%%not base64"
    problem(client.post("/search", json=bad), 422)
    nan = np.ones(DIM, dtype=np.float32)
    nan[0] = np.nan
    problem(client.post("/search", json=query(nan)), 422)
    problem(client.post("/search", json=query(np.zeros(DIM))), 422)
    problem(client.post("/search", json=query(np.ones(DIM), k=0)), 422)
    problem(client.post("/search", json={"vector": "AAAA"}), 422)
    problem(client.post("/items", json={"metadata": {"sku": ""}, "image": {}}), 422)
    problem(client.post("/jobs", json={"kind": "Bad Kind"}), 422)
    body = problem(client.post("/search", json=query(np.ones(DIM), model="other")), 409)
    assert body["model_version"] == MODEL


def test_search_similar_delete_and_index(
    client: TestClient, engine: Engine, settings: IndexerSettings, redis_url: str
) -> None:
    vectors = random_vectors(12)
    ids = [add_item(engine, f"S{i}", v, category="c", price=i) for i, v in enumerate(vectors)]
    store = LocalBlobStore(settings.storage.local_dir)
    manifest = build_index(engine, store, n_trees=5, settle_s=0).manifest
    deadline = time.monotonic() + 10
    while client.get("/index").json()["index_version"] != manifest["build_id"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    info = client.get("/index").json()
    assert info["items_in_index"] == 12 and info["items_since_build"] == 0
    assert info["model_version"] == MODEL and info["built_at"]

    response = client.post("/search", json=query(vectors[2], k=4)).json()
    assert response["index_version"] == manifest["build_id"]
    results = response["results"]
    assert results[0]["item_id"] == str(ids[2])
    assert len(results) == 4 and results[0]["score"] == pytest.approx(1.0, abs=SCORE_ATOL)
    assert results[0]["image"] == image_for("S2").model_dump()

    similar = client.get(f"/items/{ids[2]}/similar", params={"k": 3}).json()["results"]
    assert len(similar) == 3 and str(ids[2]) not in {r["item_id"] for r in similar}
    assert client.get(f"/items/{ids[2]}/similar", params={"max_price": 1}).json()["results"]
    problem(client.get(f"/items/{ids[2]}/similar", params={"k": 51}), 422)

    assert client.delete(f"/items/{ids[2]}").status_code == 204
    problem(client.get(f"/items/{ids[2]}"), 404)
    results = client.post("/search", json=query(vectors[2], k=12)).json()["results"]
    assert len(results) == 11 and str(ids[2]) not in {r["item_id"] for r in results}
    assert client.get("/readyz").json()["items"] == 11
    assert client.get("/index").json()["items_since_build"] == 1

    pending = client.post("/items", json=item_body("PENDING")).json()["item_id"]
    problem(client.get(f"/items/{pending}/similar"), 409)

    accepted = client.post("/index/rebuild")
    assert accepted.status_code == 202 and accepted.json()["task_id"]
    message = json.loads(redis.Redis.from_url(redis_url).lrange("index", 0, -1)[0])
    assert message["headers"]["task"] == str(TaskName.BUILD_INDEX)


def _embed_messages(redis_url: str) -> list[dict]:
    out = []
    for raw in redis.Redis.from_url(redis_url).lrange("embed", 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == str(TaskName.EMBED_ITEMS)
        out.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return out


def test_batch_upsert_sends_one_embed_task_per_32_items(
    client: TestClient, engine: Engine, redis_url: str
) -> None:
    add_item(engine, "KNOWN", random_vectors(1)[0])  # its image is embedded already
    items = [item_body(f"B-{n}") for n in range(40)] + [item_body("C", tag="KNOWN")]
    response = client.post("/items/batch", json={"items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["embed_tasks"] == 2
    assert len(body["results"]) == 41 and len({r["item_id"] for r in body["results"]}) == 41
    assert all(r["job_id"] == body["job_id"] for r in body["results"])
    assert body["results"][-1]["embed_queued"] is False  # indexed at once, no task
    messages = _embed_messages(redis_url)
    # Redis lists are pushed on the left: the newest message first.
    sizes = sorted(len(m["items"]) for m in messages)
    assert sizes == [8, 32]
    sent = [i["item_id"] for m in messages for i in m["items"]]
    assert sorted(sent) == sorted(r["item_id"] for r in body["results"][:40])
    assert all(m["job_id"] == body["job_id"] for m in messages)
    job = client.get(f"/jobs/{body['job_id']}").json()
    assert (job["total"], job["done"]) == (41, 1)

    again = client.post("/items/batch", json={"items": [item_body("B-0")]}).json()
    assert again["results"][0]["item_id"] == body["results"][0]["item_id"]
    assert again["results"][0]["created"] is False


def test_batch_upsert_problems(client: TestClient, redis_url: str) -> None:
    twice = {"items": [item_body("X"), item_body("Y"), item_body("X", tag="other")]}
    assert "items[2]" in problem(client.post("/items/batch", json=twice), 422)["detail"]
    problem(client.post("/items/batch", json={"items": []}), 422)
    unknown = {"items": [item_body("X")], "job_id": str(uuid.uuid4())}
    problem(client.post("/items/batch", json=unknown), 404)
    # Nothing was stored or sent by the refused calls.
    assert redis.Redis.from_url(redis_url).llen("embed") == 0
    job = client.post("/jobs", json={"kind": "ingest"}).json()
    into = client.post("/items/batch", json={"items": [item_body("X")], "job_id": job["job_id"]})
    assert into.json()["job_id"] == job["job_id"]


def test_search_sends_server_timing(client: TestClient, engine: Engine) -> None:
    vectors = random_vectors(3)
    for n, vector in enumerate(vectors):
        add_item(engine, f"T{n}", vector)
    response = client.post("/search", json=query(vectors[0], k=2))
    assert response.status_code == 200, response.text
    timing = response.headers["server-timing"]
    for stage in ("delta", "ann", "metadata"):
        assert f"{stage};dur=" in timing
