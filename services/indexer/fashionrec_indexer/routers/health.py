"""/livez (no dependencies), /readyz (database and a loaded index state) and /metrics."""

from __future__ import annotations

from typing import Any

from fashionrec_shared.problems import ProblemError
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from fashionrec_indexer.deps import EngineDep, IndexStateDep, MetricsDep
from fashionrec_indexer.search import searchable_count

router = APIRouter()


@router.get("/livez")
def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(engine: EngineDep, state: IndexStateDep) -> dict[str, Any]:
    snapshot = state.current
    if snapshot is None:
        raise ProblemError(503, "Service Unavailable", "index state not initialised yet")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            view = snapshot.view(conn)
    except OperationalError as exc:
        raise ProblemError(503, "Service Unavailable", "database unavailable") from exc
    return {
        "status": "ready",
        "model_version": view.model_version,
        "index_version": view.index_version,
        "items": searchable_count(view.build, view.delta),
    }


@router.get("/metrics")
def metrics_endpoint(metrics: MetricsDep, state: IndexStateDep) -> Response:
    snapshot = state.current
    if snapshot is not None:
        metrics.items_in_index.set(snapshot.build.size if snapshot.build else 0)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
