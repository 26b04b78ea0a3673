"""POST /v1/recommend: liked and disliked examples (photos and item ids) in, ranked items out."""

from __future__ import annotations

import time
from typing import Annotated, BinaryIO

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import (
    MAX_EXCLUDE,
    MAX_RECOMMEND_EXAMPLES,
    MAX_RECOMMEND_PHOTOS,
    IndexerSearchResponse,
    QueryExample,
    RecommendQuery,
    RecommendStrategy,
    SearchResponse,
)
from fashionrec_shared.tasks import ImageRef
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError

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
from fashionrec_gateway.metrics import StageTimer
from fashionrec_gateway.query_vectors import embed_many, record_embed
from fashionrec_gateway.recommend_input import REQUEST_BODY, Examples, read_examples
from fashionrec_gateway.reembed import with_served_version
from fashionrec_gateway.responses import problems
from fashionrec_gateway.results import Collapse, Explain, FiltersDep, K, to_response
from fashionrec_gateway.urls import public_base
from fashionrec_gateway.validation import ValidatedImage, validate_upload

router = APIRouter(prefix="/v1", tags=["recommend"])

DESCRIPTION = f"""
A "more like these, not like that" feed: any mix of liked and disliked examples, as photos and
as item ids (results' `item_id`), ranks the inventory; example items and `exclude`d ones never
answer. Same answer as search (`predicted` is null); each result's `reasons.like` names the liked
example it is closest to (liked photos in request order, then liked item ids).

**Body**, one of:
- `multipart/form-data`: `like` and `dislike` photo parts, `like_item`, `dislike_item` and
  `exclude` item-id parts, each repeatable (`curl -F like=@a.jpg -F like_item=ID …`);
  `application/x-www-form-urlencoded` with the id parts works too.
- `application/json` for id-only requests:
  `{{"like_items": [...], "dislike_items": [...], "exclude": [...]}}`.

At least one liked example; at most {MAX_RECOMMEND_PHOTOS} photos and {MAX_RECOMMEND_EXAMPLES}
examples in all, {MAX_EXCLUDE} excluded items. Photos are checked like search's (formats, size,
pixels) and embedded in one batch; item ids use the vectors stored for them.

**Strategies**: `average` ranks by one query vector, the mean of the liked examples minus
`negative_weight` x the mean of the disliked ones; `best_score` gives each item its best cosine
to any liked example, less `negative_weight` x how much closer it is to its closest disliked one.
"""

Strategy = Annotated[
    RecommendStrategy,
    Query(description="`average` (one blended query vector) or `best_score` (see above)"),
]
NegativeWeight = Annotated[
    float, Query(ge=0.0, le=2.0, description="how much the disliked examples push away")
]
MinScore = Annotated[
    float | None,
    Query(ge=-1.0, le=1.0, description="only results scoring at least this (-1..1)"),
]


def _checked_photos(
    photos: list[BinaryIO], what: str, max_bytes: int, max_pixels: int
) -> list[ValidatedImage]:
    """Each photo as search checks it; the problem names the part (`like[1]: …`)."""
    checked = []
    for n, stream in enumerate(photos):
        try:
            checked.append(validate_upload(stream, max_bytes, max_pixels))
        except ProblemError as exc:
            raise ProblemError(
                exc.status, exc.title, f"{what}[{n}]: {exc.detail}", headers=exc.headers
            ) from exc
    return checked


@router.post(
    "/recommend",
    response_model=SearchResponse,
    summary="Rank the inventory by liked and disliked examples (photos and item ids)",
    description=DESCRIPTION,
    responses=problems(404, 409, 413, 415, 422, 429, 502, 503, 504, 507),
    dependencies=[SearchLimitDep],
    openapi_extra={"requestBody": REQUEST_BODY},
)
def recommend(
    request: Request,
    response: Response,
    examples: Annotated[Examples, Depends(read_examples)],
    settings: SettingsDep,
    store: BlobStoreDep,
    indexer: IndexerDep,
    embedder: QueryEmbedderDep,
    cache: QueryCacheDep,
    serving: ServingVersionDep,
    metrics: MetricsDep,
    filters: FiltersDep,
    k: K = 5,
    strategy: Strategy = "average",
    negative_weight: NegativeWeight = 0.5,
    min_score: MinScore = None,
    collapse: Collapse = True,
    explain: Explain = True,
) -> SearchResponse:
    timer = StageTimer(metrics)
    started = getattr(request.state, "started", None)
    if started is not None:
        timer.record("upload", time.perf_counter() - started)
    limits = (settings.max_upload_bytes, settings.max_image_pixels)
    # Every photo is checked before any is stored: no blobs for a request that fails.
    with timer.stage("validate"):
        liked = _checked_photos(examples.liked_photos, "like", *limits)
        disliked = _checked_photos(examples.disliked_photos, "dislike", *limits)
    with timer.stage("store"):
        refs: list[ImageRef] = [store_image(store, "uploads", p) for p in (*liked, *disliked)]

    def run(model_version: str | None) -> IndexerSearchResponse:
        """The indexer's answer, the photos embedded with `model_version`."""
        vectors = []
        if refs:
            t0 = time.perf_counter()
            with timer.stage("embed"):
                vectors, fresh = embed_many(
                    refs, embedder, cache, metrics, settings.embed_timeout_s, model_version
                )
            if fresh is not None:
                record_embed(timer, fresh, time.perf_counter() - t0)
            model_version = vectors[0].model_version
        elif model_version is None:  # nothing seen yet: ask which version the index serves
            model_version = indexer.index_info().model_version or ""
        photos = [
            QueryExample(vector=v.vector, predicted=v.predicted, colours=v.colours) for v in vectors
        ]
        try:
            query = RecommendQuery(
                model_version=model_version,
                liked=photos[: len(liked)],
                disliked=photos[len(liked) :],
                liked_items=examples.liked_items,
                disliked_items=examples.disliked_items,
                strategy=strategy,
                negative_weight=negative_weight,
                k=k,
                filters=filters,
                exclude=examples.exclude,
                min_score=min_score,
                collapse=collapse,
                explain=explain,
            )
        except ValidationError as exc:  # pragma: no cover - read_examples checked the limits
            raise ProblemError(422, "Unprocessable Content", str(exc)) from exc
        with timer.stage("recommend"):
            found, index_timings = indexer.recommend_timed(query)
        for name, seconds in index_timings.items():
            timer.record(f"index-{name}", seconds)
        return found

    found = with_served_version(serving, metrics, run)
    serving.update(found.model_version)
    with timer.stage("respond"):
        answer = to_response(found, public_base(request, settings))
    response.headers["Server-Timing"] = timer.header()
    return answer
