"""POST /v1/search: photo in, k nearest inventory items out."""

from __future__ import annotations

from typing import Annotated

from fashionrec_shared.schemas import IndexerSearchResponse, SearchResponse, VectorQuery
from fashionrec_shared.tasks import EmbedQueryResult, ImageRef
from fastapi import APIRouter, File, Request, Response, UploadFile

from fashionrec_gateway.blobs import store_image
from fashionrec_gateway.deps import (
    BlobStoreDep,
    IndexerDep,
    MetricsDep,
    QueryCacheDep,
    QueryEmbedderDep,
    SettingsDep,
)
from fashionrec_gateway.embedding import QueryEmbedder, QueryVectorCache
from fashionrec_gateway.indexer_client import IndexerConflict
from fashionrec_gateway.metrics import GatewayMetrics, StageTimer
from fashionrec_gateway.responses import problems
from fashionrec_gateway.results import Category, K, Price, make_filters, to_response
from fashionrec_gateway.urls import public_base
from fashionrec_gateway.validation import validate_upload

router = APIRouter(prefix="/v1", tags=["search"])


def _embed(
    ref: ImageRef,
    embedder: QueryEmbedder,
    cache: QueryVectorCache,
    metrics: GatewayMetrics,
    timeout_s: float,
    use_cache: bool = True,
) -> EmbedQueryResult:
    cached = cache.get(ref.sha256) if use_cache else None
    if cached is not None:
        metrics.query_cache.labels("hit").inc()
        return cached
    metrics.query_cache.labels("miss").inc()
    result = embedder(ref, timeout_s)
    cache.put(ref.sha256, result)
    return result


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Find the k inventory items that look most like the photo",
    responses=problems(409, 413, 415, 422, 502, 503, 504),
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
    metrics: MetricsDep,
    k: K = 5,
    category: Category = None,
    min_price: Price = None,
    max_price: Price = None,
) -> SearchResponse:
    filters = make_filters(category, min_price, max_price)
    timer = StageTimer(metrics)
    with timer.stage("validate"):
        checked = validate_upload(image.file, settings.max_upload_bytes, settings.max_image_pixels)
    with timer.stage("store"):
        ref = store_image(store, "uploads", checked)

    def run(use_cache: bool) -> IndexerSearchResponse:
        with timer.stage("embed"):
            vector = _embed(ref, embedder, cache, metrics, settings.embed_timeout_s, use_cache)
        query = VectorQuery(
            vector=vector.vector, model_version=vector.model_version, k=k, filters=filters
        )
        with timer.stage("search"):
            return indexer.search(query)

    try:
        found = run(use_cache=True)
    except IndexerConflict:
        # The embedder's model changed since this vector was made: embed again, once.
        metrics.reembeds.inc()
        cache.drop(ref.sha256)
        found = run(use_cache=False)
    response.headers["Server-Timing"] = timer.header()
    return to_response(found, public_base(request, settings))
