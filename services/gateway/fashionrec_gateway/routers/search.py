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
from fashionrec_shared.tasks import EmbedQueryResult, ImageRef, Predicted
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
from fashionrec_gateway.embedding import QueryEmbedder, QueryVectorCache
from fashionrec_gateway.forms import single_parts
from fashionrec_gateway.indexer_client import IndexerConflict
from fashionrec_gateway.metrics import GatewayMetrics, StageTimer
from fashionrec_gateway.responses import problems
from fashionrec_gateway.results import FiltersDep, K, to_response
from fashionrec_gateway.urls import public_base
from fashionrec_gateway.validation import validate_upload

router = APIRouter(prefix="/v1", tags=["search"])

# Re-embeds after a 409: one for a changed model version, a second only if the served version
# changed again during the request.
MAX_REEMBEDS = 2

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


def _embed(
    ref: ImageRef,
    embedder: QueryEmbedder,
    cache: QueryVectorCache,
    metrics: GatewayMetrics,
    timeout_s: float,
    model_version: str | None,
) -> tuple[EmbedQueryResult, bool]:
    """(the query vector of `model_version`, whether it came from the cache); None as version:
    the embedder's choice."""
    cached = cache.get(model_version, ref.sha256) if model_version else None
    if cached is not None:
        metrics.query_cache.labels("hit").inc()
        return cached, True
    metrics.query_cache.labels("miss").inc()
    result = embedder(ref, timeout_s, model_version)
    cache.put(ref.sha256, result)
    return result, False


# The embedder's own timings (EmbedQueryResult.timings_ms) shown as stages of their own; the rest
# of the embed round trip is "queue": send, waiting for a free worker, result delivery.
WORKER_STAGES = ("fetch", "decode", "infer")


def _record_embed(timer: StageTimer, result: EmbedQueryResult, round_trip_s: float) -> None:
    worker = {k: result.timings_ms[k] / 1000 for k in WORKER_STAGES if k in result.timings_ms}
    for name, seconds in worker.items():
        timer.record(name, seconds)
    timer.record("queue", round_trip_s - sum(worker.values()))


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
            vector, cached = _embed(
                ref, embedder, cache, metrics, settings.embed_timeout_s, model_version
            )
        if not cached:
            _record_embed(timer, vector, time.perf_counter() - t0)
        query = VectorQuery(
            vector=vector.vector,
            model_version=vector.model_version,
            k=k,
            filters=query_filters(filters, same_category, vector.predicted),
        )
        with timer.stage("search"):
            found, index_timings = indexer.search_timed(query)
        for name, seconds in index_timings.items():
            timer.record(f"index-{name}", seconds)
        return found, vector.predicted

    version, named = serving.value, None
    for attempt in range(MAX_REEMBEDS + 1):
        try:
            found, predicted = run(version)
            break
        except IndexerConflict as conflict:
            # The index serves another model version (a model change was swapped in, or this
            # process has not seen an answer yet): embed again with the version it names. Once,
            # unless the served version moved again meanwhile (a swap during this request).
            serving.update(conflict.model_version)
            if attempt == MAX_REEMBEDS or (attempt > 0 and conflict.model_version == named):
                raise
            named = version = conflict.model_version
            metrics.reembeds.inc()
    serving.update(found.model_version)
    with timer.stage("respond"):
        answer = to_response(found, public_base(request, settings), predicted)
    response.headers["Server-Timing"] = timer.header()
    return answer
