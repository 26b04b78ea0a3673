"""Top-k search: by a query vector (POST /search) and by a stored item (GET /items/{id}/similar).

Both read one snapshot with its delta refreshed (see index_state), answer with the model version
the snapshot serves, and time their stages into the search-latency histogram and the
Server-Timing header (the gateway passes them on): `delta` (the per-query delta probe), `item`
(similar: the item and its vector), `ann` (top-k over the build and the delta), `metadata`.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import MAX_K, IndexerSearchResponse, SearchFilters, VectorQuery
from fashionrec_shared.vectors import decode_vector
from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.deps import EngineDep, MetricsDep, SettingsDep, SnapshotDep, item_uuid
from fashionrec_indexer.index_state import SnapshotView
from fashionrec_indexer.metrics import Metrics
from fashionrec_indexer.responses import hits_out
from fashionrec_indexer.search import SearchRequest, search, searchable_count

router = APIRouter()


class Stopwatch:
    """Stage durations of one request, observed as `search_latency{endpoint, stage}`."""

    def __init__(self, metrics: Metrics, endpoint: str) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.started = self._last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        """The time since the previous lap (or the start) is `stage`'s."""
        now = time.perf_counter()
        self.stages[stage] = now - self._last
        self.metrics.search_latency.labels(self.endpoint, stage).observe(now - self._last)
        self._last = now

    def total(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.metrics.search_latency.labels(self.endpoint, "total").observe(elapsed)

    def server_timing(self) -> str:
        return ", ".join(f"{name};dur={value * 1000:.2f}" for name, value in self.stages.items())


def similar_filters(
    category: str | None = None,
    min_price: Annotated[float | None, Query(ge=0)] = None,
    max_price: Annotated[float | None, Query(ge=0)] = None,
    predicted_category: str | None = None,
) -> SearchFilters:
    return SearchFilters(
        category=category,
        min_price=min_price,
        max_price=max_price,
        predicted_category=predicted_category,
    )


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise ProblemError(422, "Unprocessable Content", "vector has zero or infinite length")
    return (vector / norm).astype(np.float32)


def _answer(
    engine: Engine, view: SnapshotView, request: SearchRequest, watch: Stopwatch
) -> IndexerSearchResponse:
    """Run `request` on the view and fetch the hits' metadata (stages `ann`, `metadata`)."""
    model_version = view.model_version
    assert model_version is not None  # the callers checked the view serves a version
    hits, stats = search(view.build, view.delta, request)
    if stats.fallback:
        watch.metrics.search_fallbacks.inc()
    watch.lap("ann")
    with engine.connect() as conn:
        rows = repo.hits_metadata(conn, [item_id for item_id, _ in hits], model_version)
    watch.lap("metadata")
    return IndexerSearchResponse(
        results=hits_out(hits, rows),
        model_version=model_version,
        index_version=view.index_version,
    )


@router.post("/search", response_model=IndexerSearchResponse)
def search_vector(
    body: VectorQuery,
    response: Response,
    engine: EngineDep,
    snapshot: SnapshotDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> IndexerSearchResponse:
    watch = Stopwatch(metrics, "search")
    try:
        vector = decode_vector(body.vector)
    except ValueError as exc:
        raise ProblemError(422, "Unprocessable Content", str(exc)) from exc
    with engine.connect() as conn:
        view = snapshot.view(conn)
    watch.lap("delta")
    if searchable_count(view.build, view.delta) == 0:
        return IndexerSearchResponse(
            results=[], model_version=body.model_version, index_version=view.index_version
        )
    if body.model_version != view.model_version:
        raise ProblemError(
            409,
            "Conflict",
            f"query embedded with model {body.model_version!r}, index uses {view.model_version!r}",
            model_version=view.model_version,
        )
    if vector.shape[0] != view.dim:
        raise ProblemError(
            422,
            "Unprocessable Content",
            f"vector has {vector.shape[0]} dimensions, expected {view.dim}",
        )
    request = SearchRequest(
        _normalise(vector),
        body.k,
        body.filters,
        search_k=settings.search_k,
        candidates=settings.ann_candidates,
    )
    found = _answer(engine, view, request, watch)
    watch.total()
    # The gateway passes these on in its own Server-Timing header.
    response.headers["Server-Timing"] = watch.server_timing()
    return found


@router.get("/items/{item_id}/similar", response_model=IndexerSearchResponse)
def similar(
    item_id: str,
    response: Response,
    engine: EngineDep,
    snapshot: SnapshotDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    filters: Annotated[SearchFilters, Depends(similar_filters)],
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 5,
) -> IndexerSearchResponse:
    watch = Stopwatch(metrics, "similar")
    item = item_uuid(item_id)
    with engine.connect() as conn:
        view = snapshot.view(conn)
        watch.lap("delta")
        row = repo.item_vector(conn, item, view.model_version)
        if row is None and not repo.item_exists(conn, item):
            raise ProblemError(404, "Not Found", f"no item {item_id!r}")
    watch.lap("item")
    if row is None or row.dim != view.dim:
        raise ProblemError(
            409, "Conflict", f"item {item_id} has no embedding for the active model yet"
        )
    vector = _normalise(np.frombuffer(row.vector, dtype="<f4").astype(np.float32))
    request = SearchRequest(
        vector,
        k,
        filters,
        exclude=(item,),
        search_k=settings.search_k,
        candidates=settings.ann_candidates,
    )
    found = _answer(engine, view, request, watch)
    watch.total()
    response.headers["Server-Timing"] = watch.server_timing()
    return found
