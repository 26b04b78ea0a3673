"""A build's files opened read-only for queries (the API's and `evaluate`'s view of a build).

Annoy and vectors.npy are memory-mapped; the per-item arrays (item_arrays.ItemArrays) are read
whole. Nothing per item is a Python object, so opening a build of a million items takes
milliseconds, and fetching it (index_files.fetch) is what a swap costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from fashionrec_indexer.index_files import MANIFEST, PROJECTION_FILE
from fashionrec_indexer.item_arrays import (
    ITEMS_FILE,
    LEGACY_ITEMS_FILE,
    SCALES_FILE,
    VECTORS_FILE,
    ItemArrays,
    ItemIds,
    ItemPositions,
    Labels,
    StoredVectors,
)
from fashionrec_indexer.manifest import IndexManifest


@dataclass(frozen=True)
class LoadedIndex:
    """One build, opened read-only."""

    build_id: str
    manifest: IndexManifest
    annoy: AnnoyIndex | None
    vectors: StoredVectors  # (N, D) L2-normalised, decoded to float32 on access
    items: ItemArrays
    directory: Path
    projection: np.ndarray | None = None  # (dim, ann_dim): query → the trees' space

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def ids(self) -> ItemIds:
        return self.items.ids

    @property
    def positions(self) -> ItemPositions:
        return ItemPositions(self.items.ids)

    @property
    def categories(self) -> Labels:
        return self.items.categories

    @property
    def predicted_categories(self) -> Labels:
        return self.items.predicted

    @property
    def prices(self) -> np.ndarray:
        return self.items.prices

    def ann_vector(self, query: np.ndarray) -> np.ndarray:
        """The (normalised, full-dimension) query in the space the Annoy trees were built in."""
        return query if self.projection is None else query @ self.projection

    @property
    def size(self) -> int:
        return len(self.items.ids)


def open_build(directory: Path, manifest: IndexManifest | None = None) -> LoadedIndex:
    """Open a fetched build (format 2, or format 1 with items.json); `manifest`: its manifest
    when the directory has none yet (a build being written)."""
    if manifest is None:
        manifest = IndexManifest.from_json((directory / MANIFEST).read_bytes())
    projection = None
    if manifest.ann_dim != manifest.dim:
        projection = np.ascontiguousarray(np.load(directory / PROJECTION_FILE), dtype=np.float32)
    annoy: AnnoyIndex | None = None
    if manifest.item_count > 0:
        annoy = AnnoyIndex(manifest.ann_dim, manifest.metric)
        annoy.load(str(directory / "index.ann"))  # mmap, read-only
    scales = None
    if SCALES_FILE in manifest.files:
        scales = np.load(directory / SCALES_FILE)
    vectors = StoredVectors(np.load(directory / VECTORS_FILE, mmap_mode="r"), scales)
    if manifest.format >= 2:
        items = ItemArrays.load(directory / ITEMS_FILE)
    else:
        items = ItemArrays.from_legacy(json.loads((directory / LEGACY_ITEMS_FILE).read_text()))
    return LoadedIndex(
        build_id=manifest.build_id,
        manifest=manifest,
        annoy=annoy,
        vectors=vectors,
        items=items,
        directory=directory,
        projection=projection,
    )
