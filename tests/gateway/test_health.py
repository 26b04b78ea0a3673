"""/livez, /readyz (storage, broker, embedder heartbeat, indexer) and /metrics."""

from __future__ import annotations

import json

from tests.gateway.conftest import Gateway
from tests.gateway.test_search import assert_problem

HEARTBEAT = "fashionrec:embedder:alive:host-1:42"


def beat(gw: Gateway) -> None:
    value = json.dumps({"model_version": "m1", "dim": 2048, "device": "cpu"})
    gw.redis.set(HEARTBEAT, value, ex=30)


def test_livez(gateway: Gateway) -> None:
    gateway.indexer.faults.down = True
    response = gateway.client.get("/livez")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready(gateway: Gateway) -> None:
    beat(gateway)
    response = gateway.client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"storage", "broker", "embedder", "indexer"}
    assert body["checks"]["embedder"] == "ok (1 alive)"


def test_not_ready_without_embedder(gateway: Gateway) -> None:
    body = assert_problem(gateway.client.get("/readyz"), 503)
    assert body["detail"] == "not ready: embedder"
    assert body["checks"]["embedder"].startswith("failed")
    assert body["checks"]["indexer"] == "ok"


def test_not_ready_when_indexer_is_down_or_not_ready(gateway: Gateway) -> None:
    beat(gateway)
    gateway.indexer.faults.answer("GET", "/readyz", 503, "database not ready")
    body = assert_problem(gateway.client.get("/readyz"), 503)
    assert "database not ready" in body["checks"]["indexer"]
    gateway.indexer.faults.down = True
    body = assert_problem(gateway.client.get("/readyz"), 503)
    assert "unreachable" in body["checks"]["indexer"]


def test_not_ready_without_broker(make_gateway) -> None:  # type: ignore[no-untyped-def]
    from fashionrec_shared.settings import BrokerSettings

    gw = make_gateway(broker=BrokerSettings(url="redis://127.0.0.1:1/0"))
    body = assert_problem(gw.client.get("/readyz"), 503)
    assert body["detail"] == "not ready: broker, embedder"


def test_metrics_endpoint(gateway: Gateway) -> None:
    gateway.client.get("/livez")
    response = gateway.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'route="/livez"' in response.text
