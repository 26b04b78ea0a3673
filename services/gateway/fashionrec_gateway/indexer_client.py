"""HTTP client for the indexer's internal API; its failures become problems for our callers.

Mapping: unreachable (refused, or no connection in time) -> 503, no answer in time -> 504, 503
or 504 (its database or broker is down, its index still loading) -> the same status, with the
indexer's Retry-After when it sends one, 409 -> IndexerConflict (search and recommend re-embed
with the model version the problem names; see reembed), other 4xx -> the same status with the
indexer's detail, other 5xx or garbage -> 502.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, TypeVar

import httpx
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.request_id import propagate_request_id
from fashionrec_shared.schemas import (
    IndexerItem,
    IndexerSearchResponse,
    IndexInfo,
    JobCreate,
    JobOut,
    RecommendQuery,
    SearchFilters,
    UpsertItem,
    UpsertItemResult,
    UpsertItems,
    UpsertItemsResult,
    VectorQuery,
)
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

# Ids go into URL paths; anything else could walk the indexer's routes ("..").
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class IndexerConflict(ProblemError):
    """The indexer answered 409 (model version changed, or the item has no embedding yet).

    `model_version`: the version the indexer serves, when its problem names it.
    """

    def __init__(self, title: str, detail: str, model_version: str | None = None) -> None:
        super().__init__(409, title, detail)
        self.model_version = model_version


def check_id(value: str, what: str) -> str:
    if not _ID_RE.match(value):
        raise ProblemError(404, "Not Found", f"{what} {value!r} not found")
    return value


class IndexerClient:
    def __init__(self, client: httpx.Client) -> None:
        self.http = client
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks["request"], propagate_request_id]}

    @classmethod
    def create(
        cls, base_url: str, timeout_s: float, transport: httpx.BaseTransport | None = None
    ) -> IndexerClient:
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 3.0))
        return cls(httpx.Client(base_url=base_url, timeout=timeout, transport=transport))

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectTimeout as exc:
            # No connection at all is the indexer being away, not slow with our request.
            raise ProblemError(
                503, "Service Unavailable", f"the indexer is unreachable ({exc!r})"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ProblemError(
                504, "Gateway Timeout", f"the indexer did not answer in time ({exc!r})"
            ) from exc
        except httpx.TransportError as exc:
            raise ProblemError(
                503, "Service Unavailable", f"the indexer is unreachable ({exc!r})"
            ) from exc
        if response.is_success:
            return response
        title, detail = _problem_of(response)
        if response.status_code == 409:
            raise IndexerConflict(title or "Conflict", detail, _served_version(response))
        if 400 <= response.status_code < 500:
            raise ProblemError(response.status_code, title or "Error", detail)
        if response.status_code in (503, 504):
            # A dependency of the indexer is down (its database, say): an outage, not a bug.
            retry_after = response.headers.get("retry-after", "").strip()
            raise ProblemError(
                response.status_code,
                title or response.reason_phrase,
                f"the indexer is unavailable: {detail}",
                headers={"Retry-After": retry_after} if retry_after.isdigit() else None,
            )
        raise ProblemError(
            502, "Bad Gateway", f"the indexer failed with {response.status_code}: {detail}"
        )

    def _parse(self, response: httpx.Response, model: type[M]) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ProblemError(
                502, "Bad Gateway", f"the indexer sent an unexpected answer: {exc.errors()[:3]}"
            ) from exc

    def search(self, query: VectorQuery) -> IndexerSearchResponse:
        return self.search_timed(query)[0]

    def search_timed(self, query: VectorQuery) -> tuple[IndexerSearchResponse, dict[str, float]]:
        """The answer and the indexer's own stage timings (seconds, from its Server-Timing)."""
        response = self._request("POST", "/search", json=query.model_dump(mode="json"))
        timings = parse_server_timing(response.headers.get("server-timing", ""))
        return self._parse(response, IndexerSearchResponse), timings

    def recommend_timed(
        self, query: RecommendQuery
    ) -> tuple[IndexerSearchResponse, dict[str, float]]:
        """Liked and disliked examples in, ranked items out (and the indexer's stage timings)."""
        response = self._request("POST", "/recommend", json=query.model_dump(mode="json"))
        timings = parse_server_timing(response.headers.get("server-timing", ""))
        return self._parse(response, IndexerSearchResponse), timings

    def similar(
        self,
        item_id: str,
        k: int,
        filters: SearchFilters,
        *,
        collapse: bool = True,
        explain: bool = True,
    ) -> IndexerSearchResponse:
        params = {
            "k": k,
            **filters.model_dump(exclude_none=True),
            # Lower-case, as FastAPI on the other side reads booleans.
            "collapse": str(collapse).lower(),
            "explain": str(explain).lower(),
        }
        response = self._request(
            "GET", f"/items/{check_id(item_id, 'item')}/similar", params=params
        )
        return self._parse(response, IndexerSearchResponse)

    def upsert_item(self, item: UpsertItem) -> UpsertItemResult:
        response = self._request("POST", "/items", json=item.model_dump(mode="json"))
        return self._parse(response, UpsertItemResult)

    def upsert_items(self, items: UpsertItems) -> UpsertItemsResult:
        response = self._request("POST", "/items/batch", json=items.model_dump(mode="json"))
        return self._parse(response, UpsertItemsResult)

    def get_item(self, item_id: str) -> IndexerItem:
        response = self._request("GET", f"/items/{check_id(item_id, 'item')}")
        return self._parse(response, IndexerItem)

    def delete_item(self, item_id: str) -> None:
        self._request("DELETE", f"/items/{check_id(item_id, 'item')}")

    def create_job(self, job: JobCreate) -> JobOut:
        response = self._request("POST", "/jobs", json=job.model_dump(mode="json"))
        return self._parse(response, JobOut)

    def get_job(self, job_id: str) -> JobOut:
        response = self._request("GET", f"/jobs/{check_id(job_id, 'job')}")
        return self._parse(response, JobOut)

    def index_info(self) -> IndexInfo:
        return self._parse(self._request("GET", "/index"), IndexInfo)

    def ready(self, timeout_s: float = 3.0) -> None:
        """Raises ProblemError unless the indexer's /readyz answers 200."""
        self._request("GET", "/readyz", timeout=timeout_s)


def parse_server_timing(header: str) -> dict[str, float]:
    """`name;dur=ms, …` → {name: seconds}; anything malformed is skipped."""
    timings: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if name and key == "dur":
                with contextlib.suppress(ValueError):
                    timings[name] = float(value) / 1000
    return timings


def _served_version(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    version = body.get("model_version") if isinstance(body, dict) else None
    return version if isinstance(version, str) and version else None


def _problem_of(response: httpx.Response) -> tuple[str | None, str]:
    """(title, detail) of an error answer, problem+json or not."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail")
        if not isinstance(detail, str):
            detail = str(detail) if detail is not None else response.reason_phrase
        title = body.get("title")
        return (title if isinstance(title, str) else None), detail
    return None, str(body)[:500]
