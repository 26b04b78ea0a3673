"""POST /recommend: results like the liked examples and unlike the disliked ones.

Examples are photos the gateway had embedded (`QueryExample`) and stored items (their vectors of
the served version). Liked examples are numbered photos first, in request order, then item ids:
a result's `reasons.like` names the one it is closest to. Strategies (RecommendQuery):

- `average`: one search with normalise(mean(liked) - negative_weight x mean(disliked)).
- `best_score`: candidates from one search per liked example (over-fetched), each scored
  max_i cos(c, liked_i) - negative_weight x max(0, max_j cos(c, disliked_j) - max_i cos(c,
  liked_i)), clamped to [-1, 1]. Candidates are re-scored from their own rows only
  (search.score_items), so the cost grows with the examples and k, not with the inventory.

Example items and `exclude`d ones never answer; filters, `min_score` and collapse apply as in
search (see ranking). Stages: `delta`, `examples` (the example items' vectors), `ann`,
`metadata`, `score` (the liked examples closest to the results, for their reasons).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import IndexerSearchResponse, RecommendQuery
from fastapi import APIRouter, Response

from fashionrec_indexer import repository as repo
from fashionrec_indexer.deps import EngineDep, MetricsDep, SettingsDep, SnapshotDep
from fashionrec_indexer.index_state import SnapshotView
from fashionrec_indexer.metrics import Metrics
from fashionrec_indexer.query_checks import (
    check_dim,
    check_served,
    decoded,
    normalise,
    search_fetch,
)
from fashionrec_indexer.ranking import Fetch, Hits, first_fetch, rank
from fashionrec_indexer.reasons import QuerySide, reasons_for
from fashionrec_indexer.responses import hits_out, stored_colours, stored_predictions
from fashionrec_indexer.search import SearchRequest, score_items, search, searchable_count
from fashionrec_indexer.stopwatch import Stopwatch

router = APIRouter()


@dataclass(frozen=True)
class Example:
    vector: np.ndarray  # normalised, the served dimension
    side: QuerySide  # its predictions and colours, for the results' reasons


def parse_ids(values: Sequence[str], field: str) -> list[uuid.UUID]:
    """Item ids of a body field; a malformed one is a 422 naming it."""
    parsed = []
    for n, value in enumerate(values):
        item_id = repo.parse_uuid(value)
        if item_id is None:
            raise ProblemError(
                422, "Unprocessable Content", f"{field}[{n}]: {value!r} is not an item id"
            )
        parsed.append(item_id)
    return parsed


def item_examples(
    rows: dict[uuid.UUID, Any], item_ids: Sequence[uuid.UUID], field: str, dim: int | None
) -> list[Example]:
    examples = []
    for n, item_id in enumerate(item_ids):
        row = rows.get(item_id)
        if row is None:
            raise ProblemError(
                422, "Unprocessable Content", f"{field}[{n}]: no item {str(item_id)!r}"
            )
        if row.vector is None or row.dim != dim:
            raise ProblemError(
                409, "Conflict", f"item {item_id} has no embedding for the active model yet"
            )
        vector = np.frombuffer(row.vector, dtype="<f4").astype(np.float32)
        side = QuerySide(stored_predictions(row.predicted), stored_colours(row.colours))
        examples.append(Example(normalise(vector, f"{field}[{n}]"), side))
    return examples


def average_query(liked: np.ndarray, disliked: np.ndarray, weight: float) -> np.ndarray:
    """normalise(mean(liked) - weight x mean(disliked)); rows are normalised vectors."""
    query = liked.mean(axis=0)
    if len(disliked):
        query = query - weight * disliked.mean(axis=0)
    return normalise(query, "the liked examples' mean less the disliked ones'")


def best_scores(to_liked: np.ndarray, to_disliked: np.ndarray | None, weight: float) -> np.ndarray:
    """Per candidate (rows): its best cosine to a liked example, less `weight` x how much
    closer it is to its closest disliked one; clamped to [-1, 1]."""
    best = to_liked.max(axis=1)
    if to_disliked is not None and to_disliked.shape[1]:
        best = best - weight * np.maximum(0.0, to_disliked.max(axis=1) - best)
    return np.clip(best, -1.0, 1.0)


def best_score_fetch(
    view: SnapshotView,
    request: SearchRequest,
    liked: np.ndarray,
    disliked: np.ndarray,
    weight: float,
    metrics: Metrics,
) -> Fetch:
    """n candidates of each liked example's search, re-scored by best_scores, best first."""

    def fetch(n: int) -> tuple[Hits, bool]:
        found: dict[uuid.UUID, None] = {}
        more = False
        for vector in liked:
            hits, stats = search(
                view.build, view.delta, dataclasses.replace(request, query=vector, k=n)
            )
            if stats.fallback:
                metrics.search_fallbacks.inc()
            more |= len(hits) >= n
            found.update(dict.fromkeys(item_id for item_id, _ in hits))
        ids = list(found)
        cosines = score_items(view.build, view.delta, ids, np.vstack([liked, disliked]))
        served = ~np.isnan(cosines).any(axis=1)
        scores = best_scores(cosines[:, : len(liked)], cosines[:, len(liked) :], weight)
        order = np.argsort(-scores, kind="stable")
        ranked = [(ids[i], float(scores[i])) for i in order if served[i]]
        return ranked[:n], more or len(ranked) > n

    return fetch


def empty(view: SnapshotView, body: RecommendQuery) -> IndexerSearchResponse:
    return IndexerSearchResponse(
        results=[],
        model_version=view.model_version or body.model_version,
        index_version=view.index_version,
    )


@router.post("/recommend", response_model=IndexerSearchResponse)
def recommend(
    body: RecommendQuery,
    response: Response,
    engine: EngineDep,
    snapshot: SnapshotDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> IndexerSearchResponse:
    watch = Stopwatch(metrics, "recommend")
    liked_photos = [decoded(e.vector, f"liked[{n}].vector") for n, e in enumerate(body.liked)]
    disliked_photos = [
        decoded(e.vector, f"disliked[{n}].vector") for n, e in enumerate(body.disliked)
    ]
    liked_ids = parse_ids(body.liked_items, "liked_items")
    disliked_ids = parse_ids(body.disliked_items, "disliked_items")
    excluded = parse_ids(body.exclude, "exclude")
    with engine.connect() as conn:
        view = snapshot.view(conn)
        watch.lap("delta")
        if searchable_count(view.build, view.delta) == 0:
            return empty(view, body)
        model_version = view.model_version
        assert model_version is not None
        # Only photos were embedded by the caller; stored items use the served version anyway.
        if body.liked or body.disliked:
            check_served(view, body.model_version)
        rows = repo.example_items(conn, [*liked_ids, *disliked_ids], model_version)
    watch.lap("examples")
    photo_sides = [QuerySide(e.predicted, e.colours) for e in body.liked]
    liked: list[Example] = []
    for n, (vector, side) in enumerate(zip(liked_photos, photo_sides, strict=True)):
        check_dim(vector, view.dim, f"liked[{n}].vector")
        liked.append(Example(normalise(vector, f"liked[{n}].vector"), side))
    disliked: list[Example] = []
    for n, vector in enumerate(disliked_photos):
        check_dim(vector, view.dim, f"disliked[{n}].vector")
        disliked.append(Example(normalise(vector, f"disliked[{n}].vector"), QuerySide()))
    liked += item_examples(rows, liked_ids, "liked_items", view.dim)
    disliked += item_examples(rows, disliked_ids, "disliked_items", view.dim)

    liked_matrix = np.vstack([e.vector for e in liked])
    disliked_matrix = np.empty((len(disliked), liked_matrix.shape[1]), dtype=np.float32)
    for row, example in enumerate(disliked):
        disliked_matrix[row] = example.vector
    weight = body.negative_weight
    request = SearchRequest(
        liked_matrix[0],
        body.k,
        body.filters,
        exclude=frozenset([*liked_ids, *disliked_ids, *excluded]),
        search_k=settings.search_k,
        candidates=settings.ann_candidates,
    )
    if body.strategy == "average":
        query = average_query(liked_matrix, disliked_matrix, weight)
        fetch = search_fetch(view, dataclasses.replace(request, query=query), metrics)
        start = first_fetch(body.k, body.collapse)
    else:
        fetch = best_score_fetch(view, request, liked_matrix, disliked_matrix, weight, metrics)
        # Over-fetched even without collapse: a disliked example pushes candidates down.
        start = first_fetch(body.k, True)
    with engine.connect() as conn:
        ranked = rank(
            conn,
            fetch,
            body.k,
            model_version,
            collapse=body.collapse,
            min_score=body.min_score,
            start=start,
            max_candidates=settings.max_candidates,
            lap=watch.lap,
        )
    reasons = None
    if body.explain and ranked.hits:
        ids = [item_id for item_id, _ in ranked.hits]
        closest = np.nan_to_num(
            score_items(view.build, view.delta, ids, liked_matrix), nan=-np.inf
        ).argmax(axis=1)
        reasons = {}
        for (item_id, score), like in zip(ranked.hits, closest, strict=True):
            row = ranked.rows[item_id]
            hit = QuerySide(stored_predictions(row.predicted), stored_colours(row.colours))
            reasons[item_id] = reasons_for(score, hit, liked[int(like)].side, like=int(like))
        watch.lap("score")
    found = IndexerSearchResponse(
        results=hits_out(ranked.hits, ranked.rows, reasons),
        model_version=model_version,
        index_version=view.index_version,
    )
    watch.total()
    response.headers["Server-Timing"] = watch.server_timing()
    return found
