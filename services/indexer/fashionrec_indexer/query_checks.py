"""Checks and helpers the query endpoints share (search, similar, recommend)."""

from __future__ import annotations

import dataclasses

import numpy as np
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.vectors import decode_vector

from fashionrec_indexer.index_state import SnapshotView
from fashionrec_indexer.metrics import Metrics
from fashionrec_indexer.ranking import Fetch, Hits
from fashionrec_indexer.search import SearchRequest, search


def decoded(vector: str, field: str = "vector") -> np.ndarray:
    """A wire vector (base64 float32); 422 naming `field` when it is not one."""
    try:
        return decode_vector(vector)
    except ValueError as exc:
        raise ProblemError(422, "Unprocessable Content", f"{field}: {exc}") from exc


def normalise(vector: np.ndarray, what: str = "vector") -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise ProblemError(422, "Unprocessable Content", f"{what} has zero or infinite length")
    return (vector / norm).astype(np.float32)


def check_served(view: SnapshotView, model_version: str) -> None:
    """409 naming the served version when the query was embedded with another (the gateway
    embeds again with that one)."""
    if model_version != view.model_version:
        raise ProblemError(
            409,
            "Conflict",
            f"query embedded with model {model_version!r}, index uses {view.model_version!r}",
            model_version=view.model_version,
        )


def check_dim(vector: np.ndarray, dim: int | None, field: str = "vector") -> None:
    if vector.shape[0] != dim:
        raise ProblemError(
            422,
            "Unprocessable Content",
            f"{field} has {vector.shape[0]} dimensions, expected {dim}",
        )


def search_fetch(view: SnapshotView, request: SearchRequest, metrics: Metrics) -> Fetch:
    """`request` run on the view for n results at a time (ranking.rank's fetch)."""

    def fetch(n: int) -> tuple[Hits, bool]:
        hits, stats = search(view.build, view.delta, dataclasses.replace(request, k=n))
        if stats.fallback:
            metrics.search_fallbacks.inc()
        return hits, len(hits) >= n

    return fetch
