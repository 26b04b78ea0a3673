"""Query parameters shared by search, similar and recommend; indexer hits out as public results
with image URLs."""

from __future__ import annotations

from typing import Annotated

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import (
    MAX_K,
    IndexerSearchResponse,
    SearchFilters,
    SearchResponse,
    SearchResult,
    StoredText,
)
from fashionrec_shared.tasks import Predicted
from fastapi import Depends, Query

from fashionrec_gateway.urls import image_url

K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
Category = Annotated[StoredText | None, Query(max_length=128, description="only this category")]
Price = Annotated[float | None, Query(ge=0)]
PredictedCategory = Annotated[
    StoredText | None,
    Query(
        max_length=128,
        description="only items whose image the served model predicts as this category "
        "(see `predicted` in results); items without a prediction never match",
    ),
]


def make_filters(
    category: Category = None,
    min_price: Price = None,
    max_price: Price = None,
    predicted_category: PredictedCategory = None,
) -> SearchFilters:
    """The optional filters of search and similar, as one query-parameter dependency."""
    if min_price is not None and max_price is not None and min_price > max_price:
        raise ProblemError(422, "Unprocessable Content", "min_price is greater than max_price")
    return SearchFilters(
        category=category or None,
        min_price=min_price,
        max_price=max_price,
        predicted_category=predicted_category or None,
    )


FiltersDep = Annotated[SearchFilters, Depends(make_filters)]

Collapse = Annotated[
    bool,
    Query(
        description="one result per variant `group` (the best-scoring item of each); false: "
        "every variant may answer",
    ),
]
Explain = Annotated[
    bool,
    Query(
        description="give each result `reasons`: the predicted category and attributes and the "
        "dominant colours it shares with the query, and its score; false: `reasons` is null",
    ),
]


def to_response(
    found: IndexerSearchResponse, base: str, predicted: Predicted | None = None
) -> SearchResponse:
    """Public results; `predicted`: the query photo's predictions (search only)."""
    return SearchResponse(
        results=[
            SearchResult(
                item_id=hit.item_id,
                sku=hit.sku,
                title=hit.title,
                category=hit.category,
                price=hit.price,
                score=hit.score,
                image_url=image_url(base, hit.image.key),
                predicted=hit.predicted,
                group=hit.group,
                colours=hit.colours,
                reasons=hit.reasons,
            )
            for hit in found.results
        ],
        model_version=found.model_version,
        index_version=found.index_version,
        predicted=predicted,
    )
