"""The CLI's gateway client: typed answers, problem documents parsed once, retries only on 503."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from fashionrec_cli.client import (
    GatewayClient,
    GatewayProblem,
    GatewayUnreachable,
    RetryPolicy,
    UnexpectedAnswer,
    Upload,
    parse_problem,
)
from fashionrec_cli.infra import free_port
from fashionrec_cli.main import recommend_table, results_table
from fashionrec_shared.schemas import SearchResponse
from rich.console import Console

FAST_RETRY = RetryPolicy(attempts=3, initial_wait_s=0.001, max_wait_s=0.002)
PHOTO = Upload("q.jpg", b"\xff\xd8 not really a jpeg", "image/jpeg")
ANSWER = {
    "results": [
        {
            "item_id": "i1",
            "sku": "D-001",
            "title": "Red dress",
            "category": "dress",
            "price": 49.9,
            "score": 0.91234,
            "image_url": "http://gw/v1/images/inventory/abc.jpg",
        }
    ],
    "model_version": "m1",
    "index_version": "b1",
}


def problem(status: int, detail: str) -> httpx.Response:
    body = {"type": "about:blank", "title": "Error", "status": status, "detail": detail}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def client_for(handler, retry: RetryPolicy | None = None) -> GatewayClient:  # type: ignore[no-untyped-def]
    return GatewayClient("http://gw.test", retry=retry, transport=httpx.MockTransport(handler))


def test_search_returns_the_shared_schema_and_sends_k_and_filters() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ANSWER)

    with client_for(handler) as client:
        answer = client.search(PHOTO, k=3, filters={"category": "dress", "max_price": None})
    assert isinstance(answer, SearchResponse)
    assert answer.results[0].sku == "D-001" and answer.index_version == "b1"
    assert dict(seen[0].url.params) == {"k": "3", "category": "dress"}
    assert b'filename="q.jpg"' in seen[0].content

    out = io.StringIO()
    Console(file=out, width=200).print(results_table(answer))
    assert "0.912" in out.getvalue() and "49.90" in out.getvalue()


def test_an_error_answer_raises_its_problem() -> None:
    with (
        client_for(lambda request: problem(422, "k: must be at most 50")) as client,
        pytest.raises(GatewayProblem) as caught,
    ):
        client.search(PHOTO, k=99)
    assert caught.value.status == 422 and caught.value.reason == "k: must be at most 50"
    assert caught.value.problem.title == "Error"
    assert str(caught.value) == "HTTP 422: k: must be at most 50"


def test_an_answer_that_is_not_a_problem_still_becomes_one() -> None:
    parsed = parse_problem(httpx.Response(502, text="Bad Gateway from the proxy\n"))
    assert (parsed.status, parsed.title, parsed.detail) == (
        502,
        "Bad Gateway",
        "Bad Gateway from the proxy",
    )
    empty = parse_problem(httpx.Response(500))
    assert empty.detail is None and empty.title == "Internal Server Error"


def test_a_success_out_of_contract_is_an_unexpected_answer() -> None:
    with (
        client_for(lambda request: httpx.Response(201, json={"job": "x"})) as client,
        pytest.raises(UnexpectedAnswer, match="HTTP 201"),
    ):
        client.open_job()


def test_only_503_and_connection_errors_are_retried() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/jobs" and len(calls) < 3:
            return problem(503, "no embedder is alive")
        if request.url.path == "/v1/jobs/j1":
            return problem(404, "no job j1")
        return httpx.Response(201, json={"job_id": "j", "kind": "ingest", "status": "queued",
                                         "total": 0, "done": 0, "failed": 0})  # fmt: skip

    with client_for(handler, FAST_RETRY) as client:
        assert client.open_job().job_id == "j"
        assert calls == ["/v1/jobs"] * 3
        with pytest.raises(GatewayProblem, match="no job j1"):
            client.job("j1")
        assert calls.count("/v1/jobs/j1") == 1


def test_no_gateway_is_unreachable() -> None:
    with (
        GatewayClient(f"http://127.0.0.1:{free_port()}", retry=FAST_RETRY) as client,
        pytest.raises(GatewayUnreachable, match="cannot reach the gateway"),
    ):
        client.ready()


RECOMMEND_ANSWER = {
    **ANSWER,
    "results": [
        {
            **ANSWER["results"][0],
            "group": "D",
            "reasons": {"score": 0.91234, "like": 0, "category": "dress", "colours": ["red"]},
        }
    ],
}
ITEM = "0b7e3c1a-58a4-4c1e-9d55-8f2b0c7a9e11"


def test_recommend_with_photos_sends_multipart_parts() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=RECOMMEND_ANSWER)

    with client_for(handler) as client:
        answer = client.recommend(
            [PHOTO, ITEM], [Upload("b.png", b"png", "image/png")], ["x1"],
            {"k": 3, "strategy": "best_score", "collapse": False, "min_score": None},
        )  # fmt: skip
    assert answer.results[0].reasons is not None and answer.results[0].group == "D"
    [request] = seen
    assert request.url.path == "/v1/recommend"
    assert dict(request.url.params) == {"k": "3", "strategy": "best_score", "collapse": "false"}
    body = request.content
    assert request.headers["content-type"].startswith("multipart/form-data")
    for part in (b'name="like"; filename="q.jpg"', b'name="dislike"; filename="b.png"'):
        assert part in body
    assert b'name="like_item"\r\n\r\n' + ITEM.encode() in body
    assert b'name="exclude"\r\n\r\nx1' in body

    out = io.StringIO()
    Console(file=out, width=200).print(recommend_table(answer, ["q.jpg", ITEM]))
    assert "category dress; colours red; closest to q.jpg" in out.getvalue()


def test_recommend_with_ids_only_sends_json() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=RECOMMEND_ANSWER)

    with client_for(handler) as client:
        client.recommend([ITEM], ["d1"], [])
    assert json.loads(seen[0].content) == {
        "like_items": [ITEM],
        "dislike_items": ["d1"],
        "exclude": [],
    }
