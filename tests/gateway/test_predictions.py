"""Model predictions in the gateway: `predicted` on items, results and the query, the
`predicted_category` filter, `same_category=true`, the query cache keeping predictions, and the
embedders behind GET /v1/index."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fashionrec_gateway.embedders import group_embedders, parse_heartbeat
from fashionrec_gateway.embedding import QVEC_PREFIX
from fashionrec_shared.schemas import EmbedderInfo
from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.storage import content_key
from fashionrec_shared.tasks import EmbedQueryResult, Predicted
from fashionrec_shared.vectors import encode_vector

from tests.gateway.conftest import Gateway
from tests.gateway.fakes import unit_vector
from tests.gateway.images import jpeg
from tests.gateway.test_search import assert_problem

DRESS = Predicted.model_validate(
    {
        "category": {"label": "dress", "confidence": 0.83},
        "attributes": {
            "texture": [{"label": "floral", "confidence": 0.61}],
            "style": [{"label": "summer", "confidence": 0.4}, {"label": "boho", "confidence": 0.2}],
        },
    }
)
SHIRT = Predicted.model_validate({"category": {"label": "shirt", "confidence": 0.7}})


def search(gw: Gateway, data: bytes | None = None, **params: Any) -> httpx.Response:
    photo = data if data is not None else jpeg()
    return gw.client.post(
        "/v1/search", params=params, files={"image": ("q.jpg", photo, "image/jpeg")}
    )


def seed(gw: Gateway) -> list[str]:
    ids = []
    for i, prediction in enumerate((DRESS, SHIRT, None)):
        key, sha = content_key("inventory", f"item{i}".encode(), "jpg")
        as_json = prediction.model_dump(mode="json") if prediction else None
        ids.append(gw.indexer.add_item(f"sku-{i}", key, sha, predicted=as_json))
    return ids


def sent_filters(gw: Gateway) -> list[dict[str, Any]]:
    return [q["filters"] for q in gw.indexer.calls_to("POST", "/search")]


# ---- predictions in answers ------------------------------------------------------------------


def test_search_returns_the_query_and_result_predictions(gateway: Gateway) -> None:
    ids = seed(gateway)
    gateway.embedder.predicted = {"m1": DRESS}
    response = search(gateway)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predicted"] == DRESS.model_dump(mode="json")
    by_id = {r["item_id"]: r["predicted"] for r in body["results"]}
    assert by_id == {
        ids[0]: DRESS.model_dump(mode="json"),
        ids[1]: SHIRT.model_dump(mode="json"),
        ids[2]: None,
    }
    assert sent_filters(gateway)[0]["predicted_category"] is None  # nothing asked for


def test_item_and_similar_carry_predictions(gateway: Gateway) -> None:
    ids = seed(gateway)
    item = gateway.client.get(f"/v1/items/{ids[0]}").json()
    assert item["predicted"] == DRESS.model_dump(mode="json")
    assert gateway.client.get(f"/v1/items/{ids[2]}").json()["predicted"] is None
    similar = gateway.client.get(
        f"/v1/items/{ids[2]}/similar", params={"predicted_category": "dress", "k": 2}
    )
    assert similar.status_code == 200, similar.text
    body = similar.json()
    assert body["predicted"] is None  # no query photo
    assert body["results"][0]["predicted"] == DRESS.model_dump(mode="json")
    [params] = gateway.indexer.calls_to("GET", f"/items/{ids[2]}/similar")
    assert params == {
        "k": "2",
        "predicted_category": "dress",
        "collapse": "true",
        "explain": "true",
    }


# ---- the predicted_category filter and same_category ----------------------------------------


def test_predicted_category_is_passed_as_a_filter(gateway: Gateway) -> None:
    seed(gateway)
    response = search(gateway, predicted_category="shirt", category="tops", max_price=50)
    assert response.status_code == 200, response.text
    assert sent_filters(gateway) == [
        {"category": "tops", "min_price": None, "max_price": 50.0, "predicted_category": "shirt"}
    ]
    assert_problem(search(gateway, predicted_category="x" * 129), 422)


def test_same_category_filters_by_the_photos_predicted_category(gateway: Gateway) -> None:
    seed(gateway)
    gateway.embedder.predicted = {"m1": DRESS}
    response = search(gateway, same_category="true")
    assert response.status_code == 200, response.text
    assert response.json()["predicted"]["category"]["label"] == "dress"
    # The same label given explicitly too: no contradiction.
    assert search(gateway, same_category="true", predicted_category="dress").status_code == 200
    # Without same_category the photo's prediction filters nothing.
    assert search(gateway).status_code == 200
    assert [f["predicted_category"] for f in sent_filters(gateway)] == ["dress", "dress", None]


def test_same_category_without_a_prediction_changes_nothing(gateway: Gateway) -> None:
    seed(gateway)
    plain = search(gateway, same_category="true", category="tops")
    assert plain.status_code == 200, plain.text
    assert plain.json()["predicted"] is None
    # Attributes but no category: nothing to filter on either.
    gateway.embedder.predicted = {"m1": Predicted(attributes=DRESS.attributes)}
    attributes_only = search(gateway, jpeg(color=(9, 9, 9)), same_category="true")
    assert attributes_only.status_code == 200
    assert attributes_only.json()["predicted"]["category"] is None
    # An explicit filter still applies on its own.
    gateway.embedder.predicted = {}
    explicit = search(gateway, jpeg(color=(1, 1, 1)), same_category="true", predicted_category="a")
    assert explicit.status_code == 200
    assert [f["predicted_category"] for f in sent_filters(gateway)] == [None, None, "a"]
    assert sent_filters(gateway)[0]["category"] == "tops"


def test_same_category_contradicting_predicted_category_is_a_422(gateway: Gateway) -> None:
    seed(gateway)
    gateway.embedder.predicted = {"m1": DRESS}
    body = assert_problem(search(gateway, same_category="true", predicted_category="shirt"), 422)
    assert "'dress'" in body["detail"] and "'shirt'" in body["detail"]
    assert gateway.indexer.calls_to("POST", "/search") == []
    assert_problem(search(gateway, same_category="maybe"), 422)


def test_same_category_uses_the_prediction_of_the_served_version(gateway: Gateway) -> None:
    """A 409 re-embed with the served version: its own prediction sets the filter."""
    seed(gateway)
    gateway.embedder.model_version, gateway.embedder.also_loaded = "m2", ("m1",)
    gateway.embedder.predicted = {"m2": SHIRT, "m1": DRESS}
    response = search(gateway, same_category="true")
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "m1"
    assert response.json()["predicted"] == DRESS.model_dump(mode="json")
    assert [f["predicted_category"] for f in sent_filters(gateway)] == ["shirt", "dress"]


def test_search_parameters_are_documented(gateway: Gateway) -> None:
    spec = gateway.client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/v1/search"]["post"]["parameters"]}
    same = params["same_category"]
    assert same["schema"]["default"] is False
    assert "changes nothing" in same["description"] and "422" in same["description"]
    assert "predicted" in params["predicted_category"]["description"]
    similar = spec["paths"]["/v1/items/{item_id}/similar"]["get"]["parameters"]
    assert "predicted_category" in {p["name"] for p in similar}
    assert "same_category" not in {p["name"] for p in similar}


# ---- the query cache -------------------------------------------------------------------------


def test_the_query_cache_keeps_the_predictions(gateway: Gateway) -> None:
    seed(gateway)
    gateway.embedder.predicted = {"m1": DRESS}
    data = jpeg()
    first = search(gateway, data)
    second = search(gateway, data, same_category="true")
    assert first.status_code == second.status_code == 200
    assert len(gateway.embedder.sent) == 1  # the second came from the cache
    assert second.json()["predicted"] == first.json()["predicted"] == DRESS.model_dump(mode="json")
    assert [f["predicted_category"] for f in sent_filters(gateway)] == [None, "dress"]
    _, sha = content_key("uploads", data, "jpg")
    cached = EmbedQueryResult.model_validate_json(gateway.redis.get(f"{QVEC_PREFIX}m1:{sha}"))
    assert cached.predicted == DRESS


def test_entries_of_the_old_cache_format_are_not_used(gateway: Gateway) -> None:
    """Entries written before predictions were cached lack them: they are never read."""
    seed(gateway)
    gateway.embedder.predicted = {"m1": DRESS}
    data = jpeg()
    _, sha = content_key("uploads", data, "jpg")
    old = EmbedQueryResult(vector=encode_vector(unit_vector()), dim=8, model_version="m1")
    gateway.redis.set(f"fashionrec:qvec:m1:{sha}", old.model_dump_json())
    # Another photo first: the gateway learns the served version, so it looks in the cache.
    assert search(gateway, jpeg(color=(5, 5, 5))).status_code == 200
    response = search(gateway, data)
    assert response.json()["predicted"] == DRESS.model_dump(mode="json")
    assert len(gateway.embedder.sent) == 2
    assert (
        EmbedQueryResult.model_validate_json(gateway.redis.get(f"{QVEC_PREFIX}m1:{sha}")).predicted
        == DRESS
    )


# ---- GET /v1/index: the embedders ------------------------------------------------------------

OLD_BEAT = {"model_version": "m1", "dim": 512, "device": "cpu", "model_versions": ["m1"]}
NEW_BEAT = {
    "model_version": "ft-abc-heads",
    "dim": 2560,
    "device": "cuda",
    "model_versions": ["ft-abc-heads", "m1"],
    "backbone": "resnet50",
    "weights": "models/ft",
    "runtime": "torch",
    "precision": "fp32",
    "pooling": "global",
}


def beat(gw: Gateway, host: str, pid: int, value: dict[str, Any] | str) -> None:
    raw = value if isinstance(value, str) else json.dumps(value)
    gw.redis.set(f"fashionrec:embedder:alive:{host}:{pid}", raw, ex=30)


def test_index_lists_the_alive_embedders_grouped(gateway: Gateway) -> None:
    beat(gateway, "cpu-box", 1, OLD_BEAT)  # an embedder from before the new fields
    beat(gateway, "gpu-a", 10, NEW_BEAT)
    # Same model, runtime and precision: one entry; its loaded versions are merged.
    beat(gateway, "gpu-b", 11, {**NEW_BEAT, "model_versions": ["ft-abc-heads"]})
    beat(gateway, "gpu-c", 12, {**NEW_BEAT, "precision": "int8", "runtime": "openvino"})
    beat(gateway, "broken", 13, "not json")
    beat(gateway, "broken", 14, {"dim": 3})
    response = gateway.client.get("/v1/index")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "m1"  # IndexInfo as is
    assert body["index_version"] == gateway.indexer.index_version
    assert body["embedders"] == [
        {**NEW_BEAT, "processes": 2},
        {
            **NEW_BEAT,
            "runtime": "openvino",
            "precision": "int8",
            "processes": 1,
        },
        {
            **OLD_BEAT,
            "backbone": None,
            "weights": None,
            "runtime": None,
            "precision": None,
            "pooling": None,
            "processes": 1,
        },
    ]


def test_index_without_embedders_or_redis(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway()
    assert gw.client.get("/v1/index").json()["embedders"] == []
    down = make_gateway(broker=BrokerSettings(url="redis://127.0.0.1:1/0"))
    response = down.client.get("/v1/index")
    assert response.status_code == 200, response.text
    assert response.json()["embedders"] is None
    assert response.json()["model_version"] == "m1"


@pytest.mark.parametrize(
    ("devices", "expected"),
    [(["cuda", "cuda"], "cuda"), (["cuda", "cpu", None], "cpu, cuda"), ([None], None)],
)
def test_groups_merge_devices_and_loaded_versions(
    devices: list[str | None], expected: str | None
) -> None:
    infos = [
        EmbedderInfo(model_version="m2", dim=4, device=d, model_versions=["m2", f"old{n}"])
        for n, d in enumerate(devices)
    ]
    [group] = group_embedders(infos)
    assert group.device == expected and group.processes == len(devices)
    assert group.model_versions == ["m2", *(f"old{n}" for n in range(len(devices)))]


def test_unreadable_heartbeats_are_skipped() -> None:
    assert parse_heartbeat(b"k", None) is None  # expired between SCAN and MGET
    assert parse_heartbeat(b"k", b"[]") is None
    assert parse_heartbeat(b"k", json.dumps(OLD_BEAT).encode()) == EmbedderInfo(**OLD_BEAT)
