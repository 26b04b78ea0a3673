"""Liveness, readiness (every backend the gateway needs) and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fashionrec_shared.keys import EMBEDDER_ALIVE_PATTERN
from fashionrec_shared.problems import ProblemError, problem_response
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from fashionrec_gateway.deps import BlobStoreDep, IndexerDep, RedisDep
from fashionrec_gateway.embedders import alive_keys
from fashionrec_gateway.responses import problems

router = APIRouter(tags=["health"])
log = logging.getLogger("fashionrec.gateway.health")


class Live(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    status: str = "ready"
    checks: dict[str, str]


@router.get("/livez", response_model=Live, summary="The process answers")
async def livez() -> Live:
    return Live()


def _check(checks: dict[str, str], name: str, fn: Any) -> None:
    try:
        result = fn()
    except ProblemError as exc:
        checks[name] = f"failed: {exc.detail or exc.title}"
    except Exception as exc:  # any failure is a failed check, never a 500
        checks[name] = f"failed: {exc}"
    else:
        checks[name] = result if isinstance(result, str) else "ok"


def _embedders(client: redis.Redis) -> str:
    alive = len(alive_keys(client))
    if alive == 0:
        raise RuntimeError(f"no embedder worker heartbeat ({EMBEDDER_ALIVE_PATTERN})")
    return f"ok ({alive} alive)"


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Storage, broker, at least one embedder and the indexer are ready",
    responses=problems(503),
)
def readyz(
    request: Request, store: BlobStoreDep, client: RedisDep, indexer: IndexerDep
) -> Response | Ready:
    checks: dict[str, str] = {}
    _check(checks, "storage", store.ping)
    _check(checks, "broker", client.ping)
    _check(checks, "embedder", lambda: _embedders(client))
    _check(checks, "indexer", indexer.ready)
    failed = [name for name, state in checks.items() if not state.startswith("ok")]
    if failed:
        return problem_response(
            503, "Service Unavailable", f"not ready: {', '.join(failed)}", request, checks=checks
        )
    return Ready(checks=checks)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    data = generate_latest(request.app.state.metrics.registry)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)
