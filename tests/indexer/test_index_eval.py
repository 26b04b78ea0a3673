from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fashionrec_indexer.__main__ import cli
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.index_eval import NoIndexBuild, evaluate_index
from fashionrec_shared.storage import LocalBlobStore
from sqlalchemy import Engine
from typer.testing import CliRunner

from tests.indexer.conftest import DIM, MODEL, add_item, random_vectors

EXHAUSTIVE = 100_000  # search_k far above n_trees * items: Annoy visits every leaf


def _fill(engine: Engine, n: int) -> None:
    vectors = random_vectors(n, seed=5)
    vectors[1] = vectors[0]  # a tie: either duplicate is a correct neighbour
    for i, vector in enumerate(vectors):
        add_item(engine, f"S{i}", vector)


def test_no_build_is_a_clear_error(engine: Engine, store: LocalBlobStore, tmp_path: Path) -> None:
    with pytest.raises(NoIndexBuild, match="no index build is ready yet"):
        evaluate_index(engine, store, tmp_path / "cache")


def test_exhaustive_search_has_perfect_recall(
    engine: Engine, store: LocalBlobStore, tmp_path: Path
) -> None:
    _fill(engine, 40)
    manifest = build_index(engine, store, n_trees=4, settle_s=0).manifest
    result = evaluate_index(
        engine, store, tmp_path / "cache", samples=25, k=5, search_k=EXHAUSTIVE, seed=1
    )
    assert result["recall"] == result["recall@5"] == result["min_recall"] == 1.0
    assert result["build_id"] == manifest["build_id"] and result["model_version"] == MODEL
    assert result["items"] == 40 and result["dim"] == DIM and result["n_trees"] == 4
    assert result["samples"] == 25 and result["k"] == 5 and result["search_k"] == EXHAUSTIVE
    assert result["annoy_short_answers"] == 0
    for name in ("annoy", "exact"):
        assert 0 < result[f"{name}_ms_median"] <= result[f"{name}_ms_p95"] < 1000
    assert (tmp_path / "cache" / manifest["build_id"] / "index.ann").is_file()  # fetched
    json.dumps(result)


def test_samples_and_k_are_capped_by_the_index(
    engine: Engine, store: LocalBlobStore, tmp_path: Path
) -> None:
    _fill(engine, 4)
    build_index(engine, store, n_trees=2, settle_s=0)
    result = evaluate_index(engine, store, tmp_path / "c", samples=50, k=10, search_k=EXHAUSTIVE)
    assert result["samples"] == 4 and result["k"] == 3  # self left out: 3 neighbours each
    assert result["recall"] == 1.0


def test_small_search_k_is_measured_not_hidden(
    engine: Engine, store: LocalBlobStore, tmp_path: Path
) -> None:
    for i, vector in enumerate(random_vectors(300, seed=9)):
        add_item(engine, f"S{i}", vector)
    build_index(engine, store, n_trees=1, settle_s=0)
    result = evaluate_index(engine, store, tmp_path / "c", samples=50, k=10, search_k=10)
    assert 0.0 <= result["min_recall"] <= result["recall"] < 1.0
    assert np.isfinite(result["annoy_ms_p95"])


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, migrated_url: str) -> None:
    monkeypatch.setenv("FASHIONREC_STORAGE_BACKEND", "local")
    monkeypatch.setenv("FASHIONREC_STORAGE_LOCAL_DIR", str(tmp_path / "blobs"))
    monkeypatch.setenv("FASHIONREC_INDEXER_INDEX_DIR", str(tmp_path / "index-cache"))
    monkeypatch.setenv("FASHIONREC_INDEXER_DATABASE_URL", migrated_url)
    monkeypatch.setenv("FASHIONREC_INDEXER_SEARCH_K", str(EXHAUSTIVE))


def test_evaluate_command(env: None, engine: Engine, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["evaluate"])
    assert missing.exit_code == 1 and "no index build is ready yet" in missing.output
    _fill(engine, 20)
    build_index(engine, LocalBlobStore(tmp_path / "blobs"), n_trees=3, settle_s=0)
    out = tmp_path / "eval.json"
    result = runner.invoke(cli, ["evaluate", "--samples", "10", "--k", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "recall@3" in result.output
    data = json.loads(out.read_text())
    assert data["search_k"] == EXHAUSTIVE  # from the settings
    assert data["recall"] == 1.0 and data["samples"] == 10 and data["n_trees"] == 3
