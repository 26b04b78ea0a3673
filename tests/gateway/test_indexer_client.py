"""How the indexer client maps the indexer's failures (transport errors and answers) to problems."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from fashionrec_gateway.indexer_client import IndexerClient
from fashionrec_shared.problems import ProblemError

from tests.gateway.indexer import INDEXER_URL, problem


def failure(handler: Callable[[httpx.Request], httpx.Response]) -> ProblemError:
    client = IndexerClient.create(INDEXER_URL, 2, transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(ProblemError) as info:
            client.index_info()
        return info.value
    finally:
        client.close()


def raising(exc: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    return handler


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (httpx.ConnectError, 503),
        (httpx.ConnectTimeout, 503),  # no connection at all: away, not slow
        (httpx.ReadTimeout, 504),
        (httpx.WriteTimeout, 504),
        (httpx.RemoteProtocolError, 503),
    ],
)
def test_transport_errors(exc: type[httpx.TransportError], status: int) -> None:
    assert failure(raising(exc)).status == status


@pytest.mark.parametrize("status", [503, 504])
def test_unavailable_indexer_is_unavailable_here_too(status: int) -> None:
    """The indexer's 503 (its database down) was a 502 'the indexer failed'."""
    got = failure(lambda request: problem(status, "database unavailable"))
    assert got.status == status
    assert got.detail == "the indexer is unavailable: database unavailable"
    assert got.headers == {}  # the gateway's own Retry-After applies


def test_the_indexers_retry_after_is_kept() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        answer = problem(503, "the index is still loading; retry shortly")
        answer.headers["Retry-After"] = "30"
        return answer

    assert failure(handler).headers == {"Retry-After": "30"}


@pytest.mark.parametrize("status", [500, 502])
def test_other_server_errors_are_502(status: int) -> None:
    got = failure(lambda request: problem(status, "boom"))
    assert got.status == 502
    assert f"failed with {status}" in (got.detail or "")
