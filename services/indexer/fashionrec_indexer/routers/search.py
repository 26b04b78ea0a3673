"""Top-k search: by a query vector (POST /search) and by a stored item (GET /items/{id}/similar).

Both read one snapshot with its delta refreshed (see index_state), answer with the model version
the snapshot serves, and time their stages into the search-latency histogram and the
Server-Timing header (the gateway passes them on): `delta` (the per-query delta probe), `item`
(similar: the item and its vector), `ann` (top-k over the build and the delta), `metadata`.
With `collapse` (the default) results hold one item per variant group (see ranking); with
`explain` each carries the `reasons` it matches the query for (see reasons).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import MAX_K, IndexerSearchResponse, SearchFilters, VectorQuery
from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.deps import EngineDep, MetricsDep, SettingsDep, SnapshotDep, item_uuid
from fashionrec_indexer.index_state import SnapshotView
from fashionrec_indexer.query_checks import (
    check_dim,
    check_served,
    decoded,
    normalise,
    search_fetch,
)
from fashionrec_indexer.ranking import rank
from fashionrec_indexer.reasons import QuerySide, reasons_for
from fashionrec_indexer.responses import hits_out, stored_colours, stored_predictions
from fashionrec_indexer.search import SearchRequest, searchable_count
from fashionrec_indexer.stopwatch import Stopwatch

router = APIRouter()


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


def _answer(
    engine: Engine,
    view: SnapshotView,
    request: SearchRequest,
    watch: Stopwatch,
    *,
    collapse: bool,
    query: QuerySide | None,
    max_candidates: int,
) -> IndexerSearchResponse:
    """Run `request` on the view and fetch the hits' metadata (stages `ann`, `metadata`);
    `query` None: no reasons (explain=false)."""
    model_version = view.model_version
    assert model_version is not None  # the callers checked the view serves a version
    fetch = search_fetch(view, request, watch.metrics)
    with engine.connect() as conn:
        ranked = rank(
            conn,
            fetch,
            request.k,
            model_version,
            collapse=collapse,
            max_candidates=max_candidates,
            lap=watch.lap,
        )
    reasons = None
    if query is not None:
        reasons = {
            item_id: reasons_for(
                score,
                QuerySide(
                    stored_predictions(ranked.rows[item_id].predicted),
                    stored_colours(ranked.rows[item_id].colours),
                ),
                query,
            )
            for item_id, score in ranked.hits
        }
    return IndexerSearchResponse(
        results=hits_out(ranked.hits, ranked.rows, reasons),
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
    vector = decoded(body.vector)
    with engine.connect() as conn:
        view = snapshot.view(conn)
    watch.lap("delta")
    if searchable_count(view.build, view.delta) == 0:
        return IndexerSearchResponse(
            results=[], model_version=body.model_version, index_version=view.index_version
        )
    check_served(view, body.model_version)
    check_dim(vector, view.dim)
    request = SearchRequest(
        normalise(vector),
        body.k,
        body.filters,
        search_k=settings.search_k,
        candidates=settings.ann_candidates,
    )
    query = QuerySide(body.predicted, body.colours) if body.explain else None
    found = _answer(
        engine,
        view,
        request,
        watch,
        collapse=body.collapse,
        query=query,
        max_candidates=settings.max_candidates,
    )
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
    collapse: bool = True,
    explain: bool = True,
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
    vector = normalise(np.frombuffer(row.vector, dtype="<f4").astype(np.float32))
    request = SearchRequest(
        vector,
        k,
        filters,
        exclude=(item,),
        search_k=settings.search_k,
        candidates=settings.ann_candidates,
    )
    query = None
    if explain:
        query = QuerySide(stored_predictions(row.predicted), stored_colours(row.colours))
    found = _answer(
        engine,
        view,
        request,
        watch,
        collapse=collapse,
        query=query,
        max_candidates=settings.max_candidates,
    )
    watch.total()
    response.headers["Server-Timing"] = watch.server_timing()
    return found
