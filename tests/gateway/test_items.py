"""Items: add (validated before anything is stored), read, delete, similar."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fashionrec_shared.storage import content_key

from tests.gateway.conftest import Gateway
from tests.gateway.images import TEXT, jpeg, noisy_png, png_announcing, truncated_jpeg
from tests.gateway.test_search import assert_problem

UNKNOWN = "00000000-0000-0000-0000-000000000000"


def add(gw: Gateway, data: bytes, metadata: Any, **params: Any) -> httpx.Response:
    raw = metadata if isinstance(metadata, str) else json.dumps(metadata)
    return gw.client.post(
        "/v1/items",
        params=params,
        files={"image": ("x.jpg", data, "image/jpeg")},
        data={"metadata": raw},
    )


@pytest.mark.parametrize(
    ("data", "status"),
    [(TEXT, 415), (b"", 422), (truncated_jpeg(), 422), (png_announcing(100_000, 100_000), 413)],
    ids=["text", "empty", "truncated", "bomb"],
)
def test_bad_images_store_nothing(gateway: Gateway, data: bytes, status: int) -> None:
    assert_problem(add(gateway, data, {"sku": "a"}), status)
    assert gateway.stored() == set()
    assert gateway.indexer.calls_to("POST", "/items") == []
    assert gateway.client.get("/livez").status_code == 200


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"title": "no sku"}, "sku"),
        ("{not json", "not valid JSON"),
        ({"sku": "x", "price": -3}, "price"),
        ({"sku": "x", "colour": "red"}, "colour"),
        ("[1, 2]", "JSON object"),
        ({"sku": ""}, "sku"),
    ],
    ids=["missing sku", "invalid json", "negative price", "unknown field", "array", "empty sku"],
)
def test_bad_metadata_stores_nothing(gateway: Gateway, metadata: Any, expected: str) -> None:
    body = assert_problem(add(gateway, jpeg(), metadata), 422)
    assert expected in body["detail"]
    assert gateway.stored() == set()
    assert gateway.indexer.calls_to("POST", "/items") == []


# Values Postgres cannot store (text and JSONB hold no U+0000, JSON no NaN) reached the indexer's
# INSERT and failed there: a 500 inside the indexer, a 502 here.
UNSTORABLE = {
    "nul in title": (r'{"sku":"X","title":"a\u0000b"}', "metadata.title: contains a NUL"),
    "nul in category": (r'{"sku":"X","category":"\u0000"}', "metadata.category: contains a NUL"),
    "nul in sku": (r'{"sku":"X\u0000"}', "metadata.sku"),
    "nul in attribute value": (
        r'{"sku":"X","attributes":{"colour":"re\u0000d"}}',
        "metadata.attributes.colour: contains a NUL",
    ),
    "nul in attribute key": (
        r'{"sku":"X","attributes":{"col\u0000our":"red"}}',
        'metadata.attributes["col\\u0000our"]: key contains a NUL',
    ),
    "nul deep inside attributes": (
        r'{"sku":"X","attributes":{"sizes":[{"eu":"38"},{"eu":"4\u00000"}]}}',
        "metadata.attributes.sizes[1].eu: contains a NUL",
    ),
    "nan in attributes": (
        '{"sku":"X","attributes":{"weight":NaN}}',
        "metadata.attributes.weight: is not a finite number",
    ),
}


@pytest.mark.parametrize("name", list(UNSTORABLE))
def test_unstorable_metadata_is_a_422_naming_the_field(gateway: Gateway, name: str) -> None:
    raw, expected = UNSTORABLE[name]
    body = assert_problem(add(gateway, jpeg(), raw), 422)
    assert expected in body["detail"]
    assert "\x00" not in body["detail"]
    assert gateway.stored() == set()
    assert gateway.indexer.calls_to("POST", "/items") == []


def test_unstorable_metadata_in_a_batch_rejects_that_item(gateway: Gateway) -> None:
    title, attribute = UNSTORABLE["nul in title"][0], UNSTORABLE["nul deep inside attributes"][0]
    raw = f'[{title}, {{"sku": "ok"}}, {attribute}]'
    response = add_batch(gateway, [jpeg((n, 0, 0)) for n in range(3)], raw)
    assert response.status_code == 207, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [422, 202, 422]
    assert "metadata[0].title: contains a NUL" in results[0]["detail"]
    assert "metadata[2].attributes.sizes[1].eu: contains a NUL" in results[2]["detail"]
    [call] = gateway.indexer.calls_to("POST", "/items/batch")
    assert [i["metadata"]["sku"] for i in call["items"]] == ["ok"]


@pytest.mark.parametrize("field", ["image", "metadata"])
def test_two_parts_of_a_single_field_are_a_422(gateway: Gateway, field: str) -> None:
    """Two images (or two metadata fields) for one item: which was meant is a guess."""
    files = [("image", ("x.jpg", jpeg(), "image/jpeg"))]
    metadata = [("metadata", (None, '{"sku": "a"}'))]
    parts = files * (2 if field == "image" else 1) + metadata * (2 if field == "metadata" else 1)
    body = assert_problem(gateway.client.post("/v1/items", files=parts), 422)
    assert f"2 `{field}` parts" in body["detail"]
    assert gateway.stored() == set()
    assert gateway.indexer.calls_to("POST", "/items") == []


def test_batch_with_two_metadata_parts_is_a_422(gateway: Gateway) -> None:
    parts = [
        ("image", ("x.jpg", jpeg(), "image/jpeg")),
        ("metadata", (None, '[{"sku": "a"}]')),
        ("metadata", (None, '[{"sku": "b"}]')),
    ]
    body = assert_problem(gateway.client.post("/v1/items/batch", files=parts), 422)
    assert "2 `metadata` parts" in body["detail"]
    assert gateway.stored() == set()


def test_missing_metadata_field(gateway: Gateway) -> None:
    response = gateway.client.post("/v1/items", files={"image": ("x.jpg", jpeg(), "image/jpeg")})
    assert "metadata" in assert_problem(response, 422)["detail"]
    assert gateway.stored() == set()


def test_chunked_upload_over_the_limit(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(max_upload_bytes=1000)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():  # type: ignore[no-untyped-def]  # no Content-Length: sent chunked
        yield head
        for _ in range(40):
            yield b"\x00" * 10_000

    response = gw.client.post(
        "/v1/items",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_problem(response, 413)
    assert gw.stored() == set()


def test_add_item(gateway: Gateway) -> None:
    data = noisy_png()
    meta = {"sku": " sku-1 ", "title": "Red shirt", "category": "tops", "price": 19.5}
    response = add(gateway, data, meta)
    assert response.status_code == 202, response.text
    accepted = response.json()
    key, sha = content_key("inventory", data, "png")
    assert gateway.stored() == {key}
    [call] = gateway.indexer.calls_to("POST", "/items")
    assert call["image"] == {"key": key, "sha256": sha}
    assert call["metadata"]["sku"] == "sku-1"
    assert call["job_id"] is None

    item = gateway.client.get(f"/v1/items/{accepted['item_id']}")
    assert item.status_code == 200
    body = item.json()
    assert body["sku"] == "sku-1"
    assert body["status"] == "pending"
    assert body["image_url"] == f"http://testserver/v1/images/{key}"
    assert gateway.client.get(body["image_url"]).content == data

    # Same sku again: the indexer replaces the item; the gateway just forwards.
    again = add(gateway, jpeg(), {"sku": "sku-1"})
    assert again.json()["item_id"] == accepted["item_id"]


def test_add_item_to_a_job(gateway: Gateway) -> None:
    job = gateway.client.post("/v1/jobs", json={"kind": "ingest"})
    assert job.status_code == 201
    job_id = job.json()["job_id"]
    response = add(gateway, jpeg(), {"sku": "a"}, job_id=job_id)
    assert response.status_code == 202
    assert response.json()["job_id"] == job_id
    assert gateway.indexer.calls_to("POST", "/items")[0]["job_id"] == job_id


def test_unknown_job_stores_nothing(gateway: Gateway) -> None:
    body = assert_problem(add(gateway, jpeg(), {"sku": "a"}, job_id=UNKNOWN), 404)
    assert "job" in body["detail"]
    assert gateway.stored() == set()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/v1/items/{UNKNOWN}"),
        ("GET", "/v1/items/not-a-uuid"),
        ("GET", "/v1/items/a.b"),
        ("GET", f"/v1/items/{UNKNOWN}/similar"),
        ("DELETE", f"/v1/items/{UNKNOWN}"),
        ("GET", f"/v1/jobs/{UNKNOWN}"),
        ("GET", "/v1/jobs/..."),
    ],
)
def test_unknown_things_are_404(gateway: Gateway, method: str, path: str) -> None:
    assert_problem(gateway.client.request(method, path), 404)


def test_delete_then_404(gateway: Gateway) -> None:
    item_id = add(gateway, jpeg(), {"sku": "a"}).json()["item_id"]
    response = gateway.client.delete(f"/v1/items/{item_id}")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(gateway.client.get(f"/v1/items/{item_id}"), 404)


def test_similar(gateway: Gateway) -> None:
    ids = [add(gateway, jpeg((i * 40, 0, 0)), {"sku": f"s{i}"}).json()["item_id"] for i in range(3)]
    gateway.indexer.embed_pending()  # the embedders did the EMBED_ITEMS the indexer sent
    response = gateway.client.get(f"/v1/items/{ids[0]}/similar", params={"k": 5})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["item_id"] for r in results] == ids[1:]
    assert all(r["image_url"].startswith("http://testserver/v1/images/inventory/") for r in results)
    assert gateway.embedder.sent == []  # no re-embedding
    assert_problem(gateway.client.get(f"/v1/items/{ids[0]}/similar", params={"k": 0}), 422)


def test_jobs(gateway: Gateway) -> None:
    created = gateway.client.post("/v1/jobs")  # the body is optional: kind defaults to ingest
    assert created.status_code == 201
    job = gateway.client.get(f"/v1/jobs/{created.json()['job_id']}").json()
    assert job["kind"] == "ingest"
    assert {"status", "total", "done", "failed", "errors"} <= job.keys()
    assert_problem(gateway.client.post("/v1/jobs", json={"kind": "Bad Kind"}), 422)


def test_api_key(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(api_key="s3cret")
    image = {"image": ("x.jpg", jpeg(), "image/jpeg")}
    item_form = {"data": {"metadata": '{"sku": "a"}'}, "files": image}
    for headers in ({}, {"X-API-Key": "wrong"}):
        body = assert_problem(gw.client.post("/v1/items", headers=headers, **item_form), 401)
        assert "X-API-Key" in body["detail"]
        assert_problem(gw.client.post("/v1/jobs", headers=headers), 401)
        assert_problem(gw.client.delete(f"/v1/items/{UNKNOWN}", headers=headers), 401)
    assert gw.stored() == set()
    key = {"X-API-Key": "s3cret"}
    ok = gw.client.post("/v1/items", headers=key, **item_form)
    assert ok.status_code == 202
    item_id = ok.json()["item_id"]
    # Reads need no key; search is a read that browsers call directly, so it stays public too.
    assert gw.client.post("/v1/search", files=image).status_code == 200
    assert gw.client.get(f"/v1/items/{item_id}").status_code == 200
    assert gw.client.delete(f"/v1/items/{item_id}", headers=key).status_code == 204


# ---- POST /v1/items/batch -------------------------------------------------------------------


def add_batch(gw: Gateway, images: list[bytes], metadata: Any, **params: Any) -> httpx.Response:
    raw = metadata if isinstance(metadata, str) else json.dumps(metadata)
    files = [("image", (f"x{n}.jpg", data, "image/jpeg")) for n, data in enumerate(images)]
    return gw.client.post("/v1/items/batch", params=params, files=files, data={"metadata": raw})


def test_batch_accepts_good_items_and_rejects_bad_ones_alone(gateway: Gateway) -> None:
    good = [jpeg((10 * n, 30, 30)) for n in range(3)]
    images = [good[0], TEXT, good[1], truncated_jpeg(), good[2], jpeg((1, 2, 3))]
    metadata = [
        {"sku": "a", "title": "A"},
        {"sku": "b"},  # not an image
        {"sku": "c", "price": 3},
        {"sku": "d"},  # truncated
        {"sku": "e"},
        {"sku": "f", "price": -1},  # bad metadata
    ]
    response = add_batch(gateway, images, metadata)
    assert response.status_code == 207, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (3, 3)
    by_sku = {r["sku"]: r for r in body["results"]}
    assert [r["index"] for r in body["results"]] == list(range(6))
    assert {s for s, r in by_sku.items() if r["status"] == 202} == {"a", "c", "e"}
    assert by_sku["b"]["status"] == 415 and by_sku["d"]["status"] == 422
    assert "truncated" in by_sku["d"]["detail"]
    assert by_sku["f"]["status"] == 422 and "price" in by_sku["f"]["detail"]
    assert all(r["item_id"] for r in body["results"] if r["status"] == 202)
    # Only the accepted images are stored, and the indexer got them in ONE bulk call.
    assert gateway.stored() == {content_key("inventory", d, "jpg")[0] for d in good}
    [call] = gateway.indexer.calls_to("POST", "/items/batch")
    assert [i["metadata"]["sku"] for i in call["items"]] == ["a", "c", "e"]
    assert gateway.indexer.calls_to("POST", "/items") == []
    assert body["job_id"]
    assert "validate;dur=" in response.headers["server-timing"]


def test_batch_same_sku_twice_keeps_the_first(gateway: Gateway) -> None:
    response = add_batch(gateway, [jpeg(), jpeg((1, 1, 1))], [{"sku": "s"}, {"sku": " s "}])
    results = response.json()["results"]
    assert [r["status"] for r in results] == [202, 422]
    assert "already appears" in results[1]["detail"]
    assert gateway.stored() == {content_key("inventory", jpeg(), "jpg")[0]}


def test_batch_into_a_job(gateway: Gateway) -> None:
    job_id = gateway.client.post("/v1/jobs", json={"kind": "ingest"}).json()["job_id"]
    response = add_batch(gateway, [jpeg()], [{"sku": "a"}], job_id=job_id)
    assert response.status_code == 207 and response.json()["job_id"] == job_id
    [call] = gateway.indexer.calls_to("POST", "/items/batch")
    assert call["job_id"] == job_id
    assert_problem(add_batch(gateway, [jpeg()], [{"sku": "a"}], job_id=UNKNOWN), 404)


@pytest.mark.parametrize(
    ("metadata", "images", "status", "expected"),
    [
        ('{"sku": "a"}', 1, 422, "JSON list"),
        ("[not json", 1, 422, "JSON list"),
        ([{"sku": "a"}], 2, 422, "2 image parts but 1 metadata"),
        ([{"sku": str(n)} for n in range(4)], 4, 413, "limit is 3"),
    ],
    ids=["object", "invalid json", "count mismatch", "too many"],
)
def test_batch_request_problems_store_nothing(
    make_gateway, metadata: Any, images: int, status: int, expected: str
) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(max_batch_items=3)
    response = add_batch(gw, [jpeg((n, 0, 0)) for n in range(images)], metadata)
    assert expected in assert_problem(response, status)["detail"]
    assert gw.stored() == set()
    assert gw.indexer.calls_to("POST", "/items/batch") == []


def test_batch_body_limit(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway(max_batch_bytes=2000)
    response = add_batch(gw, [noisy_png()], [{"sku": "a"}])
    assert_problem(response, 413)
    assert gw.stored() == set()


def test_batch_is_documented_in_openapi(gateway: Gateway) -> None:
    spec = gateway.client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/items/batch"]["post"]
    assert "207" in operation["responses"]
    assert "BatchAccepted" in json.dumps(operation["responses"]["207"])
