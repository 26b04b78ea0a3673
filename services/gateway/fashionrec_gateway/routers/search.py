"""POST /v1/search: photo in, k nearest inventory items out."""

from __future__ import annotations

import time
from typing import Annotated

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import (
    IndexerSearchResponse,
    SearchFilters,
    SearchResponse,
    VectorQuery,
)
from fashionrec_shared.tasks import Predicted
from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from fashionrec_gateway.blobs import store_image
from fashionrec_gateway.deps import (
    BlobStoreDep,
    IndexerDep,
    MetricsDep,
    QueryCacheDep,
    QueryEmbedderDep,
    SearchLimitDep,
    ServingVersionDep,
    SettingsDep,
)
from fashionrec_gateway.forms import single_parts
from fashionrec_gateway.metrics import StageTimer
from fashionrec_gateway.query_vectors import embed_one, record_embed
from fashionrec_gateway.reembed import with_served_version
from fashionrec_gateway.responses import problems
from fashionrec_gateway.results import Collapse, Explain, FiltersDep, K, to_response
from fashionrec_gateway.urls import public_base
from fashionrec_gateway.validation import validate_upload

router = APIRouter(prefix="/v1", tags=["search"])

SameCategory = Annotated[
    bool,
    Query(
        description="rank only items predicted to be of the photo's predicted category: sets "
        "the `predicted_category` filter to the category the served model predicts for the "
        "photo (the answer's `predicted.category`). When the model predicts no category (a "
        "model without prediction heads) it changes nothing: the search runs as without it "
        "and `predicted` is null. With an explicit `predicted_category` that differs from the "
        "photo's: 422.",
    ),
]


def query_filters(
    filters: SearchFilters, same_category: bool, predicted: Predicted | None
) -> SearchFilters:
    """The filters a query runs with: `same_category` adds the photo's predicted category."""
    category = predicted.category if predicted is not None else None
    if not same_category or category is None:
        return filters
    asked = filters.predicted_category
    if asked is not None and asked != category.label:
        raise ProblemError(
            422,
            "Unprocessable Content",
            f"same_category=true asks for the photo's predicted category {category.label!r}, "
            f"which contradicts predicted_category={asked!r}",
        )
    return filters.model_copy(update={"predicted_category": category.label})


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Find the k inventory items that look most like the photo",
    responses=problems(409, 413, 415, 422, 429, 502, 503, 504, 507),
    dependencies=[SearchLimitDep, single_parts("image")],
)
def search(
    request: Request,
    response: Response,
    image: Annotated[UploadFile, File(description="the photo (jpg, png, webp, gif, bmp, tiff)")],
    settings: SettingsDep,
    store: BlobStoreDep,
    indexer: IndexerDep,
    embedder: QueryEmbedderDep,
    cache: QueryCacheDep,
    serving: ServingVersionDep,
    metrics: MetricsDep,
    filters: FiltersDep,
    k: K = 5,
    same_category: SameCategory = False,
    collapse: Collapse = True,
    explain: Explain = True,
) -> SearchResponse:
    timer = StageTimer(metrics)
    started = getattr(request.state, "started", None)
    if started is not None:  # receiving and parsing the multipart body, before this handler
        timer.record("upload", time.perf_counter() - started)
    with timer.stage("validate"):
        checked = validate_upload(image.file, settings.max_upload_bytes, settings.max_image_pixels)
    with timer.stage("store"):
        ref = store_image(store, "uploads", checked)

    def run(model_version: str | None) -> tuple[IndexerSearchResponse, Predicted | None]:
        """The indexer's answer and the photo's predictions, both of one model version."""
        t0 = time.perf_counter()
        with timer.stage("embed"):
            vector, cached = embed_one(
                ref, embedder, cache, metrics, settings.embed_timeout_s, model_version
            )
        if not cached:
            record_embed(timer, vector, time.perf_counter() - t0)
        query = VectorQuery(
            vector=vector.vector,
            model_version=vector.model_version,
            k=k,
            filters=query_filters(filters, same_category, vector.predicted),
            collapse=collapse,
            explain=explain,
            # What the results' reasons compare them with.
            predicted=vector.predicted,
            colours=vector.colours,
        )
        with timer.stage("search"):
            found, index_timings = indexer.search_timed(query)
        for name, seconds in index_timings.items():
            timer.record(f"index-{name}", seconds)
        return found, vector.predicted

    found, predicted = with_served_version(serving, metrics, run)
    serving.update(found.model_version)
    with timer.stage("respond"):
        answer = to_response(found, public_base(request, settings), predicted)
    response.headers["Server-Timing"] = timer.header()
    return answer
