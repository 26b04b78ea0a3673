"""POST /recommend: both strategies on constructed vectors (from the delta and from a build),
examples and `exclude` never answering, `min_score`, reasons' `like`, and every problem."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from fashionrec_indexer.routers.recommend import best_scores
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_shared.schemas import MAX_RECOMMEND_PHOTOS
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from tests.indexer.conftest import DIM, MODEL, SCORE_ATOL, add_item, upsert
from tests.indexer.test_api import client, problem, settings  # noqa: F401 (fixtures)
from tests.indexer.test_ranking import serve_build


def unit(*weights: float) -> np.ndarray:
    """A normalised vector with the given leading coordinates (the rest 0)."""
    vector = np.zeros(DIM, dtype=np.float32)
    vector[: len(weights)] = weights
    return vector / np.linalg.norm(vector)


A, B, C, D = (unit(*np.eye(4)[n]) for n in range(4))
# Around three liked/disliked directions: A and B liked, C disliked in the tests below.
CATALOGUE = {
    "A": A,
    "B": B,
    "C": C,
    "AB": unit(1, 1, 0, 0),  # between the liked two
    "A1": unit(1, 0, 0, 0.3),  # near A only
    "B1": unit(0, 1, 0, 0.45),  # near B only
    "AC": unit(1, 0, 1.5, 0),  # near A, nearer C
    "C1": unit(0, 0, 1, 0.1),  # near C
    "D": D,  # far from all
}


def photo(vector: np.ndarray) -> dict:
    return {"vector": encode_vector(vector)}


def post(api: TestClient, **body: object):  # type: ignore[no-untyped-def]
    return api.post("/recommend", json={"model_version": MODEL, **body})


def recommend(api: TestClient, **body: object) -> dict:
    response = post(api, **body)
    assert response.status_code == 200, response.text
    return response.json()


def skus(answer: dict) -> list[str]:
    return [hit["sku"] for hit in answer["results"]]


@pytest.fixture(params=["delta", "build"])
def catalogue(
    request: pytest.FixtureRequest,
    client: TestClient,  # noqa: F811
    engine: Engine,
    settings: IndexerSettings,  # noqa: F811
) -> dict[str, uuid.UUID]:
    ids = {sku: add_item(engine, sku, vector) for sku, vector in CATALOGUE.items()}
    if request.param == "build":
        serve_build(client, engine, settings)
    return ids


def expected(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda sku: -scores[sku])


def test_average_subtracts_the_disliked_mean(
    client: TestClient,  # noqa: F811
    catalogue: dict[str, uuid.UUID],
) -> None:
    body = {
        "liked_items": [str(catalogue["A"]), str(catalogue["B"])],
        "disliked_items": [str(catalogue["C"])],
        "k": 6,
    }
    answer = recommend(client, **body)
    query = (A + B) / 2 - 0.5 * C
    query /= np.linalg.norm(query)
    scores = {s: float(v @ query) for s, v in CATALOGUE.items() if s not in ("A", "B", "C")}
    assert skus(answer) == expected(scores)  # AB, A1, B1, D, AC, C1
    for hit in answer["results"]:
        assert hit["score"] == pytest.approx(scores[hit["sku"]], abs=SCORE_ATOL)
    # Without the dislike the item nearer C than A ranks above the one far from everything.
    liked_only = recommend(client, **{**body, "disliked_items": [], "k": 20})
    answer = recommend(client, **{**body, "k": 20})
    assert skus(liked_only).index("AC") < skus(liked_only).index("D")
    assert skus(answer).index("AC") > skus(answer).index("D")
    # A heavier weight moves further from C: its neighbour drops to the last place anyway.
    heavy = recommend(client, **{**body, "k": 20}, negative_weight=2.0)
    assert skus(heavy)[-1] == "C1"


def test_best_score_penalises_candidates_closer_to_a_disliked_example(
    client: TestClient,  # noqa: F811
    catalogue: dict[str, uuid.UUID],
) -> None:
    liked, disliked = [A, B], [C]
    body = {
        "liked": [photo(A)],
        "liked_items": [str(catalogue["B"])],
        "disliked": [photo(C)],
        "strategy": "best_score",
        "k": 5,
    }
    answer = recommend(client, **body)

    def score(v: np.ndarray, weight: float = 0.5) -> float:
        best = max(float(v @ q) for q in liked)
        closest = max(float(v @ q) for q in disliked)
        return max(-1.0, min(1.0, best - weight * max(0.0, closest - best)))

    # A is a liked photo, not an example item: it may answer (it is the best match).
    scores = {s: score(v) for s, v in CATALOGUE.items() if s != "B"}
    assert skus(answer) == expected(scores)[:5]  # A, A1, B1, AB, AC
    for hit in answer["results"]:
        assert hit["score"] == pytest.approx(scores[hit["sku"]], abs=SCORE_ATOL)
    # `like`: liked photos first, then liked items; each hit names the example it is nearest.
    likes = {hit["sku"]: hit["reasons"]["like"] for hit in answer["results"]}
    assert likes == {"A": 0, "A1": 0, "AC": 0, "B1": 1, "AB": likes["AB"]}
    # C's neighbour: closer to C than to any liked example, so below D (which shares nothing).
    everything = recommend(client, **{**body, "k": 20})
    assert skus(everything)[-2:] == ["C1", "C"]
    weights = {w: recommend(client, **{**body, "k": 20}, negative_weight=w) for w in (0.0, 2.0)}
    by_weight = {w: {h["sku"]: h["score"] for h in a["results"]} for w, a in weights.items()}
    assert by_weight[0.0]["C1"] == pytest.approx(score(CATALOGUE["C1"], 0.0), abs=SCORE_ATOL)
    assert by_weight[2.0]["C1"] == pytest.approx(score(CATALOGUE["C1"], 2.0), abs=SCORE_ATOL)


def test_best_scores_formula_and_clamp() -> None:
    liked = np.array([[0.8, 0.1], [0.2, 0.5], [0.2, -0.3]])
    disliked = np.array([[0.9], [0.1], [1.0]])
    # 0.8 - 0.5 x (0.9 - 0.8); no penalty below the best liked; -1.4 clamped.
    assert best_scores(liked, disliked, 0.5).tolist() == pytest.approx([0.75, 0.5, -0.2])
    assert best_scores(liked, disliked, 2.0).tolist() == pytest.approx([0.6, 0.5, -1.0])
    assert best_scores(liked, None, 1.0).tolist() == pytest.approx([0.8, 0.5, 0.2])


def test_examples_and_excluded_items_never_answer_and_min_score_cuts(
    client: TestClient,  # noqa: F811
    catalogue: dict[str, uuid.UUID],
) -> None:
    for strategy in ("average", "best_score"):
        base = {"liked_items": [str(catalogue["A"])], "strategy": strategy, "k": 20}
        everything = skus(recommend(client, **base))
        assert "A" not in everything and len(everything) == len(CATALOGUE) - 1
        excluded = [str(catalogue["A1"]), str(catalogue["AB"]), str(uuid.uuid4())]  # unknown
        answer = recommend(client, **base, exclude=excluded)
        assert skus(answer) == [s for s in everything if s not in ("A1", "AB")]
        problem(post(client, **base, exclude=["not-an-id"]), 422)
        # cos(A, AC) = 0.55, cos(A, AB) = 0.71, cos(A, A1) = 0.96: two above 0.6.
        high = recommend(client, **base, min_score=0.6)
        assert skus(high) == ["A1", "AB"]
        assert all(hit["score"] >= 0.6 for hit in high["results"])
        assert recommend(client, **base, min_score=0.99)["results"] == []


def test_filters_apply(client: TestClient, engine: Engine) -> None:  # noqa: F811
    a = add_item(engine, "A", A, category="shoes", price=10)
    add_item(engine, "A1", CATALOGUE["A1"], category="bags", price=20)
    add_item(engine, "AB", CATALOGUE["AB"], category="shoes", price=30)
    for strategy in ("average", "best_score"):
        base = {"liked_items": [str(a)], "strategy": strategy}
        assert skus(recommend(client, **base, filters={"category": "shoes"})) == ["AB"]
        assert skus(recommend(client, **base, filters={"max_price": 25})) == ["A1"]


def test_problems(client: TestClient, engine: Engine) -> None:  # noqa: F811
    # An empty index answers no results (any model version, like search).
    assert recommend(client, liked=[photo(A)], model_version="other")["results"] == []
    a = add_item(engine, "A", A)
    add_item(engine, "B", B)
    unknown = str(uuid.uuid4())
    body = problem(post(client, liked_items=[str(a)], disliked_items=[unknown]), 422)
    assert unknown in body["detail"] and "disliked_items[0]" in body["detail"]
    body = problem(post(client, liked_items=[unknown]), 422)
    assert unknown in body["detail"]
    problem(post(client, liked_items=["nope"]), 422)
    pending, _ = upsert(engine, "PENDING")
    body = problem(post(client, liked_items=[str(pending)]), 409)
    assert str(pending) in body["detail"]
    problem(post(client, liked=[photo(np.ones(DIM + 1))]), 422)
    problem(post(client, liked=[photo(A)], disliked=[photo(np.ones(DIM - 1))]), 422)
    problem(post(client, liked=[photo(np.zeros(DIM))]), 422)
    problem(post(client, liked=[{"vector": "%%%"}]), 422)
    body = problem(post(client, liked=[photo(A)], model_version="other"), 409)
    assert body["model_version"] == MODEL
    # Item ids only: nothing was embedded by the caller, any version names the served one.
    assert skus(recommend(client, liked_items=[str(a)], model_version="other")) == ["B"]
    # The contract's own limits.
    problem(post(client), 422)  # no liked example
    problem(post(client, disliked=[photo(A)]), 422)
    problem(post(client, liked=[photo(A)] * (MAX_RECOMMEND_PHOTOS + 1)), 422)
    problem(post(client, liked_items=[str(a)] * 33), 422)
    problem(post(client, liked=[photo(A)], k=0), 422)
    problem(post(client, liked=[photo(A)], k=51), 422)
    problem(post(client, liked=[photo(A)], strategy="median"), 422)
    problem(post(client, liked=[photo(A)], negative_weight=3), 422)
    # Liked and disliked cancelling out leave no direction to search.
    problem(post(client, liked=[photo(A)], disliked=[photo(A)], negative_weight=1.0), 422)


def test_recommend_sends_server_timing(client: TestClient, engine: Engine) -> None:  # noqa: F811
    a = add_item(engine, "A", A)
    add_item(engine, "B", B)
    response = post(client, liked_items=[str(a)], strategy="best_score")
    assert response.status_code == 200, response.text
    for stage in ("delta", "examples", "ann", "metadata", "score"):
        assert f"{stage};dur=" in response.headers["server-timing"]
    assert 'endpoint="recommend"' in client.get("/metrics").text
