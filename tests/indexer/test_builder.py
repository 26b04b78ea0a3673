from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from fashionrec_indexer import repository as repo
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.index_files import fetch
from fashionrec_indexer.loaded_index import open_build
from fashionrec_shared.storage import LocalBlobStore
from sqlalchemy import Engine

from tests.indexer.conftest import DIM, MODEL, add_item, random_vectors


def test_build_publishes_manifest_with_checksums(
    engine: Engine, store: LocalBlobStore, tmp_path: Path
) -> None:
    vectors = random_vectors(20)
    ids = [add_item(engine, f"S{i}", v, category="c", price=i) for i, v in enumerate(vectors)]
    result = build_index(engine, store, n_trees=5, settle_s=0)
    assert result.status == "ready"
    manifest = result.manifest
    assert manifest["item_count"] == 20 and manifest["dim"] == DIM
    assert manifest["model_version"] == MODEL and manifest["metric"] == "angular"
    with engine.connect() as conn:
        assert manifest["max_change_seq"] == repo.max_change_seq(conn)
        build = repo.latest_ready_build(conn)
    assert str(build.id) == manifest["build_id"] and build.item_count == 20

    prefix = f"indexes/{manifest['build_id']}"
    stored = json.loads(store.get(f"{prefix}/manifest.json"))
    assert stored == manifest
    for name, checksum in manifest["checksums"].items():
        assert hashlib.sha256(store.get(f"{prefix}/{name}")).hexdigest() == checksum

    loaded = open_build(fetch(store, manifest["build_id"], tmp_path / "cache"))
    assert loaded.size == 20 and loaded.vectors.shape == (20, DIM)
    assert manifest["format"] == 2 and manifest["vector_dtype"] == "float16"
    assert loaded.vectors.dtype == np.float16
    position = loaded.positions[ids[3]]
    np.testing.assert_allclose(loaded.vectors[position], vectors[3], atol=1e-3)
    assert loaded.annoy.get_n_items() == 20
    assert sorted(loaded.ids) == sorted(ids) and loaded.ids[position] == ids[3]
    assert loaded.categories.label(position) == "c" and loaded.prices[position] == 3


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-6), ("float16", 1e-3), ("int8", 1e-2)])
def test_vectors_are_stored_in_the_configured_dtype(
    engine: Engine, store: LocalBlobStore, tmp_path: Path, dtype: str, atol: float
) -> None:
    vectors = random_vectors(30)
    ids = [add_item(engine, f"S{i}", v) for i, v in enumerate(vectors)]
    manifest = build_index(engine, store, n_trees=5, settle_s=0, vector_dtype=dtype).manifest
    assert manifest["vector_dtype"] == dtype
    assert ("vector_scales.npy" in manifest["files"]) == (dtype == "int8")
    loaded = open_build(fetch(store, manifest["build_id"], tmp_path / "cache"))
    assert loaded.vectors.dtype == np.dtype(dtype)
    order = loaded.ids.lookup(ids)
    np.testing.assert_allclose(loaded.vectors[order], vectors, atol=atol)
    query = vectors[7]
    np.testing.assert_allclose(
        loaded.vectors.scan(query), (vectors @ query)[np.argsort(order)], atol=atol * 4
    )


def test_build_skips_when_nothing_changed(engine: Engine, store: LocalBlobStore) -> None:
    assert build_index(engine, store, settle_s=0).status == "skipped"  # no embeddings yet
    add_item(engine, "A", random_vectors(1)[0])
    assert build_index(engine, store, n_trees=2, settle_s=0).status == "ready"
    assert build_index(engine, store, n_trees=2, settle_s=0).status == "skipped"
    assert build_index(engine, store, n_trees=2, settle_s=0, force=True).status == "ready"
    add_item(engine, "B", random_vectors(1, seed=1)[0])
    assert build_index(engine, store, n_trees=2, settle_s=0).status == "ready"


def test_recent_changes_stay_above_the_settled_watermark(
    engine: Engine, store: LocalBlobStore
) -> None:
    add_item(engine, "A", random_vectors(1)[0])
    manifest = build_index(engine, store, n_trees=2, settle_s=3600).manifest
    # Just written: possibly not settled, so readers still treat the item as changed.
    assert manifest["max_change_seq"] == 0
    assert manifest["seen_change_seq"] > 0
    assert manifest["item_count"] == 1


def test_corrupt_download_is_rejected(engine: Engine, store: LocalBlobStore, tmp_path) -> None:
    add_item(engine, "A", random_vectors(1)[0])
    build_id = build_index(engine, store, n_trees=2, settle_s=0).manifest["build_id"]
    store.put(f"indexes/{build_id}/vectors.npy", b"garbage")
    import pytest
    from fashionrec_indexer.index_files import IndexCorrupt

    with pytest.raises(IndexCorrupt):
        fetch(store, build_id, tmp_path / "cache")
