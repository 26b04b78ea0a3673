"""Index build artefacts: write them, publish to object storage, fetch and verify, open read-only.

A build is a directory of files under `indexes/{build_id}/` in object storage:
index.ann (Annoy, angular), vectors.npy (L2-normalised float32 NxD, for exact re-ranking and the
exact fallback), items.json (ids, categories, the build model's predicted categories and prices
in Annoy order, for filtering without SQL; builds older than predictions have no
predicted_categories: all None)
and manifest.json (an `IndexManifest`: sizes, model version, sha256 of every file,
max_change_seq). When the trees are built over a lower-dimensional projection (manifest
`ann_dim` < `dim`), projection.npy holds the (dim, ann_dim) float32 matrix that maps a query into
the trees' space.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex
from fashionrec_shared.files import file_sha256
from fashionrec_shared.storage import BlobStore

from fashionrec_indexer.manifest import IndexManifest

PROJECTION_FILE = "projection.npy"
MANIFEST = "manifest.json"

log = logging.getLogger("fashionrec.indexer.index_files")


class IndexCorrupt(RuntimeError):
    """A downloaded file does not match the manifest checksum."""


def object_key(build_id: str, name: str) -> str:
    return f"indexes/{build_id}/{name}"


def publish(store: BlobStore, build_dir: Path, manifest: IndexManifest) -> None:
    """Upload the data files first and the manifest last: a manifest means a complete build."""
    for name in manifest.files:
        store.upload_file(object_key(manifest.build_id, name), build_dir / name)
    store.put(object_key(manifest.build_id, MANIFEST), manifest.dumps().encode())


@dataclass(frozen=True)
class LoadedIndex:
    """One build's files opened read-only (Annoy and numpy both mmap, so loads are cheap)."""

    build_id: str
    manifest: IndexManifest
    annoy: AnnoyIndex | None
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    ids: list[uuid.UUID]
    categories: np.ndarray  # object array, None where unset
    predicted_categories: np.ndarray  # object array: the build model's predictions, None if none
    prices: np.ndarray  # float64, NaN where unset
    directory: Path
    positions: dict[uuid.UUID, int]
    projection: np.ndarray | None = None  # (dim, ann_dim): query → the trees' space

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def ann_vector(self, query: np.ndarray) -> np.ndarray:
        """The (normalised, full-dimension) query in the space the Annoy trees were built in."""
        return query if self.projection is None else query @ self.projection

    @property
    def size(self) -> int:
        return len(self.ids)


def _verified(directory: Path, manifest: IndexManifest) -> bool:
    return all(
        (directory / name).is_file() and file_sha256(directory / name) == checksum
        for name, checksum in manifest.checksums.items()
    )


def _cached_manifest_intact(directory: Path, manifest: IndexManifest) -> bool:
    """open_build reads the cached manifest.json, so it is checked too: against the store's."""
    try:
        return (directory / MANIFEST).read_text() == manifest.dumps()
    except (OSError, UnicodeDecodeError):
        return False


def fetch(store: BlobStore, build_id: str, cache_dir: Path) -> Path:
    """Download a build into cache_dir/{build_id}/ unless a verified copy is already there."""
    directory = cache_dir / build_id
    manifest = IndexManifest.from_json(store.get(object_key(build_id, MANIFEST)))
    if directory.is_dir():
        if _verified(directory, manifest) and _cached_manifest_intact(directory, manifest):
            return directory
        log.warning(
            "index build %s: the cached copy in %s fails its checksums; fetching it again",
            build_id,
            directory,
        )
    staging = cache_dir / f".{build_id}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for name in manifest.checksums:
            store.download_file(object_key(build_id, name), staging / name)
        if not _verified(staging, manifest):
            raise IndexCorrupt(f"index build {build_id}: checksum mismatch after download")
        (staging / MANIFEST).write_text(manifest.dumps())
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def open_build(directory: Path) -> LoadedIndex:
    manifest = IndexManifest.from_json((directory / MANIFEST).read_bytes())
    projection = None
    if manifest.ann_dim != manifest.dim:
        projection = np.ascontiguousarray(np.load(directory / PROJECTION_FILE), dtype=np.float32)
    annoy: AnnoyIndex | None = None
    if manifest.item_count > 0:
        annoy = AnnoyIndex(manifest.ann_dim, manifest.metric)
        annoy.load(str(directory / "index.ann"))  # mmap, read-only
    vectors = np.load(directory / "vectors.npy", mmap_mode="r")
    meta = json.loads((directory / "items.json").read_text())
    prices = np.array([np.nan if p is None else float(p) for p in meta["prices"]], dtype=np.float64)
    ids = [uuid.UUID(i) for i in meta["ids"]]
    predicted = meta.get("predicted_categories") or [None] * len(ids)
    return LoadedIndex(
        build_id=manifest.build_id,
        manifest=manifest,
        annoy=annoy,
        vectors=vectors,
        ids=ids,
        categories=np.array(meta["categories"], dtype=object),
        predicted_categories=np.array(predicted, dtype=object),
        prices=prices,
        directory=directory,
        positions={item_id: i for i, item_id in enumerate(ids)},
        projection=projection,
    )


def prune_cache(cache_dir: Path, keep: set[str]) -> None:
    """Remove cached builds other than `keep` (open mmaps of removed files stay valid on POSIX)."""
    if not cache_dir.is_dir():
        return
    for child in cache_dir.iterdir():
        if child.is_dir() and child.name not in keep and not child.name.startswith("."):
            shutil.rmtree(child, ignore_errors=True)
