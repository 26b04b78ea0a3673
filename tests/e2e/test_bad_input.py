"""Bad input against the running stack: a clear 4xx problem+json, nothing stored, still ready."""

from __future__ import annotations

import io
import json
import struct
import zlib

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import RunningStack

pytestmark = pytest.mark.e2e


def png_announcing(width: int, height: int) -> bytes:
    """A tiny, valid PNG whose header claims a huge size (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


BAD_IMAGES = {
    "text file": b"this is not an image at all\n" * 10,
    "truncated jpeg": good_jpeg()[:300],
    "empty file": b"",
    "decompression bomb": png_announcing(100_000, 100_000),
}


def stored_objects(stack: RunningStack) -> set[str]:
    client = stack.store.client
    if not client.bucket_exists(stack.store.bucket):
        return set()
    return {o.object_name for o in client.list_objects(stack.store.bucket, recursive=True)}


def assert_problem(response: httpx.Response, status_range: range = range(400, 500)) -> dict:
    assert response.status_code in status_range, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == response.status_code
    assert body.get("detail"), body
    return body


@pytest.fixture
def client(stack: RunningStack):  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        yield c
        assert c.get("/readyz").status_code == 200  # still ready after every bad request


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_search_images(client: httpx.Client, stack: RunningStack, name: str) -> None:
    before = stored_objects(stack)
    response = client.post("/v1/search", files={"image": ("x.jpg", BAD_IMAGES[name], "image/jpeg")})
    assert_problem(response)
    assert stored_objects(stack) == before


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_item_images(client: httpx.Client, stack: RunningStack, name: str) -> None:
    before = stored_objects(stack)
    response = client.post(
        "/v1/items",
        files={"image": ("x.jpg", BAD_IMAGES[name], "image/jpeg")},
        data={"metadata": json.dumps({"sku": f"bad-{name}"})},
    )
    assert_problem(response)
    assert stored_objects(stack) == before


@pytest.mark.parametrize(
    "metadata",
    [json.dumps({"title": "no sku"}), "{not json", json.dumps({"sku": "x", "price": -3})],
    ids=["missing sku", "invalid json", "negative price"],
)
def test_bad_metadata_stores_nothing(
    client: httpx.Client, stack: RunningStack, metadata: str
) -> None:
    before = stored_objects(stack)
    response = client.post(
        "/v1/items",
        files={"image": ("x.jpg", good_jpeg(), "image/jpeg")},
        data={"metadata": metadata},
    )
    body = assert_problem(response)
    assert stored_objects(stack) == before
    if "sku" in metadata and "title" in metadata:
        assert "sku" in body["detail"]


def test_missing_image_field(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/search", data={"x": "y"}))


@pytest.mark.parametrize(
    "path",
    [
        "/v1/items/00000000-0000-0000-0000-000000000000",
        "/v1/items/not-a-uuid",
        "/v1/items/00000000-0000-0000-0000-000000000000/similar",
        "/v1/jobs/00000000-0000-0000-0000-000000000000",
        "/v1/images/inventory/../../etc/passwd",
        "/v1/images/uploads/0000.jpg",
    ],
)
def test_unknown_things_are_404(client: httpx.Client, path: str) -> None:
    assert_problem(client.get(path), range(404, 405))


def test_delete_unknown_item(client: httpx.Client) -> None:
    assert_problem(client.delete("/v1/items/00000000-0000-0000-0000-000000000000"), range(404, 405))


@pytest.mark.parametrize("k", [0, 51, -1])
def test_k_out_of_range(client: httpx.Client, k: int) -> None:
    response = client.post(
        "/v1/search", params={"k": k}, files={"image": ("x.jpg", good_jpeg(), "image/jpeg")}
    )
    assert_problem(response)
