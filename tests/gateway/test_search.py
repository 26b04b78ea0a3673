"""POST /v1/search: validation, storage, query-vector cache, embedder and indexer failures."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fashionrec_gateway.embedding import QVEC_PREFIX
from fashionrec_shared.storage import content_key
from fashionrec_shared.tasks import EmbedQueryResult, TaskName

from tests.gateway.conftest import Gateway
from tests.gateway.images import TEXT, jpeg, noisy_png, png_announcing, truncated_jpeg


def search(gw: Gateway, data: bytes, **params: Any) -> httpx.Response:
    return gw.client.post(
        "/v1/search", params=params, files={"image": ("photo.jpg", data, "image/jpeg")}
    )


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["detail"]
    return body


def seed(gw: Gateway, n: int = 3) -> list[str]:
    ids = []
    for i in range(n):
        key, sha = content_key("inventory", f"item{i}".encode(), "jpg")
        ids.append(gw.indexer.add_item(f"sku-{i}", key, sha, price=10.0 + i, category="tops"))
    return ids


BAD = {
    "text file": (TEXT, 415),
    "empty file": (b"", 422),
    "truncated jpeg": (truncated_jpeg(), 422),
    "decompression bomb": (png_announcing(100_000, 100_000), 413),
    "tiny image": (jpeg(size=(4, 4)), 422),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_images_store_nothing(gateway: Gateway, name: str) -> None:
    data, status = BAD[name]
    assert_problem(search(gateway, data), status)
    assert gateway.stored() == set()
    assert gateway.embedder.sent == []
    assert gateway.indexer.calls_to("POST", "/search") == []
    assert gateway.client.get("/livez").status_code == 200


@pytest.mark.parametrize(
    "params",
    [{"k": 0}, {"k": 51}, {"k": -1}, {"min_price": -1}, {"min_price": 5, "max_price": 1}],
)
def test_bad_parameters(gateway: Gateway, params: dict[str, Any]) -> None:
    assert_problem(search(gateway, jpeg(), **params), 422)
    assert gateway.stored() == set()


def test_two_image_parts_are_a_422(gateway: Gateway) -> None:
    """Which photo was meant is a guess: the search used one of them silently."""
    files = [
        ("image", ("a.jpg", jpeg(), "image/jpeg")),
        ("image", ("b.jpg", jpeg((1, 2, 3)), "image/jpeg")),
    ]
    body = assert_problem(gateway.client.post("/v1/search", files=files), 422)
    assert "2 `image` parts" in body["detail"]
    assert gateway.stored() == set()
    assert gateway.embedder.sent == []


@pytest.mark.parametrize("name", ["category", "predicted_category"])
def test_nul_in_a_filter_is_a_422(gateway: Gateway, name: str) -> None:
    body = assert_problem(search(gateway, jpeg(), **{name: "dr\x00ess"}), 422)
    assert f"query.{name}: contains a NUL" in body["detail"]
    assert gateway.indexer.calls_to("POST", "/search") == []
    [item_id] = seed(gateway, 1)
    similar = gateway.client.get(f"/v1/items/{item_id}/similar", params={name: "\x00"})
    assert f"query.{name}" in assert_problem(similar, 422)["detail"]


def test_missing_image_field(gateway: Gateway) -> None:
    body = assert_problem(gateway.client.post("/v1/search", data={"x": "y"}), 422)
    assert "image" in body["detail"]


def test_upload_over_the_limit(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(max_upload_bytes=2000)
    big = noisy_png((64, 64))
    assert len(big) > 2000
    assert_problem(search(gw, big), 413)
    # Far over the limit: refused from Content-Length before the body is parsed.
    body = assert_problem(search(gw, b"\xff" * 2_000_000), 413)
    assert "request body" in body["detail"]
    assert gw.stored() == set()


def test_search_happy_path(gateway: Gateway) -> None:
    ids = seed(gateway)
    data = jpeg()
    response = search(gateway, data, k=2, category="tops", min_price=1)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "m1"
    assert body["index_version"] == gateway.indexer.index_version
    assert [r["item_id"] for r in body["results"]] == ids[:2]
    first = body["results"][0]
    sha = gateway.indexer.items[ids[0]]["image"]["sha256"]
    assert first["image_url"] == f"http://testserver/v1/images/inventory/{sha}.jpg"
    assert first["sku"] == "sku-0"
    assert first["score"] >= body["results"][1]["score"]
    # The query image is stored content-addressed under uploads/.
    key, query_sha = content_key("uploads", data, "jpg")
    assert gateway.stored() == {key}
    # One EMBED_QUERY task with the stored key; the indexer got the vector and the filters.
    [(task, payload, options)] = gateway.embedder.sent
    assert task == TaskName.EMBED_QUERY
    # The first query of a process does not know the served version yet: the primary model.
    assert payload == {"image": {"key": key, "sha256": query_sha}, "model_version": None}
    assert options["expires"] == gateway.settings.embed_timeout_s
    [query] = gateway.indexer.calls_to("POST", "/search")
    assert query["k"] == 2
    assert query["model_version"] == "m1"
    assert query["filters"] == {
        "category": "tops",
        "min_price": 1.0,
        "max_price": None,
        "predicted_category": None,
    }
    # A model without prediction heads: no predictions anywhere.
    assert body["predicted"] is None and first["predicted"] is None
    timing = response.headers["server-timing"]
    for stage in ("validate", "store", "embed", "search"):
        assert f"{stage};dur=" in timing


def test_public_url_is_the_base_of_image_urls(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(public_url="https://cdn.example.com/shop/")
    seed(gw, 1)
    url = search(gw, jpeg()).json()["results"][0]["image_url"]
    assert url.startswith("https://cdn.example.com/shop/v1/images/inventory/")


def test_empty_inventory(gateway: Gateway) -> None:
    body = search(gateway, jpeg()).json()
    assert body["results"] == []


def test_cache_hit_skips_embedding(gateway: Gateway) -> None:
    seed(gateway)
    data = jpeg()
    first = search(gateway, data)
    second = search(gateway, data)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert len(gateway.embedder.sent) == 1
    _, sha = content_key("uploads", data, "jpg")
    key = f"{QVEC_PREFIX}m1:{sha}"
    assert 0 < gateway.redis.ttl(key) <= gateway.settings.query_cache_ttl_s
    cached = EmbedQueryResult.model_validate_json(gateway.redis.get(key))
    assert cached.model_version == "m1"
    assert len(gateway.indexer.calls_to("POST", "/search")) == 2


def test_model_change_reembeds_once(gateway: Gateway) -> None:
    seed(gateway)
    data = jpeg()
    search(gateway, data)
    # The embedder and indexer moved to a new model; the cached vector is stale.
    gateway.embedder.model_version = "m2"
    gateway.indexer.serve("m2")
    response = search(gateway, data)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "m2"
    assert len(gateway.embedder.sent) == 2
    assert [q["model_version"] for q in gateway.indexer.calls_to("POST", "/search")] == [
        "m1",
        "m1",
        "m2",
    ]
    _, sha = content_key("uploads", data, "jpg")
    assert b'"m2"' in gateway.redis.get(f"{QVEC_PREFIX}m2:{sha}")
    # The retry asked the embedder for the version the 409 named.
    assert [p["model_version"] for _, p, _ in gateway.embedder.sent] == [None, "m2"]


def test_persistent_conflict_is_a_409_after_one_retry(gateway: Gateway) -> None:
    seed(gateway)  # an empty index answers any version with no results
    gateway.indexer.serve("other")  # a version no embedder holds
    body = assert_problem(search(gateway, jpeg()), 409)
    assert "index uses 'other'" in body["detail"]
    assert len(gateway.embedder.sent) == 2
    assert len(gateway.indexer.calls_to("POST", "/search")) == 2


def test_embed_timeout_is_504(gateway: Gateway) -> None:
    gateway.embedder.timeout()
    body = assert_problem(search(gateway, jpeg()), 504)
    assert "embedder" in body["detail"]
    assert gateway.client.get("/livez").status_code == 200


def test_embedder_failure_is_502(gateway: Gateway) -> None:
    gateway.embedder.error = ValueError("cannot identify image file")
    body = assert_problem(search(gateway, jpeg()), 502)
    assert "cannot identify" in body["detail"]


def test_indexer_unreachable_is_503(gateway: Gateway) -> None:
    gateway.indexer.faults.down = True
    body = assert_problem(search(gateway, jpeg()), 503)
    assert "indexer" in body["detail"]


def test_indexer_4xx_is_passed_through(gateway: Gateway) -> None:
    gateway.indexer.dim = 2048  # the index holds 2048-d vectors; the embedder answers 8-d ones
    seed(gateway, 1)
    body = assert_problem(search(gateway, jpeg()), 422)
    assert body["detail"] == "vector has 8 dimensions, expected 2048"


def test_indexer_5xx_is_502(gateway: Gateway) -> None:
    gateway.indexer.faults.answer("POST", "/search", 500, "boom")
    assert_problem(search(gateway, jpeg()), 502)


def test_metrics_count_stages_and_requests(gateway: Gateway) -> None:
    search(gateway, jpeg())
    text = gateway.client.get("/metrics").text
    assert 'fashionrec_gateway_stage_seconds_count{stage="embed"} 1.0' in text
    assert 'fashionrec_gateway_query_cache_total{result="miss"} 1.0' in text
    assert (
        'fashionrec_gateway_requests_total{method="POST",route="/v1/search",status="200"} 1.0'
        in text
    )
