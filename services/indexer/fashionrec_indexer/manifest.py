"""The manifest of an index build: one typed model, read and written only through it.

It is published as `indexes/{build_id}/manifest.json` (last, so a manifest means a complete
build), stored in `index_builds.manifest`, printed by `fashionrec-indexer rebuild` and returned by
BUILD_INDEX; all of them are `IndexManifest.to_json()`, and every reader goes through
`IndexManifest.from_json`, so defaults for fields older builds lack live here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METRIC = "angular"
# The files of builds from before format 2 (items.json: ids and metadata as JSON lists).
DATA_FILES = ("index.ann", "vectors.npy", "items.json")
# Format 2: items.npz (ids, metadata codes and image hashes as arrays; see index_files) and
# vectors.npy in `vector_dtype` (int8 rows with vector_scales.npy).
FORMAT = 2
VectorDtype = Literal["float32", "float16", "int8"]


class IndexManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    build_id: str
    model_version: str
    item_count: int = Field(ge=0)
    dim: int = Field(ge=1)
    metric: str = METRIC
    n_trees: int
    # Dimension of the space the Annoy trees are built in (< dim: a projection, projection.npy).
    # Builds from before projections lack it: trees over the full vectors.
    ann_dim: int
    projection: Literal["pca", "random"] | None = None
    files: tuple[str, ...] = DATA_FILES  # uploaded, in this order, before the manifest
    format: int = 1  # of the item files: 1 items.json, 2 items.npz
    vector_dtype: VectorDtype = "float32"  # how vectors.npy stores the normalised vectors
    checksums: dict[str, str]  # sha256 of every file in `files`
    # The Annoy search_k this build calibrated (index_eval.calibrate_search_k) and the recall@5
    # it measured with it on its own items; None: not calibrated (older builds, target 0).
    search_k: int | None = None
    calibrated_recall: float | None = None
    # Items with change_seq <= max_change_seq are in the build (the settled part of the snapshot);
    # seen_change_seq is the newest change the snapshot saw: nothing changed when it still is.
    max_change_seq: int = Field(ge=0)
    seen_change_seq: int = Field(default=0, ge=0)
    created_at: datetime
    reason: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_builds(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("ann_dim") is None and "dim" in data:
            data = {**data, "ann_dim": data["dim"]}
        return data

    @classmethod
    def from_json(cls, raw: str | bytes | Mapping[str, Any]) -> IndexManifest:
        """A manifest as published (JSON text) or as stored (the JSONB column's dict)."""
        if isinstance(raw, Mapping):
            return cls.model_validate(raw)
        return cls.model_validate_json(raw)

    def to_json(self) -> dict[str, Any]:
        """The JSON form every copy of a manifest has (file, database, CLI, task result)."""
        return self.model_dump(mode="json")

    def dumps(self) -> str:
        return self.model_dump_json(indent=2)
