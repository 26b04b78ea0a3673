"""Variant collapse (ranking.py): one result per group, the best-scoring one, on /search,
/items/{id}/similar and /recommend; collapse=false ranks exactly as without groups."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from fashionrec_indexer import ranking
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.ranking import collapse_variants
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_shared.storage import LocalBlobStore
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.indexer.conftest import DIM, MODEL, add_item
from tests.indexer.test_api import client, query, settings  # noqa: F401 (fixtures)


def arc(n: int) -> np.ndarray:
    """n unit vectors on an arc from the first axis, ever farther apart: item i's nearest
    neighbours are i-1, then i+1, then i-2 (its own first, at angle 0, for the first axis)."""
    angles = 0.1 * np.arange(n) + 0.01 * np.arange(n) ** 2
    rows = np.zeros((n, DIM), dtype=np.float32)
    rows[:, 0], rows[:, 1] = np.cos(angles), np.sin(angles)
    return rows


def test_collapse_keeps_the_first_of_each_group() -> None:
    a, b, c, d, gone = (uuid.uuid4() for _ in range(5))
    rows = {
        a: SimpleNamespace(variant_group="g"),
        b: SimpleNamespace(variant_group="g"),
        c: SimpleNamespace(variant_group=None),
        d: SimpleNamespace(variant_group=None),
    }
    hits = [(a, 0.9), (gone, 0.85), (b, 0.8), (c, 0.7), (d, 0.6)]
    assert collapse_variants(hits, rows) == [(a, 0.9), (c, 0.7), (d, 0.6)]


def variants(engine: Engine) -> dict[str, uuid.UUID]:
    """Eight variants of product "g" nearest the first axis, then three items without a group
    and two variants of "h"."""
    vectors = arc(13)
    ids = {f"g{n}": add_item(engine, f"g{n}", vectors[n], group="g") for n in range(8)}
    ids |= {f"x{n}": add_item(engine, f"x{n}", vectors[8 + n]) for n in range(3)}
    ids |= {f"h{n}": add_item(engine, f"h{n}", vectors[11 + n], group="h") for n in range(2)}
    return ids


def serve_build(client: TestClient, engine: Engine, settings: IndexerSettings) -> None:  # noqa: F811
    """Build the index and wait until the API serves it (its delta then empty)."""
    store = LocalBlobStore(settings.storage.local_dir)
    build_id = build_index(engine, store, n_trees=5, settle_s=0).manifest["build_id"]
    deadline = time.monotonic() + 10
    while client.get("/index").json()["index_version"] != build_id:
        assert time.monotonic() < deadline, "the build was never served"
        time.sleep(0.02)


def skus(response) -> list[str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.text
    return [hit["sku"] for hit in response.json()["results"]]


@pytest.mark.parametrize("built", [False, True], ids=["delta", "build"])
def test_search_similar_and_recommend_collapse_variants(
    client: TestClient,  # noqa: F811
    engine: Engine,
    settings: IndexerSettings,  # noqa: F811
    built: bool,
) -> None:
    ids = variants(engine)
    if built:
        serve_build(client, engine, settings)
    axis = np.eye(DIM, dtype=np.float32)[0]
    # k=3 with a first round of 12: "g" fills 8 of them.
    assert skus(client.post("/search", json=query(axis, k=3))) == ["g0", "x0", "x1"]
    assert skus(client.post("/search", json=query(axis, k=5))) == ["g0", "x0", "x1", "x2", "h0"]
    # Fewer groups than k: every group once, nothing more.
    assert skus(client.post("/search", json=query(axis, k=50))) == ["g0", "x0", "x1", "x2", "h0"]
    plain = skus(client.post("/search", json={**query(axis, k=5), "collapse": False}))
    assert plain == ["g0", "g1", "g2", "g3", "g4"]

    similar = f"/items/{ids['g0']}/similar"
    assert skus(client.get(similar, params={"k": 3})) == ["g1", "x0", "x1"]
    assert skus(client.get(similar, params={"k": 3, "collapse": "false"})) == ["g1", "g2", "g3"]

    liked = {"model_version": MODEL, "liked_items": [str(ids["x2"])], "k": 3}
    assert skus(client.post("/recommend", json=liked)) == ["x1", "h0", "x0"]
    for strategy in ("average", "best_score"):
        body = {**liked, "liked_items": [str(ids["g3"])], "strategy": strategy}
        assert skus(client.post("/recommend", json=body)) == ["g2", "x0", "x1"]
        grouped = skus(client.post("/recommend", json={**body, "collapse": False}))
        assert grouped == ["g2", "g4", "g1"]


def test_collapse_rounds_grow_until_k_groups_or_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [uuid.uuid4() for _ in range(300)]
    rows = {i: SimpleNamespace(variant_group="g" if n < 290 else None) for n, i in enumerate(ids)}
    monkeypatch.setattr(
        ranking.repo, "hits_metadata", lambda conn, item_ids, model: {i: rows[i] for i in item_ids}
    )
    asked: list[int] = []

    def fetch(n: int) -> tuple[list[tuple[uuid.UUID, float]], bool]:
        asked.append(n)
        return [(i, 1.0 - m / 1000) for m, i in enumerate(ids[:n])], n < len(ids)

    conn = SimpleNamespace()
    ranked = ranking.rank(conn, fetch, 3, MODEL, collapse=True)  # type: ignore[arg-type]
    assert asked == [12, 48, 192, 768] and len(ranked.hits) == 3
    asked.clear()
    bounded = ranking.rank(conn, fetch, 3, MODEL, collapse=True, max_candidates=100)  # type: ignore[arg-type]
    assert asked == [12, 48, 100] and len(bounded.hits) == 1
    asked.clear()
    ranking.rank(conn, fetch, 3, MODEL, collapse=False)  # type: ignore[arg-type]
    assert asked == [3]  # without collapse: what a search asked before groups
    asked.clear()
    # Scores fall below min_score before the third round: no more rounds.
    ranking.rank(conn, fetch, 3, MODEL, collapse=True, min_score=0.99)  # type: ignore[arg-type]
    assert asked == [12]
