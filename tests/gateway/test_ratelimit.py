"""Per-client rate limits on search and writes: 429 with Retry-After, clients told apart by API
key or address, X-Forwarded-For only when trusted, open when the counters' Redis is down."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest
from fashionrec_gateway.ratelimit import KEY_PREFIX, SEARCH, RateLimits, client_ip
from starlette.requests import Request

from tests.gateway.conftest import Gateway
from tests.gateway.images import jpeg
from tests.gateway.test_search import assert_problem

CLOSED_REDIS = "redis://127.0.0.1:1/0"
IMAGE = {"image": ("photo.jpg", jpeg(), "image/jpeg")}


def search_from(gw: Gateway, address: str) -> httpx.Response:
    return gw.client.post("/v1/search", files=IMAGE, headers={"X-Forwarded-For": address})


def assert_limited(response: httpx.Response, window_s: int) -> None:
    body = assert_problem(response, 429)
    assert body["title"] == "Too Many Requests"
    assert "rate limit" in body["detail"]
    assert 1 <= int(response.headers["retry-after"]) <= window_s


def test_search_limit_is_per_client(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(rate_limit_search="2/minute", trusted_proxies=1)
    assert [search_from(gw, "10.0.0.1").status_code for _ in range(2)] == [200, 200]
    assert_limited(search_from(gw, "10.0.0.1"), 60)
    assert len(gw.embedder.sent) == 1  # the refused search was not embedded (cache: 1 send)
    assert search_from(gw, "10.0.0.2").status_code == 200  # another client
    assert gw.client.get("/v1/index").status_code == 200  # reads are not limited


def test_several_limits_all_apply(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(rate_limit_search="5/minute;1/second")
    assert gw.client.post("/v1/search", files=IMAGE).status_code == 200
    assert_limited(gw.client.post("/v1/search", files=IMAGE), 1)


def test_forwarded_for_is_ignored_unless_trusted(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(rate_limit_search="1/minute")
    assert search_from(gw, "10.0.0.1").status_code == 200
    # A forged header buys no new limit: the client is the connection's peer.
    assert_limited(search_from(gw, "10.0.0.2"), 60)


def test_writes_limit_counts_key_guesses(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(api_key="s3cret", rate_limit_writes="2/minute")
    wrong = {"X-API-Key": "guess"}
    assert [gw.client.post("/v1/jobs", headers=wrong).status_code for _ in range(2)] == [401, 401]
    assert_limited(gw.client.post("/v1/jobs", headers=wrong), 60)  # before the key check
    assert_limited(gw.client.delete("/v1/items/x", headers=wrong), 60)
    # The valid key is a client of its own, with its own limit.
    key = {"X-API-Key": "s3cret"}
    assert [gw.client.post("/v1/jobs", headers=key).status_code for _ in range(2)] == [201, 201]
    assert_limited(gw.client.post("/v1/jobs", headers=key), 60)
    # Writes and searches are counted apart (search has no limit here).
    assert gw.client.post("/v1/search", files=IMAGE).status_code == 200
    # The counters name the key by a fingerprint, never the key itself.
    counters = [k.decode() for k in gw.redis.scan_iter(match=f"{KEY_PREFIX}*")]
    assert counters and not any("s3cret" in k for k in counters)


def test_batch_and_items_are_writes(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(rate_limit_writes="1/minute")
    form = {"files": IMAGE, "data": {"metadata": '{"sku": "a"}'}}
    assert gw.client.post("/v1/items", **form).status_code == 202
    assert_limited(gw.client.post("/v1/items", **form), 60)
    batch = {"files": IMAGE, "data": {"metadata": '[{"sku": "b"}]'}}
    assert_limited(gw.client.post("/v1/items/batch", **batch), 60)


def test_limiter_fails_open_when_its_redis_is_down(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    gw = make_gateway()
    down = RateLimits(CLOSED_REDIS, {SEARCH: "1/minute"})
    gw.client.app.state.rate_limits = down
    try:
        with caplog.at_level(logging.WARNING, logger="fashionrec.gateway.ratelimit"):
            statuses = [gw.client.post("/v1/search", files=IMAGE).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        # One warning, not one per request: the limiter stays open a while without retrying.
        [warning] = [r for r in caplog.records if r.name == "fashionrec.gateway.ratelimit"]
        assert "unavailable" in warning.getMessage()
    finally:
        down.close()


def test_without_limits_redis_is_never_asked() -> None:
    limits = RateLimits(CLOSED_REDIS, {SEARCH: None})
    limits.check(SEARCH, "ip:1.2.3.4")
    assert limits.limits == {}


def request_from(peer: str, forwarded: list[str]) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "headers": headers, "client": (peer, 1234)})


@pytest.mark.parametrize(
    ("hops", "forwarded", "expected"),
    [
        (0, ["6.6.6.6"], "192.0.2.1"),  # not trusted: the peer
        (1, [], "192.0.2.1"),
        (1, ["6.6.6.6, 198.51.100.7"], "198.51.100.7"),  # the one our proxy added
        (2, ["6.6.6.6, 198.51.100.7", "10.0.0.5"], "198.51.100.7"),  # two header lines
        (3, ["198.51.100.7"], "198.51.100.7"),  # fewer entries than proxies
        (1, ["2001:db8::1"], "2001:db8::1"),
    ],
)
def test_client_ip(hops: int, forwarded: list[str], expected: str) -> None:
    assert client_ip(request_from("192.0.2.1", forwarded), hops) == expected
