"""The CLI's client of the gateway's public API: typed answers, one error type.

Every call returns a model of `fashionrec_shared.schemas` (the contract the gateway serves) or
raises a `GatewayError`: `GatewayUnreachable` when no answer came, `GatewayProblem` for an error
answer (its RFC 9457 problem document, parsed in one place), `UnexpectedAnswer` when the body
does not follow the contract. With a `RetryPolicy`, connection errors (where the request cannot
have been processed), 503 (a dependency is down) and 429 (a rate limit) are retried: after the
answer's `Retry-After` where it has one (capped by the policy), else with exponential backoff.
Nothing else is, since any other answer is the server's verdict.
"""

from __future__ import annotations

import email.utils
import json
import mimetypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from fashionrec_shared.schemas import (
    BatchAccepted,
    ItemAccepted,
    JobCreate,
    JobOut,
    Problem,
    SearchResponse,
)
from pydantic import BaseModel, ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
# A dependency of the gateway is down (503), or this client is over a rate limit (429): both
# say to try again later, and the gateway says when (Retry-After).
_RETRY_STATUSES = frozenset({429, 503})
# Connection-level failures where the request cannot have been processed: safe to resend.
_RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)

M = TypeVar("M", bound=BaseModel)


class GatewayError(Exception):
    """The gateway did not do what was asked; the message says why."""

    status: int | None = None

    @property
    def reason(self) -> str:
        return str(self)


class GatewayUnreachable(GatewayError):
    """No answer: connection refused or reset, or a timeout."""

    def __init__(self, base_url: str, error: httpx.HTTPError) -> None:
        super().__init__(f"cannot reach the gateway at {base_url} ({error!r})")
        self.error = error


class GatewayProblem(GatewayError):
    """An error answer, with the problem document the gateway sent (or one made from it)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.status = problem.status
        super().__init__(f"HTTP {problem.status}: {self.reason}")

    @property
    def reason(self) -> str:
        """The clearest reason the answer gives: its detail, else its title."""
        return self.problem.detail or self.problem.title


class UnexpectedAnswer(GatewayError):
    """A success status whose body does not follow the contract."""

    def __init__(self, response: httpx.Response, error: Exception) -> None:
        self.status = response.status_code
        super().__init__(
            f"unexpected answer (HTTP {response.status_code}): {response.text[:200]!r} ({error})"
        )


def parse_problem(response: httpx.Response) -> Problem:
    """The problem document of an error answer; one made from its status and text otherwise."""
    try:
        return Problem.model_validate_json(response.content)
    except ValidationError:
        text = response.text.strip()[:300]
        title = response.reason_phrase or f"HTTP {response.status_code}"
        return Problem(title=title, status=response.status_code, detail=text or None)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    initial_wait_s: float = 0.5
    max_wait_s: float = 8.0  # of the exponential backoff (answers without Retry-After)
    max_retry_after_s: float = 60.0  # the longest Retry-After honoured as it is


def retry_after_seconds(response: httpx.Response, now: datetime | None = None) -> float | None:
    """The answer's Retry-After in seconds (delay-seconds or an HTTP date); None without one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class Upload:
    """An image part of a multipart request."""

    name: str
    data: bytes
    content_type: str

    @classmethod
    def from_path(cls, path: Path) -> Upload:
        """Raises OSError when the file cannot be read."""
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return cls(path.name, path.read_bytes(), content_type)

    def part(self) -> tuple[str, bytes, str]:
        return (self.name, self.data, self.content_type)


class _Retryable(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class GatewayClient:
    """Calls of the public API the CLI makes; thread-safe (one httpx.Client underneath)."""

    def __init__(
        self,
        base_url: str = DEFAULT_GATEWAY,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = httpx.Timeout(60.0, connect=10.0),
        max_connections: int = 10,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"X-API-Key": api_key} if api_key else {},
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- the API --------------------------------------------------------------------------

    def ready(self) -> None:
        """Returns when every backend is ready; GatewayProblem (503) says which is not."""
        self._call(lambda: self.http.get("/readyz"), 200)

    def open_job(self, kind: str = "ingest") -> JobOut:
        """Open a job that later uploads attach to."""
        body = JobCreate(kind=kind).model_dump(mode="json")
        return self._call(lambda: self.http.post("/v1/jobs", json=body), 201, JobOut)

    def job(self, job_id: str) -> JobOut:
        return self._call(lambda: self.http.get(f"/v1/jobs/{job_id}"), 200, JobOut)

    def add_item(
        self, image: Upload, metadata: Mapping[str, Any], job_id: str | None = None
    ) -> ItemAccepted:
        """Add or replace (same sku) one item; it is embedded asynchronously."""
        return self._call(
            lambda: self.http.post(
                "/v1/items",
                params=_job_param(job_id),
                files={"image": image.part()},
                data={"metadata": json.dumps(dict(metadata))},
            ),
            202,
            ItemAccepted,
        )

    def add_items(
        self,
        images: Sequence[Upload],
        metadata: Sequence[Mapping[str, Any]],
        job_id: str | None = None,
    ) -> BatchAccepted:
        """Many items in one request (the same order in both lists): an outcome per item."""
        files = [("image", image.part()) for image in images]
        form = {"metadata": json.dumps([dict(m) for m in metadata])}
        return self._call(
            lambda: self.http.post(
                "/v1/items/batch", params=_job_param(job_id), files=files, data=form
            ),
            207,
            BatchAccepted,
        )

    def recommend(
        self,
        likes: Sequence[Upload | str],
        dislikes: Sequence[Upload | str] = (),
        exclude: Sequence[str] = (),
        params: Mapping[str, Any] | None = None,
    ) -> SearchResponse:
        """Items ranked by liked and disliked examples: photos (`Upload`) and item ids (`str`).

        With photos the examples go as multipart parts; ids alone as a JSON body."""
        query = {key: _param(v) for key, v in (params or {}).items() if v is not None}
        photos = [("like", x.part()) for x in likes if isinstance(x, Upload)]
        photos += [("dislike", x.part()) for x in dislikes if isinstance(x, Upload)]
        ids = {
            "like_items": [x for x in likes if isinstance(x, str)],
            "dislike_items": [x for x in dislikes if isinstance(x, str)],
            "exclude": list(exclude),
        }
        body: dict[str, Any] = {"json": ids}
        if photos:
            form = {"like_item": ids["like_items"], "dislike_item": ids["dislike_items"]}
            body = {"files": photos, "data": {**form, "exclude": ids["exclude"]}}
        return self._call(
            lambda: self.http.post("/v1/recommend", params=query, **body), 200, SearchResponse
        )

    def search(
        self, image: Upload, k: int = 5, filters: Mapping[str, Any] | None = None
    ) -> SearchResponse:
        """The k inventory items most similar to the photo, best first."""
        params = {"k": k, **{key: v for key, v in (filters or {}).items() if v is not None}}
        return self._call(
            lambda: self.http.post("/v1/search", params=params, files={"image": image.part()}),
            200,
            SearchResponse,
        )

    # ---- plumbing -------------------------------------------------------------------------

    def _call(
        self,
        request: Callable[[], httpx.Response],
        expected: int,
        model: type[M] | None = None,
    ) -> Any:
        response = self._send(request)
        if response.status_code != expected:
            raise GatewayProblem(parse_problem(response))
        if model is None:
            return None
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise UnexpectedAnswer(response, exc) from exc

    def _send(self, request: Callable[[], httpx.Response]) -> httpx.Response:
        """`request()`, retried as the policy says; the last response, or GatewayUnreachable."""
        try:
            if self.retry is None:
                return request()
            return self._send_retrying(request, self.retry)
        except httpx.HTTPError as exc:
            raise GatewayUnreachable(self.base_url, exc) from exc

    @staticmethod
    def _send_retrying(
        request: Callable[[], httpx.Response], policy: RetryPolicy
    ) -> httpx.Response:
        backoff = wait_exponential(multiplier=policy.initial_wait_s, max=policy.max_wait_s)

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome is not None else None
            if isinstance(error, _Retryable):
                after = retry_after_seconds(error.response)
                if after is not None:
                    return min(after, policy.max_retry_after_s)
            return backoff(state)

        retrying = Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, (*_RETRY_EXCEPTIONS, _Retryable))),
            stop=stop_after_attempt(policy.attempts),
            wait=wait,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    response = request()
                    if response.status_code in _RETRY_STATUSES:
                        raise _Retryable(response)
                    return response
        except _Retryable as exc:
            return exc.response
        raise AssertionError("unreachable")  # pragma: no cover


def _param(value: Any) -> Any:
    # Booleans as FastAPI reads them ("true"/"false", not "True").
    return str(value).lower() if isinstance(value, bool) else value


def _job_param(job_id: str | None) -> dict[str, str]:
    return {"job_id": job_id} if job_id else {}
