"""CORS: off unless origins are configured; then only those origins, and never X-API-Key."""

from __future__ import annotations

from collections.abc import Callable

from tests.gateway.conftest import Gateway
from tests.gateway.images import jpeg

SHOP = "https://shop.example"


def preflight(gw: Gateway, origin: str, headers: str = "content-type") -> dict[str, str]:
    response = gw.client.options(
        "/v1/search",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )
    return {"status": str(response.status_code), **response.headers}


def test_off_by_default(gateway: Gateway) -> None:
    response = gateway.client.get("/livez", headers={"Origin": SHOP})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in preflight(gateway, SHOP)


def test_allowed_origins(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(cors_origins=f"{SHOP}/, https://admin.example")
    answer = preflight(gw, SHOP)
    assert answer["status"] == "200"
    assert answer["access-control-allow-origin"] == SHOP
    files = {"image": ("p.jpg", jpeg(), "image/jpeg")}
    response = gw.client.post("/v1/search", files=files, headers={"Origin": SHOP})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == SHOP
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()
    # Any other origin gets no CORS headers: its page cannot read the answers.
    other = gw.client.get("/livez", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert preflight(gw, "https://evil.example")["status"] == "400"


def test_error_answers_carry_cors_headers(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(cors_origins=[SHOP], max_upload_bytes=1000)
    big = {"image": ("p.jpg", b"\xff" * 2_000_000, "image/jpeg")}
    response = gw.client.post("/v1/search", files=big, headers={"Origin": SHOP})
    assert response.status_code == 413  # from the body-limit middleware, inside CORS
    assert response.headers["access-control-allow-origin"] == SHOP


def test_the_api_key_is_not_allowed_cross_origin(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(cors_origins=[SHOP])
    assert preflight(gw, SHOP, headers="x-api-key")["status"] == "400"
