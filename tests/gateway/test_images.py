"""GET /v1/images/inventory/{name}: stored bytes, immutable caching, nothing else served."""

from __future__ import annotations

import pytest
from fashionrec_shared.storage import content_key

from tests.gateway.conftest import Gateway
from tests.gateway.images import encode, jpeg
from tests.gateway.test_items import add
from tests.gateway.test_search import assert_problem, search


def test_serves_inventory_image(gateway: Gateway) -> None:
    data = encode("WEBP")
    add(gateway, data, {"sku": "w"})
    key, sha = content_key("inventory", data, "webp")
    response = gateway.client.get(f"/v1/images/{key}")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["etag"] == f'"{sha}"'
    assert "immutable" in response.headers["cache-control"]
    assert gateway.client.head(f"/v1/images/{key}").status_code == 200
    again = gateway.client.get(f"/v1/images/{key}", headers={"If-None-Match": f'"{sha}"'})
    assert again.status_code == 304
    assert again.content == b""


def test_query_uploads_are_not_served(gateway: Gateway) -> None:
    data = jpeg()
    search(gateway, data)
    key, _ = content_key("uploads", data, "jpg")
    assert key in gateway.stored()
    assert_problem(gateway.client.get(f"/v1/images/{key}"), 404)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/inventory/" + "0" * 64 + ".jpg",  # well-formed, not stored
        "/v1/images/inventory/" + "0" * 64 + ".exe",
        "/v1/images/inventory/abc.jpg",
        "/v1/images/inventory/..%2F..%2Fetc%2Fpasswd",
        "/v1/images/inventory/%2e%2e",
        "/v1/images/inventory/../../etc/passwd",
        "/v1/images/indexes/manifest.json",
        "/v1/images/uploads/0000.jpg",
    ],
)
def test_bad_names_are_404(gateway: Gateway, path: str) -> None:
    response = gateway.client.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
