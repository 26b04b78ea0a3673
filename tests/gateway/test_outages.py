"""Dependency outages: each is a 503 (down) or 504 (too slow) problem with Retry-After, never a
502 or a 500, and it comes in seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fashionrec_gateway.deps import get_indexer, get_query_embedder
from fashionrec_gateway.indexer_client import IndexerClient
from fashionrec_shared.settings import BrokerSettings, StorageSettings

from tests.gateway.conftest import Gateway
from tests.gateway.images import jpeg
from tests.gateway.indexer import INDEXER_URL
from tests.gateway.test_items import add
from tests.gateway.test_search import assert_problem, search, seed

RETRY_AFTER_S = 7
CLOSED = "127.0.0.1:1"  # nothing listens there: connections are refused


def assert_outage(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    body = assert_problem(response, status)
    assert response.headers["retry-after"] == str(RETRY_AFTER_S)
    for word in words:
        assert word in body["detail"]
    return body


@pytest.fixture
def gw(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway(retry_after_s=RETRY_AFTER_S)


def use_indexer(gw: Gateway, client: IndexerClient) -> None:
    gw.client.app.dependency_overrides[get_indexer] = lambda: client


def test_database_down_is_503_end_to_end(gw: Gateway) -> None:
    """The issue's case: Postgres down behind a real indexer was a 502 'the indexer failed'."""
    [item_id] = seed(gw, 1)
    gw.indexer.database_down()
    assert_outage(search(gw, jpeg()), 503, "database unavailable")
    assert_outage(gw.client.get(f"/v1/items/{item_id}"), 503, "database unavailable")
    assert_outage(add(gw, jpeg(), {"sku": "new"}), 503, "database unavailable")
    assert_outage(gw.client.get(f"/v1/items/{item_id}/similar"), 503, "database unavailable")
    assert_outage(gw.client.post("/v1/jobs", json={}), 503, "database unavailable")


def test_indexer_at_a_closed_port_is_503(gw: Gateway) -> None:
    closed = IndexerClient.create(f"http://{CLOSED}", 2)
    try:
        use_indexer(gw, closed)
        assert_outage(search(gw, jpeg()), 503, "indexer", "unreachable")
        assert_outage(gw.client.get("/v1/index"), 503, "unreachable")
    finally:
        closed.close()


def test_indexer_timeout_is_504(gw: Gateway) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client = IndexerClient.create(INDEXER_URL, 2, transport=httpx.MockTransport(slow))
    try:
        use_indexer(gw, client)
        assert_outage(search(gw, jpeg()), 504, "indexer", "in time")
    finally:
        client.close()


def test_embedder_timeout_is_504(gw: Gateway) -> None:
    gw.embedder.timeout()
    assert_outage(search(gw, jpeg()), 504, "embedder")


def test_broker_down_is_503(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(retry_after_s=RETRY_AFTER_S, broker=BrokerSettings(url=f"redis://{CLOSED}/0"))
    # The real Celery send this time (the fake embedder never touches the broker).
    gw.client.app.dependency_overrides.pop(get_query_embedder)
    assert_outage(search(gw, jpeg()), 503, "broker")


def test_object_storage_down_is_a_prompt_503(make_gateway: Callable[..., Gateway]) -> None:
    storage = StorageSettings(backend="s3", s3_endpoint=CLOSED, s3_create_bucket=False)
    gw = make_gateway(retry_after_s=RETRY_AFTER_S, storage=storage)
    started = time.monotonic()
    assert_outage(search(gw, jpeg()), 503, "object storage")
    # minio's own client retried for about a minute before the 503 showed.
    assert time.monotonic() - started < 10
    assert_outage(add(gw, jpeg(), {"sku": "a"}), 503, "object storage")
    name = "a" * 64 + ".jpg"
    assert_outage(gw.client.get(f"/v1/images/inventory/{name}"), 503, "object storage")
    assert gw.indexer.calls_to("POST", "/items") == []


def test_not_ready_answers_carry_retry_after(gw: Gateway) -> None:
    gw.indexer.faults.down = True
    assert_outage(gw.client.get("/readyz"), 503, "not ready")


def test_other_answers_carry_no_retry_after(gw: Gateway) -> None:
    assert "retry-after" not in search(gw, jpeg()).headers
    assert "retry-after" not in gw.client.get("/v1/items/nope").headers
