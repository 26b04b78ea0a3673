"""Index build artefacts: write them, publish to object storage, fetch and verify, open read-only.

A build is a directory of files under `indexes/{build_id}/` in object storage:
index.ann (Annoy, angular), vectors.npy (L2-normalised NxD as float32, float16 or int8 +
vector_scales.npy: manifest `vector_dtype`; for exact re-scoring and the exact fallback),
items.npz (ids, category and predicted-category codes, prices and image hashes in Annoy order,
for filtering without SQL; see item_arrays; builds of format 1 have items.json instead, and those
older than predictions no predicted_categories: all None)
and manifest.json (an `IndexManifest`: sizes, model version, sha256 of every file,
max_change_seq). When the trees are built over a lower-dimensional projection (manifest
`ann_dim` < `dim`), projection.npy holds the (dim, ann_dim) float32 matrix that maps a query into
the trees' space. A fetched build is opened for queries by loaded_index.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fashionrec_shared.files import file_sha256
from fashionrec_shared.storage import BlobStore

from fashionrec_indexer.manifest import IndexManifest

if TYPE_CHECKING:
    from fashionrec_indexer.loaded_index import LoadedIndex

log = logging.getLogger("fashionrec.indexer.index_files")

PROJECTION_FILE = "projection.npy"
MANIFEST = "manifest.json"


class IndexCorrupt(RuntimeError):
    """A downloaded file does not match the manifest checksum."""


def object_key(build_id: str, name: str) -> str:
    return f"indexes/{build_id}/{name}"


def publish(store: BlobStore, build_dir: Path, manifest: IndexManifest) -> None:
    """Upload the data files first and the manifest last: a manifest means a complete build."""
    for name in manifest.files:
        store.upload_file(object_key(manifest.build_id, name), build_dir / name)
    store.put(object_key(manifest.build_id, MANIFEST), manifest.dumps().encode())


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
    """A fetched build opened for queries: see loaded_index (where it lives)."""
    from fashionrec_indexer.loaded_index import open_build as open_loaded

    return open_loaded(directory)


def prune_cache(cache_dir: Path, keep: set[str]) -> None:
    """Remove cached builds other than `keep` (open mmaps of removed files stay valid on POSIX)."""
    if not cache_dir.is_dir():
        return
    for child in cache_dir.iterdir():
        if child.is_dir() and child.name not in keep and not child.name.startswith("."):
            shutil.rmtree(child, ignore_errors=True)
