"""Per-build search_k calibration: exact thresholds, the ladder, the manifest, and its use."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fashionrec_indexer import index_eval
from fashionrec_indexer.builder import build_index, write_ann
from fashionrec_indexer.index_eval import calibrate_search_k, evaluate_build, exact_thresholds
from fashionrec_indexer.index_files import MANIFEST, fetch
from fashionrec_indexer.loaded_index import LoadedIndex, open_build
from fashionrec_indexer.manifest import IndexManifest
from fashionrec_indexer.search import annoy_candidates
from fashionrec_indexer.settings import SEARCH_K_PER_CANDIDATE
from fashionrec_shared.storage import LocalBlobStore
from sqlalchemy import Engine

from tests.indexer.conftest import add_item, random_vectors


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: neighbours a weak index misses."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)) * 0.7
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def written_build(directory: Path, vectors: np.ndarray, n_trees: int) -> LoadedIndex:
    """A build's files written directly (no database): trees over the full vectors."""
    directory.mkdir()
    np.save(directory / "vectors.npy", vectors)
    n = len(vectors)
    ann = write_ann(directory, vectors, n_trees, ann_dim=0)
    ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
    (directory / "items.json").write_text(
        json.dumps({"ids": ids, "categories": [None] * n, "prices": [None] * n})
    )
    manifest = IndexManifest(
        build_id=directory.name,
        model_version="m",
        item_count=n,
        dim=vectors.shape[1],
        **ann,
        checksums={},
        max_change_seq=0,
        created_at=datetime.now(UTC),
    )
    (directory / MANIFEST).write_text(manifest.dumps())
    return open_build(directory)


def test_exact_thresholds_are_the_kth_best_cosine_without_the_item_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = random_vectors(700, dim=24)
    build = written_build(tmp_path / "b", vectors, n_trees=2)
    monkeypatch.setattr(index_eval, "EXACT_ROWS", 64)  # many steps, and a partial last one
    positions = np.array([0, 5, 63, 64, 300, 699])
    got = exact_thresholds(build, positions, 5)
    for position, threshold in zip(positions, got, strict=True):
        scores = vectors @ vectors[position]
        scores[position] = -np.inf
        assert threshold == pytest.approx(np.sort(scores)[-5], abs=1e-5)


def test_calibration_raises_search_k_until_the_target_recall(tmp_path: Path) -> None:
    # One tree and 5 candidates: the floor (100) finds far fewer than 0.96 of the neighbours.
    vectors = clustered(4000, dim=32, clusters=40)
    build = written_build(tmp_path / "weak", vectors, n_trees=1)
    found = calibrate_search_k(build, target=0.96, samples=100, candidates=5)
    floor = SEARCH_K_PER_CANDIDATE * 5
    budgets = [k for k, _ in found.steps]
    assert found.steps[0] == (floor, pytest.approx(found.steps[0][1]))
    assert found.steps[0][1] < 0.96 and found.search_k > floor
    assert found.recall >= 0.96 and found.samples == 100
    # Every budget below the chosen one that was tried missed the target.
    assert all(recall < 0.96 for k, recall in found.steps if k < found.search_k)
    assert budgets[: budgets.index(max(budgets)) + 1] == sorted(
        budgets[: budgets.index(max(budgets)) + 1]
    )
    # It holds on other items too (evaluate picks its own seeded sample).
    held = evaluate_build(build, samples=200, seed=7, search_k=found.search_k, candidates=5)
    assert held["recall"] >= 0.93
    # A target that is already met at the floor stops there.
    easy = calibrate_search_k(build, target=0.1, samples=50, candidates=5)
    assert easy.search_k == floor and len(easy.steps) == 1


def test_no_calibration_for_target_zero_or_an_empty_build(tmp_path: Path) -> None:
    build = written_build(tmp_path / "b", random_vectors(50), n_trees=2)
    off = calibrate_search_k(build, target=0, candidates=10)
    assert off.samples == 0 and off.search_k == SEARCH_K_PER_CANDIDATE * 10


class RecordingAnnoy:
    def __init__(self, real: Any) -> None:
        self.real = real
        self.search_ks: list[int] = []

    def get_nns_by_vector(self, vector: np.ndarray, n: int, search_k: int) -> list[int]:
        self.search_ks.append(search_k)
        return self.real.get_nns_by_vector(vector, n, search_k=search_k)


def test_queries_use_the_calibrated_search_k(tmp_path: Path) -> None:
    build = written_build(tmp_path / "b", random_vectors(300), n_trees=2)
    calibrated = dataclasses.replace(
        build,
        manifest=build.manifest.model_copy(update={"search_k": 7000}),
        annoy=RecordingAnnoy(build.annoy),
    )
    query = random_vectors(1, seed=9)[0]
    annoy_candidates(calibrated, query, 100, -1)  # the calibrated one: above 20 x 100
    annoy_candidates(calibrated, query, 500, -1)  # more candidates asked: 20 x 500
    annoy_candidates(calibrated, query, 100, 300)  # set explicitly: as set
    uncalibrated = dataclasses.replace(build, annoy=RecordingAnnoy(build.annoy))
    annoy_candidates(uncalibrated, query, 100, -1)  # an older build: 20 x 100
    assert calibrated.annoy.search_ks == [7000, 10_000, 300]
    assert uncalibrated.annoy.search_ks == [2000]


def test_builds_record_their_calibration(
    engine: Engine, store: LocalBlobStore, tmp_path: Path
) -> None:
    for i, vector in enumerate(random_vectors(40)):
        add_item(engine, f"S{i}", vector)
    manifest = build_index(engine, store, n_trees=3, settle_s=0, ann_candidates=10).manifest
    # 40 items: the floor (20 x 10) already finds every neighbour.
    assert manifest["search_k"] == 200 and manifest["calibrated_recall"] == 1.0
    loaded = open_build(fetch(store, manifest["build_id"], tmp_path / "cache"))
    assert loaded.manifest.search_k == 200
    off = build_index(engine, store, n_trees=3, settle_s=0, force=True, target_recall=0)
    assert off.manifest["search_k"] is None and off.manifest["calibrated_recall"] is None
