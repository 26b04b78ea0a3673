"""A stand-in for the embedder (Celery) behind the gateway: it replaces
`fashionrec_shared.celery_app.send` and the AsyncResult it returns. (The indexer is the real app:
see indexer.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery.exceptions import TimeoutError as CeleryTimeoutError
from fashionrec_shared.tasks import (
    Colour,
    EmbedQueries,
    EmbedQueriesResult,
    EmbedQueryResult,
    Predicted,
)
from fashionrec_shared.vectors import encode_vector


def unit_vector(dim: int = 8) -> np.ndarray:
    v = np.arange(1, dim + 1, dtype=np.float32)
    return v / np.linalg.norm(v)


@dataclass
class FakeResult:
    value: Any = None
    error: BaseException | None = None
    forgotten: bool = False

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def forget(self) -> None:
        self.forgotten = True


@dataclass
class FakeEmbedder:
    """Replaces `send`: records each task sent and answers like an embedder worker would."""

    model_version: str = "m1"
    error: BaseException | None = None
    sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def timeout(self) -> None:
        self.error = CeleryTimeoutError("The operation timed out.")

    # Versions this embedder also holds (a model change): a query naming one gets it.
    also_loaded: tuple[str, ...] = ()
    # What the heads predict for a query photo, per model version (none: no heads).
    predicted: dict[str, Predicted] = field(default_factory=dict)
    # The dominant colours of every query photo.
    colours: list[Colour] | None = None
    # The vector per image sha (default: unit_vector()), to steer recommendations.
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, app: Any, task: str, payload: Any, **options: Any) -> FakeResult:
        self.sent.append((str(task), payload.model_dump(mode="json"), options))
        wanted = getattr(payload, "model_version", None)
        version = wanted if wanted in self.also_loaded else self.model_version
        if isinstance(payload, EmbedQueries):
            results = [self._result(image.sha256, version) for image in payload.images]
            answer = EmbedQueriesResult(results=results).model_dump(mode="json")
        else:
            answer = self._result(payload.image.sha256, version).model_dump(mode="json")
        return FakeResult(value=answer, error=self.error)

    def _result(self, sha256: str, version: str) -> EmbedQueryResult:
        return EmbedQueryResult(
            vector=encode_vector(self.vectors.get(sha256, unit_vector())),
            dim=8,
            model_version=version,
            predicted=self.predicted.get(version),
            colours=self.colours,
        )
