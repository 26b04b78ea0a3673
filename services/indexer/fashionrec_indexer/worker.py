"""Celery app of the indexer worker: STORE_EMBEDDINGS, BUILD_INDEX, MODEL_ONLINE, timed rebuilds.

Resources (engine, Redis, blob store) are created per process: in `worker_process_init` for
prefork children, else lazily on first use, never at import (a forked child must not share the
parent's connections).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import worker_process_init
from fashionrec_shared.celery_app import (
    HARD_TIME_LIMIT,
    MAX_DELIVERIES,
    SOFT_TIME_LIMIT,
    delivery_count,
    make_celery,
    send,
)
from fashionrec_shared.storage import BlobStore, StorageUnavailable, make_blob_store
from fashionrec_shared.tasks import BuildIndex, ModelOnline, Queue, StoreEmbeddings, TaskName
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from fashionrec_indexer.builder import build_index
from fashionrec_indexer.db import make_engine
from fashionrec_indexer.ingest import give_up, store_embeddings
from fashionrec_indexer.model_change import Plan, model_online
from fashionrec_indexer.settings import IndexerSettings

log = logging.getLogger("fashionrec.indexer.worker")

TRANSIENT = (StorageUnavailable, RedisConnectionError, KombuOperationalError, OperationalError)
TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    # The tasks are closures over this app's resources: never register them in other apps
    # (Celery's default), or a second app in one process would run the first one's.
    "shared": False,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": TRANSIENT,
    "retry_backoff": True,
    "max_retries": 3,
    "soft_time_limit": SOFT_TIME_LIMIT,
    "time_limit": HARD_TIME_LIMIT,
}
# Many STORE_EMBEDDINGS crossing the threshold at once should request one build, not hundreds.
BUILD_REQUESTED_KEY = "fashionrec:indexer:build-requested"
BUILD_REQUEST_TTL_S = 60
# Every embedder process announces its model; one model-change build request is enough.
MODEL_BUILD_REQUESTED_KEY = "fashionrec:indexer:model-build-requested:{model_version}"


def send_plan(app: Celery, client: redis.Redis, plan: Plan | None) -> dict[str, Any]:
    """Send what a model-change decision asks for (after its transaction committed)."""
    if plan is None:
        return {}
    for payload in plan.embed:
        send(app, TaskName.EMBED_ITEMS, payload)
    build_sent = False
    if plan.build is not None:
        key = MODEL_BUILD_REQUESTED_KEY.format(model_version=plan.build.model_version)
        if client.set(key, "1", nx=True, ex=BUILD_REQUEST_TTL_S):
            send(app, TaskName.BUILD_INDEX, plan.build)
            build_sent = True
    return {
        "detail": plan.detail,
        "job_id": str(plan.job_id) if plan.job_id else None,
        "embed_tasks": len(plan.embed),
        "build_requested": build_sent,
    }


class Resources:
    """Engine, Redis client and blob store of the current process."""

    def __init__(self, settings: IndexerSettings) -> None:
        self.settings = settings
        self._pid: int | None = None
        self._engine: Engine | None = None
        self._redis: redis.Redis | None = None
        self._store: BlobStore | None = None

    def init_process(self) -> None:
        self._engine = make_engine(self.settings.database_url, pool_size=2)
        self._redis = redis.Redis.from_url(self.settings.broker.url)
        self._store = make_blob_store(self.settings.storage)
        self._pid = os.getpid()

    def _ensure(self) -> None:
        if self._pid != os.getpid():
            self.init_process()

    @property
    def engine(self) -> Engine:
        self._ensure()
        assert self._engine is not None
        return self._engine

    @property
    def redis(self) -> redis.Redis:
        self._ensure()
        assert self._redis is not None
        return self._redis

    @property
    def store(self) -> BlobStore:
        self._ensure()
        assert self._store is not None
        return self._store


def create_worker_app(settings: IndexerSettings) -> Celery:
    app = make_celery("fashionrec-indexer", settings.broker)
    resources = Resources(settings)
    app.conf.task_default_queue = str(Queue.INDEX)
    app.conf.beat_schedule = {
        "indexer-timer-rebuild": {
            "task": str(TaskName.BUILD_INDEX),
            "schedule": settings.rebuild_interval_s,
            "args": (BuildIndex(reason="timer").model_dump(mode="json"),),
            "options": {"queue": str(Queue.INDEX)},
        }
    }
    app.conf.beat_schedule_filename = str(Path(settings.index_dir) / "celerybeat-schedule")

    @worker_process_init.connect(weak=False)
    def _init_process(**_: Any) -> None:
        resources.init_process()

    @app.task(name=str(TaskName.STORE_EMBEDDINGS), **TASK_OPTIONS)
    def store_embeddings_task(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        data = StoreEmbeddings.model_validate(payload)
        deliveries = delivery_count(resources.redis, self.request.id)
        if deliveries > MAX_DELIVERIES:
            log.error(
                "store_embeddings %s: poison after %d deliveries", self.request.id, deliveries
            )
            plan = give_up(resources.engine, data, f"gave up after {deliveries - 1} deliveries")
            return {"status": "poison", **send_plan(app, resources.redis, plan)}
        outcome = store_embeddings(resources.engine, data)
        if outcome.plan is not None:  # a re-embed job (model change)
            return {"status": "ok", **send_plan(app, resources.redis, outcome.plan)}
        build_requested = False
        if outcome.changed_since_build >= settings.rebuild_min_new and resources.redis.set(
            BUILD_REQUESTED_KEY, "1", nx=True, ex=BUILD_REQUEST_TTL_S
        ):
            send(app, TaskName.BUILD_INDEX, BuildIndex(reason="threshold"))
            build_requested = True
        return {
            "status": "ok",
            "indexed": outcome.indexed,
            "failed": outcome.failed,
            "build_requested": build_requested,
        }

    @app.task(name=str(TaskName.BUILD_INDEX), **TASK_OPTIONS)
    def build_index_task(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        data = BuildIndex.model_validate(payload)
        deliveries = delivery_count(resources.redis, self.request.id)
        if deliveries > MAX_DELIVERIES:
            log.error("build_index %s: poison after %d deliveries", self.request.id, deliveries)
            return {"status": "poison"}
        result = build_index(
            resources.engine,
            resources.store,
            n_trees=settings.n_trees,
            ann_dim=settings.ann_dim,
            ann_projection=settings.ann_projection,
            force=data.force,
            reason=data.reason,
            settle_s=settings.settle_s,
            model_version=data.model_version,
        )
        build_id = result.manifest["build_id"] if result.manifest else None
        return {"status": result.status, "detail": result.detail, "build_id": build_id}

    @app.task(name=str(TaskName.MODEL_ONLINE), **TASK_OPTIONS)
    def model_online_task(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        data = ModelOnline.model_validate(payload)
        deliveries = delivery_count(resources.redis, self.request.id)
        if deliveries > MAX_DELIVERIES:
            log.error("model_online %s: poison after %d deliveries", self.request.id, deliveries)
            return {"status": "poison"}
        plan = model_online(resources.engine, data)
        return {"status": "ok", **send_plan(app, resources.redis, plan)}

    return app
