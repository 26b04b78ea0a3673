"""Query embeddings: a Celery round trip to the embedder, behind a Redis cache keyed by model
version and image sha.

The gateway never loads the model; it sends `fashionrec.embedder.embed_query` (queue `embed`) by
name with an `EmbedQuery` payload and waits a bounded time for the `EmbedQueryResult` dict. The
payload names the model version the indexer serves (`ServingVersion`): during a model change the
embedder holds the old and the new model, and the old one serves until the new index is in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from fashionrec_shared.celery_app import send
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.tasks import (
    EmbedQueries,
    EmbedQueriesResult,
    EmbedQuery,
    EmbedQueryResult,
    ImageRef,
    TaskName,
)
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel, ValidationError

log = logging.getLogger("fashionrec.gateway.embedding")

# v3: entries hold the query's predictions and dominant colours; older entries (written
# without them) are never read, so no answer comes from a cache entry that lost them.
QVEC_PREFIX = "fashionrec:qvec:v3:"

R = TypeVar("R", bound=BaseModel)


class QueryEmbedder(Protocol):
    def __call__(
        self, image: ImageRef, timeout_s: float, model_version: str | None = None
    ) -> EmbedQueryResult: ...

    def batch(
        self, images: list[ImageRef], timeout_s: float, model_version: str | None = None
    ) -> list[EmbedQueryResult]: ...


class ServingVersion:
    """The model version the indexer serves, as last seen in its answers (one per process).

    Learnt from search answers and from the 409 problem the indexer sends when a query's
    version is not the served one; None until the first answer (the embedder's primary then).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: str | None = None

    @property
    def value(self) -> str | None:
        return self._value

    def update(self, model_version: str | None) -> None:
        if model_version:
            with self._lock:
                if model_version != self._value:
                    log.info("indexer serves model %s (was %s)", model_version, self._value)
                    self._value = model_version


def tune_for_requests(app: Celery) -> Celery:
    """Fail fast when Redis is gone: a request waits seconds, not Celery's default 20 retries."""
    app.conf.result_backend_transport_options = {
        "retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        }
    }
    app.conf.task_publish_retry_policy = {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    }
    return app


def _unreachable(exc: BaseException) -> bool:
    # Celery reports a result store it could not reconnect to as a RuntimeError caused by
    # the connection error.
    cause = exc if not isinstance(exc, RuntimeError) else exc.__cause__
    return isinstance(cause, _CONNECTION_ERRORS)


_CONNECTION_ERRORS = (
    KombuOperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
)


class CeleryQueryEmbedder:
    """Sends EMBED_QUERY (one photo) or EMBED_QUERIES (several, one model batch) and waits for
    the result; failures become 503/504/502 problems."""

    def __init__(self, app: Celery, sender: Callable[..., Any] = send) -> None:
        self.app = app
        self._send = sender  # replaced in tests; the real one is fashionrec_shared.celery_app.send

    def __call__(
        self, image: ImageRef, timeout_s: float, model_version: str | None = None
    ) -> EmbedQueryResult:
        payload = EmbedQuery(image=image, model_version=model_version)
        return self._round_trip(TaskName.EMBED_QUERY, payload, EmbedQueryResult, timeout_s)

    def batch(
        self, images: list[ImageRef], timeout_s: float, model_version: str | None = None
    ) -> list[EmbedQueryResult]:
        """One result per image, in order, all of one model version."""
        payload = EmbedQueries(images=images, model_version=model_version)
        answer = self._round_trip(TaskName.EMBED_QUERIES, payload, EmbedQueriesResult, timeout_s)
        versions = {result.model_version for result in answer.results}
        if len(answer.results) != len(images) or len(versions) > 1:
            raise ProblemError(
                502,
                "Bad Gateway",
                f"the embedder sent {len(answer.results)} results of versions "
                f"{sorted(versions)} for {len(images)} photos",
            )
        return answer.results

    def _round_trip(
        self, task: TaskName, payload: BaseModel, model: type[R], timeout_s: float
    ) -> R:
        try:
            # expires: a query nobody waits for any more is not worth a worker's time.
            result = self._send(self.app, task, payload, expires=timeout_s)
        except (*_CONNECTION_ERRORS, RuntimeError) as exc:
            if not _unreachable(exc):
                raise
            raise ProblemError(
                503,
                "Service Unavailable",
                f"the task broker is unreachable ({exc.__cause__ or exc})",
            ) from exc
        try:
            raw = result.get(timeout=timeout_s)
        except CeleryTimeoutError as exc:
            raise ProblemError(
                504,
                "Gateway Timeout",
                f"no embedder answered within {timeout_s:g} s; are embedder workers running?",
            ) from exc
        except Exception as exc:  # the task itself failed, or Redis went away
            if _unreachable(exc):
                raise ProblemError(
                    503, "Service Unavailable", f"the result backend is unreachable ({exc})"
                ) from exc
            log.warning("%s failed: %r", task, exc)
            raise ProblemError(502, "Bad Gateway", f"the embedder failed: {exc}") from exc
        _forget(result)
        try:
            if isinstance(raw, str | bytes):
                return model.model_validate_json(raw)
            return model.model_validate(raw)
        except ValidationError as exc:
            raise ProblemError(
                502, "Bad Gateway", f"the embedder sent an unexpected result: {exc.errors()[:3]}"
            ) from exc


def _forget(result: Any) -> None:
    # The gateway is the only reader of a query's result; free the backend key now.
    forget = getattr(result, "forget", None)
    if forget is None:
        return
    try:
        forget()
    except Exception:  # best effort; the key expires anyway
        log.debug("could not forget task result", exc_info=True)


def qvec_key(model_version: str, sha256: str) -> str:
    return f"{QVEC_PREFIX}{model_version}:{sha256}"


class QueryVectorCache:
    """EmbedQueryResult JSON (vector, predictions, colours) under
    `{QVEC_PREFIX}{model_version}:{sha256}`.

    Keyed by version, so a model change never serves a stale vector: an entry is valid as long
    as its version is. Redis trouble is a cache miss.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def get(self, model_version: str, sha256: str) -> EmbedQueryResult | None:
        if self.ttl_s <= 0:
            return None
        try:
            raw = self.client.get(qvec_key(model_version, sha256))
        except redis.RedisError:
            log.warning("query cache read failed", exc_info=True)
            return None
        if raw is None:
            return None
        try:
            result = EmbedQueryResult.model_validate_json(raw)
        except ValidationError:
            result = None
        if result is None or result.model_version != model_version:
            self.drop(model_version, sha256)
            return None
        return result

    def put(self, sha256: str, result: EmbedQueryResult) -> None:
        """Store under the version that made the vector."""
        if self.ttl_s <= 0:
            return
        try:
            self.client.set(
                qvec_key(result.model_version, sha256), result.model_dump_json(), ex=self.ttl_s
            )
        except redis.RedisError:
            log.warning("query cache write failed", exc_info=True)

    def drop(self, model_version: str, sha256: str) -> None:
        try:
            self.client.delete(qvec_key(model_version, sha256))
        except redis.RedisError:
            log.warning("query cache delete failed", exc_info=True)
