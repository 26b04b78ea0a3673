"""POST /v1/recommend: examples from forms and JSON, one embedder batch, the query the indexer
gets, validation before anything is stored, and re-embedding after a model change."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fashionrec_shared.schemas import MAX_RECOMMEND_EXAMPLES, MAX_RECOMMEND_PHOTOS
from fashionrec_shared.storage import content_key
from fashionrec_shared.tasks import Colour, TaskName

from tests.gateway.conftest import Gateway
from tests.gateway.images import TEXT, jpeg
from tests.gateway.indexer import rank_vector
from tests.gateway.test_search import assert_problem, seed

RED = Colour(name="red", hex="#cc2028", share=0.6)
Files = list[tuple[str, tuple[str, bytes, str]]]


def photo(part: str, n: int = 0) -> tuple[str, tuple[str, bytes, str]]:
    """A distinct small JPEG per n."""
    return (part, (f"{part}{n}.jpg", jpeg((10 + 20 * n, 40, 90)), "image/jpeg"))


def recommend(
    gw: Gateway, files: Files | None = None, data: dict[str, Any] | None = None, **params: Any
) -> httpx.Response:
    return gw.client.post("/v1/recommend", params=params, files=files, data=data)


def recommend_json(gw: Gateway, body: Any, **params: Any) -> httpx.Response:
    return gw.client.post("/v1/recommend", params=params, json=body)


def sent_queries(gw: Gateway) -> list[dict[str, Any]]:
    return gw.indexer.calls_to("POST", "/recommend")


def embed_tasks(gw: Gateway) -> list[dict[str, Any]]:
    return [payload for task, payload, _ in gw.embedder.sent]


def uploads(gw: Gateway) -> set[str]:
    return {key for key in gw.stored() if key.startswith("uploads/")}


# ---- the input mixes --------------------------------------------------------------------------


def test_photos_are_embedded_in_one_batch_and_sent_with_their_colours(gateway: Gateway) -> None:
    ids = seed(gateway, 4)
    gateway.embedder.colours = [RED]
    files = [photo("like", 0), photo("like", 1), photo("dislike", 2)]
    response = recommend(gateway, files, k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predicted"] is None and body["model_version"] == "m1"
    assert [r["item_id"] for r in body["results"]] == ids[:3]
    first = body["results"][0]
    assert first["image_url"].startswith("http://testserver/v1/images/inventory/")
    assert first["reasons"]["score"] == pytest.approx(first["score"])
    assert first["reasons"]["like"] in (0, 1)

    [task] = gateway.embedder.sent
    assert task[0] == TaskName.EMBED_QUERIES
    assert len(task[1]["images"]) == 3
    expected = {content_key("uploads", f[1][1], "jpg")[0] for f in files}
    assert [image["key"] for image in task[1]["images"]] == [
        content_key("uploads", f[1][1], "jpg")[0] for f in files
    ]
    assert uploads(gateway) == expected
    [query] = sent_queries(gateway)
    assert (len(query["liked"]), len(query["disliked"])) == (2, 1)
    assert query["liked"][0]["colours"] == [RED.model_dump()]
    assert query["strategy"] == "average" and query["k"] == 3
    assert query["collapse"] is True and query["explain"] is True
    assert "index-ann" in response.headers["server-timing"]


def test_the_query_cache_answers_photos_seen_before(gateway: Gateway) -> None:
    seed(gateway)
    files = [photo("like", 0), photo("like", 1)]
    assert recommend(gateway, files).status_code == 200
    assert recommend(gateway, files).status_code == 200  # both cached now: no task
    assert len(gateway.embedder.sent) == 1
    # One new photo: only it goes to the embedder.
    assert recommend(gateway, [*files, photo("dislike", 5)]).status_code == 200
    assert [len(p["images"]) for p in embed_tasks(gateway)] == [2, 1]
    assert len(sent_queries(gateway)[-1]["disliked"]) == 1


def test_item_ids_alone_as_json_need_no_embedder(gateway: Gateway) -> None:
    ids = seed(gateway, 5)
    body = {"like_items": [ids[1]], "dislike_items": [ids[4].upper()], "exclude": [ids[0]]}
    response = recommend_json(gateway, body, k=5, strategy="best_score", negative_weight=1.5)
    assert response.status_code == 200, response.text
    got = [r["item_id"] for r in response.json()["results"]]
    # Examples and excluded items never answer.
    assert got and not set(got) & {ids[0], ids[1], ids[4]}
    assert gateway.embedder.sent == []
    [query] = sent_queries(gateway)
    assert query["liked_items"] == [ids[1]] and query["disliked_items"] == [ids[4]]
    assert query["exclude"] == [ids[0]]
    assert (query["strategy"], query["negative_weight"]) == ("best_score", 1.5)


def test_ids_in_a_form_urlencoded_or_multipart(gateway: Gateway) -> None:
    ids = seed(gateway, 4)
    urlencoded = recommend(gateway, data={"like_item": [ids[0], ids[1]], "exclude": ids[2]})
    assert urlencoded.status_code == 200, urlencoded.text
    assert [r["item_id"] for r in urlencoded.json()["results"]] == [ids[3]]
    mixed = recommend(
        gateway, [photo("like")], data={"like_item": ids[0], "dislike_item": ids[3]}, k=2
    )
    assert mixed.status_code == 200, mixed.text
    query = sent_queries(gateway)[-1]
    assert (len(query["liked"]), query["liked_items"], query["disliked_items"]) == (
        1,
        [ids[0]],
        [ids[3]],
    )
    assert [r["item_id"] for r in mixed.json()["results"]] == ids[1:3]


def test_parameters_reach_the_indexer(gateway: Gateway) -> None:
    ids = seed(gateway, 3)
    params = {"category": "tops", "max_price": 11.5, "min_score": 0.2}
    response = recommend_json(
        gateway, {"like_items": [ids[0]]}, collapse="false", explain="false", **params
    )
    assert response.status_code == 200, response.text
    assert [r["item_id"] for r in response.json()["results"]] == [ids[1]]  # price 11
    assert response.json()["results"][0]["reasons"] is None
    [query] = sent_queries(gateway)
    assert query["filters"]["category"] == "tops" and query["filters"]["max_price"] == 11.5
    assert (query["min_score"], query["collapse"], query["explain"]) == (0.2, False, False)


def test_a_model_change_re_embeds_the_photos_with_the_served_version(gateway: Gateway) -> None:
    seed(gateway)
    gateway.embedder.model_version, gateway.embedder.also_loaded = "m2", ("m1",)
    response = recommend(gateway, [photo("like", 0), photo("dislike", 1)])
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "m1"
    # Unknown at first: the primary (m2) answered, the indexer's 409 named m1, asked again.
    assert [p["model_version"] for p in embed_tasks(gateway)] == [None, "m1"]
    assert [q["model_version"] for q in sent_queries(gateway)] == ["m2", "m1"]


# ---- bad input: 4xx problems, nothing stored, nothing sent ------------------------------------

VALID_ID = str(uuid.UUID(int=7))


def _bad_form_cases() -> dict[str, tuple[Files | None, dict[str, Any] | None, dict[str, Any], int]]:
    too_many = [photo("like", n) for n in range(MAX_RECOMMEND_PHOTOS + 1)]
    return {
        "no liked example": ([photo("dislike")], None, {}, 422),
        "no example at all": (None, {"exclude": VALID_ID}, {}, 422),
        "malformed id": ([photo("like")], {"like_item": "not-an-id"}, {}, 422),
        "too many photos": (too_many, None, {}, 422),
        "liked and disliked": (None, {"like_item": VALID_ID, "dislike_item": VALID_ID}, {}, 422),
        "k 0": ([photo("like")], None, {"k": 0}, 422),
        "k 51": ([photo("like")], None, {"k": 51}, 422),
        "min_score 1.5": ([photo("like")], None, {"min_score": 1.5}, 422),
        "negative_weight 3": ([photo("like")], None, {"negative_weight": 3}, 422),
        "strategy": ([photo("like")], None, {"strategy": "median"}, 422),
        "not an image": ([photo("like"), ("like", ("x.jpg", TEXT, "image/jpeg"))], None, {}, 415),
        "unknown part": ([("image", ("a.jpg", jpeg(), "image/jpeg"))], None, {}, 422),
        "id as a file": ([photo("like"), ("like_item", ("a", b"id", "text/plain"))], None, {}, 422),
        "photo as text": (None, {"like": VALID_ID}, {}, 422),
    }


BAD_FORMS = _bad_form_cases()


@pytest.mark.parametrize("name", list(BAD_FORMS))
def test_bad_forms_store_and_send_nothing(gateway: Gateway, name: str) -> None:
    files, data, params, status = BAD_FORMS[name]
    assert_problem(recommend(gateway, files, data, **params), status)
    assert uploads(gateway) == set()
    assert gateway.embedder.sent == [] and sent_queries(gateway) == []


def test_problems_name_what_is_wrong(gateway: Gateway) -> None:
    bad_second = [photo("like"), ("like", ("x.jpg", TEXT, "image/jpeg"))]
    assert assert_problem(recommend(gateway, bad_second), 415)["detail"].startswith("like[1]: ")
    detail = assert_problem(recommend(gateway, data={"like_item": [VALID_ID, "x"]}), 422)["detail"]
    assert "like_item[1]" in detail and "not an item id" in detail
    detail = assert_problem(recommend(gateway, [photo("dislike")]), 422)["detail"]
    assert "no liked example" in detail
    many = [photo("like", n) for n in range(MAX_RECOMMEND_PHOTOS + 1)]
    assert (
        f"at most {MAX_RECOMMEND_PHOTOS}" in assert_problem(recommend(gateway, many), 422)["detail"]
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"dislike_items": [VALID_ID]},
        {"like_items": ["12"]},
        {"like_items": [VALID_ID], "image": "x"},
        {"like_items": VALID_ID},
        [VALID_ID],
        {"like_items": [str(uuid.UUID(int=n)) for n in range(MAX_RECOMMEND_EXAMPLES + 1)]},
    ],
)
def test_bad_json_bodies(gateway: Gateway, body: Any) -> None:
    assert_problem(recommend_json(gateway, body), 422)
    assert sent_queries(gateway) == []


def test_not_json_at_all(gateway: Gateway) -> None:
    raw = gateway.client.post(
        "/v1/recommend", content=b"{", headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_problem(raw, 422)["detail"]
    text = gateway.client.post(
        "/v1/recommend", content=b"like", headers={"content-type": "text/plain"}
    )
    assert "multipart/form-data" in assert_problem(text, 415)["detail"]
    assert assert_problem(gateway.client.post("/v1/recommend"), 415)


def test_unknown_items_are_a_problem_of_the_indexer(gateway: Gateway) -> None:
    seed(gateway)
    response = recommend_json(gateway, {"like_items": [VALID_ID]})
    body = assert_problem(response, 422)
    assert VALID_ID in body["detail"]


def test_several_photos_fit_the_body_limit(make_gateway: Callable[..., Gateway]) -> None:
    """Each photo has the upload limit; the request as a whole may hold all of them."""
    gw = make_gateway(max_upload_bytes=300_000)
    seed(gw)
    big = [photo("like", n) for n in range(3)]
    big = [
        (part, (name, data + b"\0" * (250_000 - len(data)), ct)) for part, (name, data, ct) in big
    ]
    response = recommend(gw, big)
    assert response.status_code == 200, response.text
    too_big = [("like", ("a.jpg", jpeg() + b"\0" * 300_001, "image/jpeg"))]
    assert "like[0]" in assert_problem(recommend(gw, too_big), 413)["detail"]


def test_recommend_counts_against_the_search_limit(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(rate_limit_search="1/minute")
    ids = seed(gw)
    assert recommend_json(gw, {"like_items": [ids[0]]}).status_code == 200
    assert_problem(recommend_json(gw, {"like_items": [ids[0]]}), 429)


def test_openapi_documents_both_bodies(gateway: Gateway) -> None:
    operation = gateway.client.get("/openapi.json").json()["paths"]["/v1/recommend"]["post"]
    content = operation["requestBody"]["content"]
    assert {"like", "dislike", "like_item", "dislike_item", "exclude"} <= set(
        content["multipart/form-data"]["schema"]["properties"]
    )
    assert {"like_items", "dislike_items", "exclude"} <= set(
        content["application/json"]["schema"]["properties"]
    )
    names = {p["name"] for p in operation["parameters"]}
    assert names >= {"k", "strategy", "negative_weight", "min_score", "collapse", "explain"}
    assert {"404", "413", "415", "422", "429", "503"} <= set(operation["responses"])
    assert "best_score" in operation["description"]


# ---- search and similar carry what the reasons need ---------------------------------------------


def test_search_sends_the_photos_predictions_colours_and_switches(gateway: Gateway) -> None:
    seed(gateway)
    gateway.embedder.colours = [RED]
    response = gateway.client.post(
        "/v1/search",
        params={"collapse": "false", "explain": "false"},
        files={"image": ("q.jpg", jpeg(), "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    [query] = gateway.indexer.calls_to("POST", "/search")
    assert query["colours"] == [RED.model_dump()] and query["predicted"] is None
    assert (query["collapse"], query["explain"]) == (False, False)
    assert all(r["reasons"] is None for r in response.json()["results"])


def test_results_and_items_carry_group_and_colours(gateway: Gateway) -> None:
    ids = seed(gateway, 2)
    item = gateway.client.get(f"/v1/items/{ids[0]}").json()
    assert "group" in item and "colours" in item
    similar = gateway.client.get(f"/v1/items/{ids[0]}/similar", params={"explain": "false"})
    assert similar.status_code == 200, similar.text
    assert {"group", "colours", "reasons"} <= set(similar.json()["results"][0])
    [params] = gateway.indexer.calls_to("GET", f"/items/{ids[0]}/similar")
    assert (params["collapse"], params["explain"]) == ("true", "false")


def test_vectors_steer_the_ranking(gateway: Gateway) -> None:
    """Each photo's own vector reaches the indexer: a photo like item 3 ranks it first."""
    ids = seed(gateway, 4)
    data = jpeg((1, 2, 3))
    gateway.embedder.vectors[content_key("uploads", data, "jpg")[1]] = rank_vector(3)
    response = recommend(gateway, [("like", ("a.jpg", data, "image/jpeg"))], k=1)
    assert [r["item_id"] for r in response.json()["results"]] == [ids[3]]
