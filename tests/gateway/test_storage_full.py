"""Object storage full: uploads and searches with a new photo are a 507 problem (not the 503 of
an outage: waiting does not free space), nothing is stored or sent on, and once there is space
the same request is accepted."""

from __future__ import annotations

import pytest
from fashionrec_shared import storage

from tests.gateway.conftest import Gateway
from tests.gateway.images import jpeg
from tests.gateway.test_items import add, add_batch
from tests.gateway.test_search import assert_problem, search, seed
from tests.shared.test_storage_full import full_open


@pytest.fixture
def full(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The local blob store's disk full: every write runs out of space part-way."""
    monkeypatch.setattr(storage, "open", full_open, raising=False)
    return monkeypatch


def assert_full(response) -> None:  # type: ignore[no-untyped-def]
    body = assert_problem(response, 507)
    assert body["title"] == "Insufficient Storage"
    assert "object storage is full" in body["detail"]
    assert "retry-after" not in response.headers


def test_full_store_is_507_and_stores_nothing(gateway: Gateway, full: pytest.MonkeyPatch) -> None:
    assert_full(add(gateway, jpeg((1, 2, 3)), {"sku": "full-1"}))
    assert_full(
        add_batch(gateway, [jpeg((4, 5, 6)), jpeg((7, 8, 9))], [{"sku": "b1"}, {"sku": "b2"}])
    )
    assert gateway.stored() == set()  # no object, no temporary file
    assert gateway.indexer.calls_to("POST", "/items") == []
    assert gateway.indexer.calls_to("POST", "/items/batch") == []

    full.undo()
    accepted = add(gateway, jpeg((1, 2, 3)), {"sku": "full-1"})
    assert accepted.status_code == 202, accepted.text
    assert len(gateway.stored()) == 1


def test_search_with_a_new_photo_on_a_full_store_is_507(gateway: Gateway) -> None:
    seed(gateway, 2)
    with pytest.MonkeyPatch.context() as full:
        full.setattr(storage, "open", full_open, raising=False)
        assert_full(search(gateway, jpeg((200, 10, 10))))
    assert search(gateway, jpeg((200, 10, 10))).status_code == 200


def test_507_is_documented(gateway: Gateway) -> None:
    paths = gateway.client.get("/openapi.json").json()["paths"]
    for path in ("/v1/items", "/v1/items/batch", "/v1/search"):
        assert "507" in paths[path]["post"]["responses"], path
