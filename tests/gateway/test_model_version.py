"""The gateway during a model change: it asks the embedder for the version the indexer serves,
re-embeds once with the version a 409 names, caches vectors per version, and shows /v1/index."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fashionrec_gateway.embedding import QVEC_PREFIX, ServingVersion
from fashionrec_gateway.indexer_client import IndexerClient, IndexerConflict
from fashionrec_shared.storage import content_key

from tests.gateway.conftest import Gateway
from tests.gateway.images import jpeg
from tests.gateway.indexer import INDEXER_URL, problem


def search(gw: Gateway, data: bytes) -> httpx.Response:
    return gw.client.post("/v1/search", files={"image": ("q.jpg", data, "image/jpeg")})


def asked_versions(gw: Gateway) -> list[Any]:
    return [payload["model_version"] for _, payload, _ in gw.embedder.sent]


def searched_versions(gw: Gateway) -> list[str]:
    return [q["model_version"] for q in gw.indexer.calls_to("POST", "/search")]


def seed(gw: Gateway) -> None:
    for i in range(3):
        key, sha = content_key("inventory", f"item{i}".encode(), "jpg")
        gw.indexer.add_item(f"sku-{i}", key, sha)


def test_queries_ask_for_the_served_version_once_known(gateway: Gateway) -> None:
    seed(gateway)
    assert search(gateway, jpeg(color=(1, 2, 3))).status_code == 200
    assert search(gateway, jpeg(color=(4, 5, 6))).status_code == 200
    assert asked_versions(gateway) == [None, "m1"]


def test_during_a_change_queries_keep_the_old_version(gateway: Gateway) -> None:
    """Embedders hold the new model (primary) and the old one; the index still serves m1."""
    seed(gateway)
    gateway.embedder.model_version, gateway.embedder.also_loaded = "m2", ("m1",)
    first = search(gateway, jpeg(color=(1, 2, 3)))
    assert first.status_code == 200 and first.json()["model_version"] == "m1"
    # Unknown at first: the primary (m2) answered, the indexer's 409 named m1, asked again.
    assert asked_versions(gateway) == [None, "m1"]
    assert searched_versions(gateway) == ["m2", "m1"]
    second = search(gateway, jpeg(color=(7, 8, 9)))
    assert second.status_code == 200
    assert asked_versions(gateway)[2:] == ["m1"] and searched_versions(gateway)[2:] == ["m1"]


def test_after_the_swap_one_409_moves_the_gateway_to_the_new_version(gateway: Gateway) -> None:
    seed(gateway)
    gateway.embedder.model_version, gateway.embedder.also_loaded = "m2", ("m1",)
    search(gateway, jpeg(color=(4, 4, 4)))  # learns m1
    data = jpeg(color=(1, 2, 3))
    search(gateway, data)
    _, sha = content_key("uploads", data, "jpg")
    assert gateway.redis.exists(f"{QVEC_PREFIX}m1:{sha}")
    assert not gateway.redis.exists(f"{QVEC_PREFIX}m2:{sha}")
    gateway.indexer.serve("m2")  # the new index is swapped in
    before, calls = len(gateway.embedder.sent), len(searched_versions(gateway))
    response = search(gateway, data)  # cached m1 vector -> 409 naming m2 -> embed with m2
    assert response.status_code == 200 and response.json()["model_version"] == "m2"
    assert asked_versions(gateway)[before:] == ["m2"]
    assert searched_versions(gateway)[calls:] == ["m1", "m2"]
    assert gateway.redis.exists(f"{QVEC_PREFIX}m2:{sha}")
    # Later queries go straight to m2; the cached m2 vector serves a repeated photo.
    calls = len(searched_versions(gateway))
    assert search(gateway, data).status_code == 200
    assert searched_versions(gateway)[calls:] == ["m2"]
    assert len(gateway.embedder.sent) == before + 1


def test_index_info_is_passed_through_and_teaches_the_version(gateway: Gateway) -> None:
    seed(gateway)  # served by m1
    job_id = gateway.indexer.announce("m2")  # an embedder of m2 started: the inventory re-embeds
    response = gateway.client.get("/v1/index")
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "m1"
    assert (body["pending_model_version"], body["reembed_job_id"]) == ("m2", job_id)
    assert gateway.client.app.state.serving_version.value == "m1"


def test_index_info_when_the_indexer_is_down(gateway: Gateway) -> None:
    gateway.indexer.faults.down = True
    response = gateway.client.get("/v1/index")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")


def test_conflict_carries_the_served_version() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/search":
            return problem(409, "wrong model", model_version="m9")
        return problem(409, "no embedding yet")

    client = IndexerClient.create(INDEXER_URL, 5, transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(IndexerConflict) as named:
            client._request("POST", "/search")
        assert named.value.status == 409 and named.value.model_version == "m9"
        with pytest.raises(IndexerConflict) as unnamed:
            client._request("GET", "/items/x/similar")
        assert unnamed.value.model_version is None
    finally:
        client.close()


def test_serving_version_ignores_empty_answers() -> None:
    serving = ServingVersion()
    serving.update(None)
    assert serving.value is None
    serving.update("m1")
    serving.update("")
    assert serving.value == "m1"


def test_a_swap_during_the_request_gets_a_second_reembed(gateway: Gateway) -> None:
    """First 409 names m1 (the primary answered m2); by the retry the index serves m2."""
    seed(gateway)
    gateway.embedder.model_version, gateway.embedder.also_loaded = "m2", ("m1",)
    gateway.indexer.swap_after_next_conflict("m2")
    response = search(gateway, jpeg(color=(9, 9, 9)))
    assert response.status_code == 200 and response.json()["model_version"] == "m2"
    assert asked_versions(gateway) == [None, "m1"]  # m2 came from the cache of the first try
    assert searched_versions(gateway) == ["m2", "m1", "m2"]
