"""Dependencies: everything a handler needs comes from app.state, built in the lifespan."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Annotated

from celery import Celery
from fashionrec_shared.celery_app import send
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.tasks import TaskName
from fastapi import Depends, Request
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.index_state import IndexState, Snapshot
from fashionrec_indexer.metrics import Metrics
from fashionrec_indexer.settings import IndexerSettings

log = logging.getLogger("fashionrec.indexer.deps")


class TaskSender:
    """Sends tasks once the transaction that decided them has committed; an unreachable broker
    answers 503 (the data is stored: a retry of the request sends them again)."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def send(self, task: TaskName, payload: BaseModel) -> str:
        try:
            return send(self.celery, task, payload).id
        except (KombuOperationalError, RedisConnectionError, OSError) as exc:
            log.warning("broker unavailable sending %s: %s", task, exc)
            raise ProblemError(
                503, "Service Unavailable", "the task broker is unavailable"
            ) from exc

    def send_all(self, task: TaskName, payloads: Sequence[BaseModel]) -> None:
        for payload in payloads:
            self.send(task, payload)


def get_settings(request: Request) -> IndexerSettings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_index_state(request: Request) -> IndexState:
    return request.app.state.index_state


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_tasks(request: Request) -> TaskSender:
    return request.app.state.tasks


SettingsDep = Annotated[IndexerSettings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
IndexStateDep = Annotated[IndexState, Depends(get_index_state)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TasksDep = Annotated[TaskSender, Depends(get_tasks)]


def current_snapshot(state: IndexStateDep) -> Snapshot:
    """The snapshot queries read (the same one to the end of the request)."""
    snapshot = state.current
    if snapshot is None:
        raise ProblemError(503, "Service Unavailable", "the index is still loading; retry shortly")
    return snapshot


SnapshotDep = Annotated[Snapshot, Depends(current_snapshot)]


def item_uuid(item_id: str) -> uuid.UUID:
    """The id of an item path; an id that is no UUID names no item.

    Called in the handlers rather than as a dependency, so that a bad query parameter is a 422
    before an unknown id is a 404.
    """
    parsed = repo.parse_uuid(item_id)
    if parsed is None:
        raise ProblemError(404, "Not Found", f"no item {item_id!r}")
    return parsed
