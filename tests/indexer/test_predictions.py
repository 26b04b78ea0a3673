"""Model predictions in the indexer: stored per (image, model version) by STORE_EMBEDDINGS,
returned with items and hits under the served version, and `predicted_category` as a filter of
the Annoy candidates, the exact fallback and the delta scan."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from fashionrec_indexer import repository as repo
from fashionrec_indexer import search as search_module
from fashionrec_indexer.api import create_app
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.db import alembic_config, make_engine
from fashionrec_indexer.index_files import fetch
from fashionrec_indexer.index_state import IndexState
from fashionrec_indexer.ingest import store_embeddings
from fashionrec_indexer.loaded_index import open_build
from fashionrec_indexer.manifest import IndexManifest
from fashionrec_indexer.schema import embeddings
from fashionrec_indexer.search import SearchRequest, search
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_shared.schemas import SearchFilters
from fashionrec_shared.settings import BrokerSettings, StorageSettings
from fashionrec_shared.storage import LocalBlobStore
from fashionrec_shared.tasks import ItemEmbedding, Predicted, StoreEmbeddings
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text

from tests.indexer.conftest import (
    DIM,
    MODEL,
    SCORE_ATOL,
    add_item,
    embed,
    image_for,
    predicted,
    random_vectors,
    upsert,
)

NEW = "test-model-v2"
N = 60
LABELS = ("dress", "shirt", None)  # item i predicts LABELS[i % 3]; None: a model without heads


def label_of(i: int) -> str | None:
    return LABELS[i % 3]


def prediction_of(i: int) -> Predicted | None:
    label = label_of(i)
    return None if label is None else predicted(label, texture="floral")


def stored(engine: Engine, sha: str, model: str = MODEL) -> tuple[dict | None, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            select(embeddings.c.predicted, embeddings.c.predicted_category).where(
                embeddings.c.image_sha256 == sha, embeddings.c.model_version == model
            )
        ).one()
    return row.predicted, row.predicted_category


# ---- migration -------------------------------------------------------------------------------


def test_migration_0003_adds_prediction_columns_and_downgrades(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0002")
    engine = make_engine(database_url)
    columns_sql = text(
        "SELECT column_name FROM information_schema.columns WHERE table_name='embeddings'"
    )
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO embeddings (image_sha256, model_version, dim, vector) "
                    "VALUES ('a', 'old', 1, '\\x00000000')"
                )
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            row = conn.execute(text("SELECT predicted, predicted_category FROM embeddings")).one()
            assert tuple(row) == (None, None)  # existing vectors: no predictions
            indexes = conn.execute(
                text("SELECT indexname FROM pg_indexes WHERE tablename='embeddings'")
            ).scalars()
            assert "embeddings_predicted_category_idx" in set(indexes)
        command.downgrade(config, "0002")
        with engine.connect() as conn:
            columns = set(conn.execute(columns_sql).scalars())
            assert not {"predicted", "predicted_category"} & columns
            assert conn.execute(text("SELECT count(*) FROM embeddings")).scalar() == 1
        command.upgrade(config, "head")
    finally:
        engine.dispose()


# ---- storage ---------------------------------------------------------------------------------


def test_predictions_are_stored_per_image_and_model_version(engine: Engine) -> None:
    item_id, image = upsert(engine, "A")
    dress = predicted("dress", texture="floral")
    embed(engine, item_id, image, random_vectors(1)[0], predicted=dress)
    embed(engine, item_id, image, random_vectors(1, seed=1)[0], model=NEW, predicted=None)
    assert stored(engine, image.sha256) == (dress.model_dump(mode="json"), "dress")
    assert stored(engine, image.sha256, NEW) == (None, None)
    with engine.connect() as conn:
        # A model without heads stores SQL NULL, not a JSON null.
        assert (
            conn.execute(
                text("SELECT count(*) FROM embeddings WHERE predicted IS NULL")
            ).scalar_one()
            == 1
        )
    # Attributes without a category: stored, no category to filter on.
    item_b, image_b = upsert(engine, "B")
    only_attributes = Predicted.model_validate(
        {"attributes": {"fabric": [{"label": "denim", "confidence": 0.7}]}}
    )
    embed(engine, item_b, image_b, random_vectors(1, seed=2)[0], predicted=only_attributes)
    assert stored(engine, image_b.sha256) == (only_attributes.model_dump(mode="json"), None)


def test_a_stored_row_keeps_its_predictions_and_gains_missing_ones(engine: Engine) -> None:
    item_id, image = upsert(engine, "A")
    vector = random_vectors(1)[0]
    embed(engine, item_id, image, vector)  # an embedder that sent no predictions
    embed(engine, item_id, image, vector, predicted=predicted("dress"))
    assert stored(engine, image.sha256)[1] == "dress"
    embed(engine, item_id, image, vector, predicted=predicted("coat"))  # redelivered, other
    embed(engine, item_id, image, vector)  # and without: the stored ones stay
    assert stored(engine, image.sha256)[1] == "dress"


def test_items_sharing_an_image_share_its_predictions(engine: Engine) -> None:
    first, image = upsert(engine, "A", "same")
    second, _ = upsert(engine, "B", "same")
    store_embeddings(
        engine,
        StoreEmbeddings(
            model_version=MODEL,
            dim=DIM,
            embeddings=[
                ItemEmbedding(
                    item_id=str(i),
                    image_sha256=image.sha256,
                    vector=encode_vector(random_vectors(1)[0]),
                    predicted=predicted("dress"),
                )
                for i in (first, second)
            ],
        ),
    )
    with engine.connect() as conn:
        rows = [repo.get_item(conn, i, MODEL) for i in (first, second)]
    assert [row.predicted["category"]["label"] for row in rows] == ["dress", "dress"]
    assert all(row.status == "indexed" for row in rows)


# ---- search ----------------------------------------------------------------------------------


@pytest.fixture
def catalogue(engine: Engine) -> tuple[list[uuid.UUID], np.ndarray]:
    vectors = random_vectors(N)
    ids = [
        add_item(
            engine,
            f"S{i}",
            v,
            category="shoes" if i % 2 else "bags",
            price=float(i),
            predicted=prediction_of(i),
        )
        for i, v in enumerate(vectors)
    ]
    return ids, vectors


@pytest.fixture
def state(engine: Engine, store: LocalBlobStore, tmp_path: Path) -> IndexState:
    return IndexState(engine, store, tmp_path / "cache", settle_s=0)


def run(state: IndexState, engine: Engine, query: np.ndarray, k: int, **kw):  # type: ignore[no-untyped-def]
    snapshot = state.current
    with engine.connect() as conn:
        view = snapshot.delta.refresh(conn)
    return search(snapshot.build, view, SearchRequest(query, k, **kw))


def built(engine: Engine, store: LocalBlobStore, state: IndexState) -> None:
    assert build_index(engine, store, n_trees=10, settle_s=0).status == "ready"
    assert state.refresh()


def brute(
    vectors: np.ndarray, query: np.ndarray, keep: list[int], k: int
) -> tuple[list[int], np.ndarray]:
    scores = vectors @ query
    rows = [int(r) for r in np.argsort(-scores, kind="stable") if r in set(keep)][:k]
    return rows, scores[rows]


def assert_hits(hits, ids, vectors, query, keep, k) -> None:  # type: ignore[no-untyped-def]
    rows, scores = brute(vectors, query, keep, k)
    assert [h for h, _ in hits] == [ids[r] for r in rows]
    assert len({h for h, _ in hits}) == len(hits) == min(k, len(keep))
    np.testing.assert_allclose([s for _, s in hits], scores, atol=SCORE_ATOL)


def test_predicted_category_filters_the_build_like_category(
    engine: Engine, store: LocalBlobStore, state: IndexState, catalogue
) -> None:
    ids, vectors = catalogue
    built(engine, store, state)
    dresses = [i for i in range(N) if label_of(i) == "dress"]
    for q in (0, 7, 31):
        hits, stats = run(
            state, engine, vectors[q], 10, filters=SearchFilters(predicted_category="dress")
        )
        assert stats.annoy_used  # a third of the build is eligible: Annoy proposes candidates
        assert_hits(hits, ids, vectors, vectors[q], dresses, 10)
    # Combined with the other filters, all of them apply.
    filters = SearchFilters(predicted_category="shirt", category="shoes", max_price=40)
    keep = [i for i in range(N) if label_of(i) == "shirt" and i % 2 and i <= 40]
    hits, _ = run(state, engine, vectors[1], 50, filters=filters)
    assert_hits(hits, ids, vectors, vectors[1], keep, 50)
    # Fewer eligible than k: all of them; unknown labels and items without predictions: none.
    hits, _ = run(state, engine, vectors[0], 50, filters=SearchFilters(predicted_category="dress"))
    assert len(hits) == len(dresses)
    hits, _ = run(state, engine, vectors[0], 5, filters=SearchFilters(predicted_category="hat"))
    assert hits == []


def test_exact_fallback_honours_predicted_category(
    engine: Engine,
    store: LocalBlobStore,
    state: IndexState,
    catalogue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids, vectors = catalogue
    built(engine, store, state)
    monkeypatch.setattr(search_module, "annoy_candidates", lambda build, query, n, search_k: [0, 1])
    filters = SearchFilters(predicted_category="shirt")
    hits, stats = run(state, engine, vectors[4], 10, filters=filters)
    assert stats.fallback
    shirts = [i for i in range(N) if label_of(i) == "shirt"]
    assert_hits(hits, ids, vectors, vectors[4], shirts, 10)


def test_delta_and_stale_build_entries_honour_predicted_category(
    engine: Engine, store: LocalBlobStore, state: IndexState, catalogue
) -> None:
    ids, vectors = catalogue
    built(engine, store, state)
    fresh = random_vectors(2, seed=99)
    new_dress = add_item(engine, "NEW-DRESS", fresh[0], predicted=predicted("dress"))
    plain = add_item(engine, "NEW-PLAIN", fresh[1])  # no predictions: never matches the filter
    # Item 0 (a dress in the build) gets a new image the model calls a shirt.
    item_id, image = upsert(engine, "S0", "reimaged", category="bags", price=0.0)
    embed(engine, item_id, image, vectors[0], predicted=predicted("shirt"))

    all_ids = [*ids, new_dress]
    all_vectors = np.vstack([vectors, fresh[:1]])
    dresses = [i for i in range(1, N) if label_of(i) == "dress"] + [N]
    dress = SearchFilters(predicted_category="dress")
    for q in (fresh[0], vectors[0], vectors[3]):
        hits, _ = run(state, engine, q, 10, filters=dress)
        assert_hits(hits, all_ids, all_vectors, q, dresses, 10)
    hits, _ = run(state, engine, vectors[0], 1, filters=SearchFilters(predicted_category="shirt"))
    assert hits[0][0] == ids[0]  # the delta has its current prediction
    everything, _ = run(state, engine, fresh[1], N + 2, filters=dress)
    assert len(everything) == len(dresses)
    assert not {ids[0], plain} & {h for h, _ in everything}


def test_without_a_build_the_exact_scan_filters_by_prediction(
    engine: Engine, state: IndexState, catalogue
) -> None:
    ids, vectors = catalogue
    state.refresh()
    assert state.current.build is None
    hits, _ = run(state, engine, vectors[5], 10, filters=SearchFilters(predicted_category="dress"))
    dresses = [i for i in range(N) if label_of(i) == "dress"]
    assert_hits(hits, ids, vectors, vectors[5], dresses, 10)


def test_a_build_from_before_predictions_matches_no_predicted_category(
    engine: Engine, store: LocalBlobStore, catalogue, tmp_path: Path
) -> None:
    ids, vectors = catalogue
    manifest = build_index(engine, store, n_trees=5, settle_s=0).manifest
    directory = fetch(store, manifest["build_id"], tmp_path / "cache")
    built = open_build(directory)
    assert built.predicted_categories.tolist() == [label_of(ids.index(i)) for i in built.ids]
    # What builds of format 1 from before predictions wrote: items.json without them.
    meta = {
        "ids": [str(i) for i in built.ids],
        "categories": built.categories.tolist(),
        "prices": [None if np.isnan(p) else float(p) for p in built.prices],
    }
    (directory / "items.json").write_text(json.dumps(meta))
    legacy = IndexManifest.from_json((directory / "manifest.json").read_bytes()).model_copy(
        update={"format": 1, "files": ("index.ann", "vectors.npy", "items.json")}
    )
    (directory / "manifest.json").write_text(legacy.dumps())
    (directory / "items.npz").unlink()
    old = open_build(directory)
    assert old.predicted_categories.tolist() == [None] * N
    assert old.items.images is None and [str(i) for i in old.ids] == meta["ids"]
    state = IndexState(engine, store, tmp_path / "cache", settle_s=0)
    state.refresh()
    with engine.connect() as conn:
        view = state.current.delta.refresh(conn)
    hits, _ = search(
        old, view, SearchRequest(vectors[0], 5, SearchFilters(predicted_category="dress"))
    )
    assert hits == []
    hits, _ = search(old, view, SearchRequest(vectors[0], 5, SearchFilters(category="bags")))
    assert len(hits) == 5


# ---- API -------------------------------------------------------------------------------------


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
        wait_for(lambda: client.get("/readyz").status_code == 200)
        yield client


def wait_for(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def vector_query(vector: np.ndarray, k: int = 5, model: str = MODEL, **filters) -> dict:  # type: ignore[no-untyped-def]
    return {"vector": encode_vector(vector), "model_version": model, "k": k, "filters": filters}


def test_items_and_hits_carry_the_served_versions_predictions(
    client: TestClient, engine: Engine, settings: IndexerSettings, catalogue
) -> None:
    ids, vectors = catalogue
    dress = prediction_of(0)
    assert dress is not None
    item = client.get(f"/items/{ids[0]}").json()
    assert item["predicted"] == dress.model_dump(mode="json")
    assert client.get(f"/items/{ids[2]}").json()["predicted"] is None  # no heads
    pending = upsert(engine, "PENDING")[0]
    assert client.get(f"/items/{pending}").json()["predicted"] is None

    results = client.post("/search", json=vector_query(vectors[0], k=50)).json()["results"]
    assert len(results) == 50
    for hit in results:
        expected = prediction_of(ids.index(uuid.UUID(hit["item_id"])))
        assert hit["predicted"] == (expected.model_dump(mode="json") if expected else None)

    filtered = client.post(
        "/search", json=vector_query(vectors[0], k=10, predicted_category="shirt")
    ).json()["results"]
    assert len(filtered) == 10
    assert {r["predicted"]["category"]["label"] for r in filtered} == {"shirt"}
    similar = client.get(
        f"/items/{ids[0]}/similar", params={"k": 5, "predicted_category": "dress"}
    ).json()["results"]
    assert len(similar) == 5 and str(ids[0]) not in {r["item_id"] for r in similar}
    assert {r["predicted"]["category"]["label"] for r in similar} == {"dress"}

    # A model change: the new version's predictions show once its index serves.
    store = LocalBlobStore(settings.storage.local_dir)
    assert build_index(engine, store, n_trees=2, settle_s=0).status == "ready"
    embed(engine, ids[0], image_for("S0"), vectors[0], model=NEW, predicted=predicted("skirt"))
    assert client.get(f"/items/{ids[0]}").json()["predicted"]["category"]["label"] == "dress"
    assert build_index(engine, store, n_trees=2, settle_s=0, model_version=NEW).status == "ready"
    wait_for(lambda: client.get("/index").json()["model_version"] == NEW)
    assert client.get(f"/items/{ids[0]}").json()["predicted"]["category"]["label"] == "skirt"
    hits = client.post(
        "/search", json=vector_query(vectors[0], k=5, model=NEW, predicted_category="skirt")
    ).json()["results"]
    assert [h["item_id"] for h in hits] == [str(ids[0])]
    assert hits[0]["predicted"]["category"] == {"label": "skirt", "confidence": 0.9}
