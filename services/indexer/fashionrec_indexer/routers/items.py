"""Items: upsert one or a batch (embedding is queued after the commit), read, delete."""

from __future__ import annotations

from collections.abc import Sequence

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import (
    IndexerItem,
    UpsertItem,
    UpsertItemResult,
    UpsertItems,
    UpsertItemsResult,
)
from fashionrec_shared.tasks import TaskName
from fastapi import APIRouter, Response
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer import upserts
from fashionrec_indexer.deps import EngineDep, TasksDep, TaskSender, item_uuid
from fashionrec_indexer.responses import item_out

router = APIRouter()


def _upsert(
    engine: Engine, tasks: TaskSender, bodies: Sequence[UpsertItem], job_id: str | None
) -> upserts.UpsertPlan:
    try:
        plan = upserts.upsert_items(engine, bodies, job_id)
    except upserts.UnknownJob as exc:
        raise ProblemError(404, "Not Found", str(exc)) from exc
    tasks.send_all(TaskName.EMBED_ITEMS, plan.embed)  # committed: the embedders may see them
    return plan


@router.post("/items", response_model=UpsertItemResult)
def upsert_item(body: UpsertItem, engine: EngineDep, tasks: TasksDep) -> UpsertItemResult:
    [result] = _upsert(engine, tasks, [body], body.job_id).results
    return result


@router.post("/items/batch", response_model=UpsertItemsResult)
def upsert_items(body: UpsertItems, engine: EngineDep, tasks: TasksDep) -> UpsertItemsResult:
    """Many items in one transaction and one job; EMBED_ITEMS of up to 32 images each."""
    try:
        upserts.check_distinct_skus(body.items)
    except upserts.DuplicateSku as exc:
        raise ProblemError(422, "Unprocessable Content", str(exc)) from exc
    plan = _upsert(engine, tasks, body.items, body.job_id)
    return UpsertItemsResult(
        job_id=str(plan.job_id), results=plan.results, embed_tasks=len(plan.embed)
    )


@router.get("/items/{item_id}", response_model=IndexerItem)
def get_item(item_id: str, engine: EngineDep) -> IndexerItem:
    item = item_uuid(item_id)
    with engine.connect() as conn:
        # Predictions of the version searches are served with, as filters see them.
        row = repo.get_item(conn, item, repo.active_model_version(conn))
    if row is None:
        raise ProblemError(404, "Not Found", f"no item {item_id!r}")
    return item_out(row)


@router.delete("/items/{item_id}", status_code=204)
def delete_item(item_id: str, engine: EngineDep) -> Response:
    item = item_uuid(item_id)
    with engine.begin() as conn:
        deleted = repo.delete_item(conn, item)
    if not deleted:
        raise ProblemError(404, "Not Found", f"no item {item_id!r}")
    return Response(status_code=204)
