"""Documented error answers for the OpenAPI schema (all are application/problem+json)."""

from __future__ import annotations

from typing import Any

from fashionrec_shared.problems import PROBLEM_JSON
from fashionrec_shared.schemas import Problem

_DESCRIPTIONS = {
    401: "missing or wrong X-API-Key",
    404: "not found",
    409: "conflict reported by the indexer",
    413: "upload too large (bytes or pixels)",
    415: "not an image in a supported format",
    422: "invalid input",
    429: "rate limit exceeded; Retry-After says when to try again",
    502: "a backend service failed",
    503: "a backend service (storage, broker, indexer, database) is unavailable; see Retry-After",
    504: "the embedder or the indexer did not answer in time; see Retry-After",
    507: "object storage is full: nothing was stored",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {
            "model": Problem,
            "description": _DESCRIPTIONS.get(code, "error"),
            "content": {PROBLEM_JSON: {}},
        }
        for code in codes
    }
