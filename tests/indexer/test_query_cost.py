"""The query path's cost does not grow with the inventory (issue 9): regression tests.

Not timings: what the database plans for every statement a search runs (an index, even on a
table bulk-written and never analysed, as a re-embed leaves it), how many rows the delta probe
reads, and how many vectors a search scores.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fashionrec_indexer import search as search_module
from fashionrec_indexer.api import create_app
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.index_state import WARM_PROBES, IndexState
from fashionrec_indexer.item_arrays import StoredVectors
from fashionrec_indexer.search import SearchRequest, search, searchable_count
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_shared.schemas import SearchFilters
from fashionrec_shared.settings import BrokerSettings, StorageSettings
from fashionrec_shared.storage import LocalBlobStore
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from psycopg2.extras import execute_values
from sqlalchemy import Engine, event, text

from tests.indexer.conftest import DIM, MODEL, random_vectors

CATEGORIES = ["shoes", "bags", "dresses", "shirts"]


def bulk_items(engine: Engine, vectors: np.ndarray, start: int = 0) -> list[uuid.UUID]:
    """Items `indexed` with their embeddings, written in one transaction the way a bulk
    re-embed leaves them; autovacuum is off for both tables, so they stay unanalysed."""
    ids = [uuid.uuid4() for _ in vectors]
    shas = [hashlib.sha256(f"bulk-{start + i}".encode()).hexdigest() for i in range(len(ids))]
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute("ALTER TABLE items SET (autovacuum_enabled = false)")
            cur.execute("ALTER TABLE embeddings SET (autovacuum_enabled = false)")
            execute_values(
                cur,
                "INSERT INTO items (id, sku, title, category, price, image_key, image_sha256,"
                " status) VALUES %s",
                [
                    (
                        str(i),
                        f"bulk-{start + n}",
                        "t",
                        CATEGORIES[n % 4],
                        float(n % 500),
                        f"inventory/{sha}.jpg",
                        sha,
                        "indexed",
                    )
                    for n, (i, sha) in enumerate(zip(ids, shas, strict=True))
                ],
                page_size=5000,
            )
            execute_values(
                cur,
                "INSERT INTO embeddings (image_sha256, model_version, dim, vector) VALUES %s",
                [
                    (sha, MODEL, DIM, np.asarray(v, dtype="<f4").tobytes())
                    for sha, v in zip(shas, vectors, strict=True)
                ],
                page_size=5000,
            )
        raw.commit()
    finally:
        raw.close()
    return ids


@contextmanager
def captured_statements() -> Iterator[list[tuple[str, Any]]]:
    """Every statement any engine sends while the block runs."""
    seen: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", capture)


def scans(
    engine: Engine, statement: str, parameters: Any
) -> list[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every plan node that reads a table or an index."""
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute("EXPLAIN (FORMAT JSON) " + statement, parameters or None)
            plan = cur.fetchone()[0]
    finally:
        raw.close()
    if isinstance(plan, str):
        plan = json.loads(plan)
    found: list[tuple[str, str | None, str | None]] = []

    def walk(node: dict) -> None:
        if "Relation Name" in node or "Index Name" in node:
            found.append((node["Node Type"], node.get("Relation Name"), node.get("Index Name")))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return found


N = 20_000
# Lookups by key or by change_seq range; not embeddings_created_at_idx (a walk of every
# embedding in created_at order, filtered: what an ORDER BY created_at LIMIT 1 plans).
QUERY_PATH_INDEXES = {
    "items_pkey",
    "items_change_seq_idx",
    "embeddings_pkey",
    "index_builds_pkey",
    "index_builds_ready_idx",
}


def test_every_query_statement_uses_an_index_on_unanalysed_tables(
    engine: Engine, migrated_url: str, redis_url: str, tmp_path: Path
) -> None:
    vectors = random_vectors(N)
    ids = bulk_items(engine, vectors)
    store = LocalBlobStore(tmp_path / "blobs")
    assert build_index(engine, store, n_trees=5, settle_s=0).status == "ready"
    with engine.begin() as conn:  # a change after the build: the delta has work to do
        conn.execute(
            text(
                "UPDATE items SET category = 'moved', change_seq = nextval('items_change_seq'),"
                " updated_at = now() WHERE id = :id"
            ),
            {"id": ids[5]},
        )
    # The tables never were analysed: the shapes the query path had before issue 9 do scan.
    assert ("Seq Scan", "items", None) in scans(
        engine, "SELECT id FROM items WHERE change_seq > %(s)s ORDER BY change_seq", {"s": N}
    )
    assert ("Index Scan", "embeddings", "embeddings_created_at_idx") in scans(
        engine,
        "SELECT (SELECT model_version FROM embeddings e WHERE e.image_sha256 = i.image_sha256"
        " ORDER BY e.created_at DESC LIMIT 1) FROM items i WHERE i.id = %(id)s",
        {"id": str(ids[7])},
    )
    settings = IndexerSettings(
        database_url=migrated_url,
        broker=BrokerSettings(url=redis_url),
        storage=StorageSettings(backend="local", local_dir=tmp_path / "blobs"),
        index_dir=tmp_path / "cache",
        refresh_interval_s=0.05,
        settle_s=0,
    )
    with TestClient(create_app(settings)) as client:
        for _ in range(200):
            ready = client.get("/readyz")
            if ready.status_code == 200 and ready.json()["index_version"]:
                break
            time.sleep(0.05)
        with captured_statements() as statements:
            body = {"vector": encode_vector(vectors[3]), "model_version": MODEL, "k": 5}
            found = client.post("/search", json=body)
            assert found.status_code == 200 and found.json()["results"][0]["item_id"] == str(ids[3])
            filtered = {**body, "filters": {"category": "bags", "max_price": 100}}
            assert client.post("/search", json=filtered).status_code == 200
            similar = client.get(f"/items/{ids[5]}/similar")  # the changed item: in the delta
            assert similar.status_code == 200 and len(similar.json()["results"]) == 5
            assert client.get(f"/items/{ids[9]}").status_code == 200
            assert client.get(f"/items/{uuid.uuid4()}/similar").status_code == 404
            liked = {
                "model_version": MODEL,
                "liked": [{"vector": encode_vector(vectors[11])}],
                "liked_items": [str(ids[12]), str(ids[5])],
                "disliked_items": [str(ids[13])],
                "exclude": [str(ids[14])],
            }
            for strategy in ("average", "best_score"):
                answer = client.post("/recommend", json={**liked, "strategy": strategy})
                assert answer.status_code == 200 and len(answer.json()["results"]) == 5
    checked = 0
    for statement, parameters in statements:
        if not statement.lstrip().upper().startswith("SELECT") or "pg_stat" in statement:
            continue
        plan = scans(engine, statement, parameters)
        seq = [s for s in plan if s[0] == "Seq Scan" and s[1] in ("items", "embeddings")]
        indexes = {s[2] for s in plan if s[2] is not None}
        assert not seq and indexes <= QUERY_PATH_INDEXES, (statement, plan)
        checked += 1
    assert checked >= 12


def test_a_build_right_after_a_bulk_write_serves_with_an_empty_delta(
    engine: Engine, tmp_path: Path
) -> None:
    """Nothing is settled by time (settle_s: an hour): the build's whole inventory is above its
    max_change_seq, yet none of it is a delta entry and the probe soon reads no rows."""
    n = 3000
    vectors = random_vectors(n, seed=2)
    ids = bulk_items(engine, vectors)
    store = LocalBlobStore(tmp_path / "blobs")
    manifest = build_index(engine, store, n_trees=5, settle_s=3600).manifest
    assert manifest["max_change_seq"] == 0 and manifest["seen_change_seq"] >= n
    state = IndexState(engine, store, tmp_path / "cache", settle_s=3600)
    assert state.refresh()
    delta = state.current.delta
    with engine.connect() as conn:
        view = delta.refresh(conn)
    assert view.ids == [] and len(view.masked_positions) == 0
    assert delta.rows_read == 0  # the warm-up probes moved the floor past the bulk write
    build = state.current.build
    assert searchable_count(build, view) == n
    hits, stats = search(build, view, SearchRequest(vectors[10], 5))
    assert hits[0][0] == ids[10] and stats.scored <= search_module.ANN_CANDIDATES

    # What a re-embed does to every item (mark_indexed): a new change_seq, nothing else.
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE items SET change_seq = nextval('items_change_seq'), updated_at = now()")
        )
    with engine.connect() as conn:
        view = delta.refresh(conn)
        assert delta.rows_read == n  # read once...
        assert view.ids == [] and len(view.masked_positions) == 0  # ...and no entry
        for _ in range(WARM_PROBES):
            view = delta.refresh(conn)
    assert delta.rows_read == 0

    # A real change is an entry; changing it back makes the build's entry current again.
    for category, entries in (("moved", 1), ("shoes", 0)):  # item 0 was "shoes"
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE items SET category = :c, change_seq = nextval('items_change_seq'),"
                    " updated_at = now() WHERE id = :id"
                ),
                {"c": category, "id": ids[0]},
            )
        with engine.connect() as conn:
            view = delta.refresh(conn)
        assert len(view.ids) == entries and len(view.masked_positions) == entries
    hits, _ = search(build, view, SearchRequest(vectors[0], 1, SearchFilters(category="shoes")))
    assert hits[0][0] == ids[0]


def test_the_floor_waits_for_a_writer_still_in_flight(engine: Engine, tmp_path: Path) -> None:
    """A writer that took a lower change_seq and commits after a higher one was seen is still
    caught: the horizon does not pass a transaction that is in progress."""
    vectors = random_vectors(50, seed=3)
    ids = bulk_items(engine, vectors)
    store = LocalBlobStore(tmp_path / "blobs")
    build_index(engine, store, n_trees=5, settle_s=0)
    state = IndexState(engine, store, tmp_path / "cache", settle_s=3600)
    assert state.refresh()
    delta = state.current.delta
    change = text(
        "UPDATE items SET category = :c, change_seq = nextval('items_change_seq'),"
        " updated_at = now() WHERE id = :id"
    )
    slow = engine.connect()
    try:
        slow.execute(change, {"c": "late", "id": ids[1]})  # takes its value first, uncommitted
        with engine.begin() as conn:
            conn.execute(change, {"c": "early", "id": ids[2]})
        with engine.connect() as conn:
            for _ in range(5):
                view = delta.refresh(conn)
        assert len(view.ids) == 1 and delta.rows_read == 1  # the floor stays below "early"
        slow.commit()
    finally:
        slow.close()
    with engine.connect() as conn:
        view = delta.refresh(conn)
        categories = sorted(view.categories.tolist())
        assert categories == ["early", "late"]
        for _ in range(WARM_PROBES):
            delta.refresh(conn)
    assert delta.rows_read == 0


def test_an_unfiltered_search_never_masks_the_whole_build(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = random_vectors(5000, seed=4)
    ids = bulk_items(engine, vectors)
    store = LocalBlobStore(tmp_path / "blobs")
    build_index(engine, store, n_trees=5, settle_s=0)
    state = IndexState(engine, store, tmp_path / "cache", settle_s=0)
    assert state.refresh()
    with engine.begin() as conn:
        conn.execute(text("UPDATE items SET deleted_at = now(), change_seq = nextval("
                          "'items_change_seq') WHERE id = :id"), {"id": ids[8]})  # fmt: skip
    with engine.connect() as conn:
        view = state.current.delta.refresh(conn)
    build = state.current.build

    def whole_build(*args: Any) -> None:
        raise AssertionError("an unfiltered search built a mask over the whole build")

    monkeypatch.setattr(search_module, "build_mask", whole_build)
    for query, exclude in ((vectors[8], ()), (vectors[9], (ids[9],))):
        hits, stats = search(build, view, SearchRequest(query, 5, exclude=exclude))
        assert len(hits) == 5 and not {ids[8], ids[9]} & {h for h, _ in hits}
        assert stats.annoy_used and not stats.fallback
        assert stats.scored <= search_module.ANN_CANDIDATES


def test_recommend_scores_candidates_only(
    engine: Engine,
    migrated_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither strategy masks or scans the build for an unfiltered recommendation: the vectors
    it reads are Annoy's candidates per liked example and their re-scoring, whatever N."""
    vectors = random_vectors(5000, seed=5)
    ids = bulk_items(engine, vectors)
    store = LocalBlobStore(tmp_path / "blobs")
    build_index(engine, store, n_trees=5, settle_s=0)
    settings = IndexerSettings(
        database_url=migrated_url,
        broker=BrokerSettings(url=redis_url),
        storage=StorageSettings(backend="local", local_dir=tmp_path / "blobs"),
        index_dir=tmp_path / "cache",
        refresh_interval_s=0.05,
        settle_s=0,
    )

    def whole_build(*args: Any) -> None:
        raise AssertionError("an unfiltered recommendation built a mask over the whole build")

    read: list[int] = []
    rows_of = StoredVectors.__getitem__
    scores_of = StoredVectors.scores

    def counted_rows(self: StoredVectors, rows: Any) -> np.ndarray:
        block = rows_of(self, rows)
        read.append(len(block) if block.ndim > 1 else 1)
        return block

    def counted_scores(self: StoredVectors, rows: Any, query: np.ndarray) -> np.ndarray:
        scores = scores_of(self, rows, query)
        read.append(len(scores))
        return scores

    monkeypatch.setattr(search_module, "build_mask", whole_build)
    monkeypatch.setattr(StoredVectors, "__getitem__", counted_rows)
    monkeypatch.setattr(StoredVectors, "scores", counted_scores)
    liked = [{"vector": encode_vector(vectors[n])} for n in (20, 21)]
    body = {"model_version": MODEL, "liked": liked, "liked_items": [str(ids[22])], "k": 5}
    with TestClient(create_app(settings)) as client:
        for _ in range(200):
            ready = client.get("/readyz")
            if ready.status_code == 200 and ready.json()["index_version"]:
                break
            time.sleep(0.05)
        for strategy, examples in (("average", 1), ("best_score", 3)):
            read.clear()
            answer = client.post("/recommend", json={**body, "strategy": strategy})
            assert answer.status_code == 200 and len(answer.json()["results"]) == 5
            # Per search: the Annoy candidates; then the candidates' and the hits' rows.
            bound = examples * search_module.ANN_CANDIDATES + examples * 4 * 5 + 5
            assert 0 < sum(read) <= bound, (strategy, read)
