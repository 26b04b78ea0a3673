"""ANN tuning: defaults from settings, projected trees, exact re-ranking and the delta scan."""

from __future__ import annotations

import inspect
import uuid
from pathlib import Path

import numpy as np
import pytest
from fashionrec_indexer import search as search_module
from fashionrec_indexer import settings as settings_module
from fashionrec_indexer.builder import build_index, fit_projection
from fashionrec_indexer.index_files import PROJECTION_FILE, fetch
from fashionrec_indexer.index_state import DeltaView, IndexState
from fashionrec_indexer.loaded_index import open_build
from fashionrec_indexer.search import SearchRequest, exact_top, search
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_shared.schemas import SearchFilters
from fashionrec_shared.storage import LocalBlobStore
from sqlalchemy import Engine

from tests.indexer.conftest import DIM, SCORE_ATOL, add_item, random_vectors

N = 60


def test_defaults_come_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("N_TREES", "SEARCH_K", "ANN_DIM", "ANN_PROJECTION", "ANN_CANDIDATES"):
        monkeypatch.delenv(f"FASHIONREC_INDEXER_{name}", raising=False)
    settings = IndexerSettings(database_url="postgresql://u@h/db")
    assert settings.n_trees == settings_module.N_TREES == 50
    assert settings.search_k == settings_module.SEARCH_K == -1
    assert settings.ann_dim == settings_module.ANN_DIM
    assert settings.ann_projection == settings_module.ANN_PROJECTION
    assert settings.ann_candidates == settings_module.ANN_CANDIDATES
    params = inspect.signature(SearchRequest).parameters
    assert params["candidates"].default == settings.ann_candidates
    assert params["search_k"].default == settings.search_k
    params = inspect.signature(build_index).parameters
    assert params["n_trees"].default == settings.n_trees
    assert params["ann_dim"].default == settings.ann_dim
    monkeypatch.setenv("FASHIONREC_INDEXER_ANN_CANDIDATES", "40")
    monkeypatch.setenv("FASHIONREC_INDEXER_ANN_DIM", "0")
    settings = IndexerSettings(database_url="postgresql://u@h/db")
    assert settings.ann_candidates == 40 and settings.ann_dim == 0


@pytest.mark.parametrize("kind", ["pca", "random"])
def test_projection_has_orthonormal_columns(kind: str) -> None:
    vectors = random_vectors(300, dim=64)
    matrix = fit_projection(vectors, 16, kind)
    assert matrix.shape == (64, 16) and matrix.dtype == np.float32
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(16), atol=1e-5)


def test_pca_keeps_dot_products_of_low_rank_items() -> None:
    basis = np.linalg.qr(np.random.default_rng(1).normal(size=(64, 6)))[0]
    items = random_vectors(200, dim=6) @ basis.T  # rank 6 in 64-d
    matrix = fit_projection(items.astype(np.float32), 8, "pca")
    query = random_vectors(1, seed=3, dim=64)[0]
    np.testing.assert_allclose((items @ matrix) @ (query @ matrix), items @ query, atol=1e-5)


@pytest.fixture
def projected(engine: Engine, store: LocalBlobStore, tmp_path: Path):  # type: ignore[no-untyped-def]
    vectors = random_vectors(N)
    ids = [
        add_item(engine, f"S{i}", v, category="c", price=float(i)) for i, v in enumerate(vectors)
    ]
    manifest = build_index(engine, store, n_trees=5, ann_dim=4, settle_s=0).manifest
    return ids, vectors, manifest


def test_build_over_a_projection_publishes_it(
    engine: Engine, store: LocalBlobStore, tmp_path: Path, projected
) -> None:
    _, _, manifest = projected
    assert manifest["ann_dim"] == 4 and manifest["dim"] == DIM
    assert manifest["projection"] == "pca"
    assert PROJECTION_FILE in manifest["files"] and PROJECTION_FILE in manifest["checksums"]
    loaded = open_build(fetch(store, manifest["build_id"], tmp_path / "cache"))
    assert loaded.projection.shape == (DIM, 4)
    assert loaded.annoy.f == 4 and loaded.vectors.shape == (N, DIM)
    # Without a projection nothing extra is written.
    full = build_index(engine, store, n_trees=2, ann_dim=0, settle_s=0, force=True).manifest
    assert full["ann_dim"] == DIM and full["projection"] is None
    assert PROJECTION_FILE not in full["files"]
    assert open_build(fetch(store, full["build_id"], tmp_path / "cache")).projection is None


@pytest.mark.parametrize("candidates", [5, 20, search_module.ANN_CANDIDATES])
def test_projected_search_returns_k_distinct_exact_scores(
    engine: Engine, store: LocalBlobStore, tmp_path: Path, projected, candidates: int
) -> None:
    ids, vectors, _ = projected
    state = IndexState(engine, store, tmp_path / "cache", settle_s=0)
    assert state.refresh()
    snapshot = state.current
    with engine.connect() as conn:
        view = snapshot.delta.refresh(conn)
    by_id = {item_id: n for n, item_id in enumerate(ids)}
    for i in (0, 11, 42):
        hits, stats = search(
            snapshot.build, view, SearchRequest(vectors[i], 5, candidates=candidates)
        )
        assert stats.annoy_used and len(hits) == 5 and len({h for h, _ in hits}) == 5
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)
        # Every score is the exact full-dimension cosine of the item returned.
        exact = [float(vectors[by_id[h]] @ vectors[i]) for h, _ in hits]
        np.testing.assert_allclose(scores, exact, atol=SCORE_ATOL)
        if candidates >= N:  # every item re-ranked: the exact answer
            np.testing.assert_allclose(
                scores, np.sort(vectors @ vectors[i])[::-1][:5], atol=SCORE_ATOL
            )
    # The fallback still answers when Annoy comes back short.
    short = lambda build, query, n, search_k: [0, 1]  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search_module, "annoy_candidates", short)
        hits, stats = search(
            snapshot.build, view, SearchRequest(vectors[9], 10, candidates=candidates)
        )
    assert stats.fallback and len(hits) == 10 and hits[0][0] == ids[9]


def _delta(vectors: np.ndarray, rng: np.random.Generator) -> DeltaView:
    m = len(vectors)
    ids = [uuid.UUID(int=i) for i in range(m)]
    return DeltaView(
        model_version="m",
        dim=vectors.shape[1],
        changed=frozenset(ids),
        masked_positions=np.empty(0, dtype=np.int64),
        ids=ids,
        vectors=vectors,
        categories=np.array(rng.choice(["a", "b"], m), dtype=object),
        prices=np.where(rng.random(m) < 0.1, np.nan, rng.random(m) * 100),
        positions={item_id: n for n, item_id in enumerate(ids)},
    )


def test_delta_scan_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    vectors = random_vectors(500, seed=4, dim=32)
    view = _delta(vectors, rng)
    query = random_vectors(1, seed=8, dim=32)[0]
    excluded = {view.ids[int(np.argmax(vectors @ query))], view.ids[3]}
    cases = [
        (SearchFilters(), set()),
        (SearchFilters(), excluded),
        (SearchFilters(category="a", max_price=50), excluded),
        (SearchFilters(min_price=99.9), set()),  # fewer eligible than k
    ]
    for filters, exclude in cases:
        keep = np.ones(500, dtype=bool)
        if filters.category:
            keep &= view.categories == filters.category
        if filters.min_price is not None:
            keep &= view.prices >= filters.min_price
        if filters.max_price is not None:
            keep &= view.prices <= filters.max_price
        keep &= np.array([i not in exclude for i in view.ids])
        scores = vectors @ query
        brute = [int(r) for r in np.argsort(-scores) if keep[r]][:10]
        hits, _ = search(None, view, SearchRequest(query, 10, filters=filters, exclude=exclude))
        assert [h.int for h, _ in hits] == brute
        np.testing.assert_allclose([s for _, s in hits], scores[brute], atol=1e-6)


def test_exact_top_handles_masks() -> None:
    scores_of = np.array([[0.1], [0.9], [0.5], [0.7]], dtype=np.float32)
    rows, scores = exact_top(scores_of, np.array([1.0], dtype=np.float32), 3)
    assert rows.tolist() == [1, 3, 2] and scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    rows, _ = exact_top(scores_of, np.array([1.0], dtype=np.float32), 3, np.array([1, 0, 0, 1]) > 0)
    assert rows.tolist() == [3, 0]
    rows, _ = exact_top(scores_of, np.array([1.0], dtype=np.float32), 3, np.zeros(4, dtype=bool))
    assert rows.tolist() == []
