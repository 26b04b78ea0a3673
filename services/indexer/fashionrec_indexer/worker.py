"""Celery app of the indexer worker: STORE_EMBEDDINGS, BUILD_INDEX, MODEL_ONLINE, and from its
beat timed rebuilds and the pending sweep (SWEEP_PENDING, see sweep.py).

`create_worker_app(settings)` builds the app; its tasks close over this process's `Resources`
(engine, Redis, blob store), opened after the fork in `worker_process_init` (else on first use),
never at import (a forked child must not share the parent's connections). The task policy, the
poison-message guard included, is `fashionrec_shared.task_base.PolicyTask`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.beat import PersistentScheduler
from fashionrec_shared.celery_app import make_celery, send
from fashionrec_shared.storage import BlobStore, StorageUnavailable, make_blob_store
from fashionrec_shared.task_base import PolicyTask, ProcessResources, poison_reason, policy_task
from fashionrec_shared.tasks import (
    BuildIndex,
    ModelOnline,
    Queue,
    StoreEmbeddings,
    SweepPending,
    TaskName,
)
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from fashionrec_indexer.builder import build_index
from fashionrec_indexer.db import make_engine
from fashionrec_indexer.ingest import give_up, store_embeddings
from fashionrec_indexer.model_change import Plan, model_online
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_indexer.sweep import sweep_pending

log = logging.getLogger("fashionrec.indexer.worker")


class RecoveringScheduler(PersistentScheduler):
    """Celery's file-backed beat schedule, started afresh when its file is corrupt.

    Celery recovers from some corruptions of the file only: one whose keys still list but whose
    values no longer unpickle raises out of `setup_schedule`, which ends the embedded beat
    process while the worker runs on, so timed rebuilds and pending sweeps stop without a sign
    (and `fashionrec up` sees a live worker). The file holds only the last run times, so
    starting afresh costs at most one run of each entry that comes early or late.
    """

    def setup_schedule(self) -> None:
        try:
            super().setup_schedule()
        except Exception as exc:
            log.warning(
                "beat schedule %s is unreadable (%r); starting a fresh one",
                self.schedule_filename,
                exc,
            )
            if self._store is not None:
                with contextlib.suppress(Exception):
                    self._store.close()
                self._store = None
            self._remove_db()
            super().setup_schedule()


class IndexerTask(PolicyTask):
    """The indexer's tasks: retried on storage, broker and database connection errors."""

    autoretry_for = (
        StorageUnavailable,
        RedisConnectionError,
        KombuOperationalError,
        OperationalError,
    )

    def on_poison(self, payload: Any, deliveries: int) -> dict[str, Any]:
        # Builds and announcements have no items to fail: the message ends as a result.
        return {"status": "poison"}


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


def embed_backlog(app: Celery) -> int:
    """Messages waiting in the embed queue (0 while it does not exist)."""
    with app.connection_for_read() as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=str(Queue.EMBED), passive=True)
        except conn.channel_errors:  # no such queue: nothing was ever sent, or all was taken
            return 0
        return int(declared.message_count)


class Resources(ProcessResources):
    """Engine, Redis client and blob store of the current process."""

    def __init__(self, settings: IndexerSettings) -> None:
        super().__init__()
        self.settings = settings
        self._engine: Engine | None = None
        self._redis: redis.Redis | None = None
        self._store: BlobStore | None = None

    def open(self) -> None:
        self._engine = make_engine(self.settings.database_url, pool_size=2)
        self._redis = redis.Redis.from_url(self.settings.broker.url)
        self._store = make_blob_store(self.settings.storage)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        if self._redis is not None:
            self._redis.close()
        self._engine = self._redis = self._store = None

    @property
    def engine(self) -> Engine:
        self.ensure()
        assert self._engine is not None
        return self._engine

    @property
    def redis(self) -> redis.Redis:
        self.ensure()
        assert self._redis is not None
        return self._redis

    @property
    def store(self) -> BlobStore:
        self.ensure()
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
        },
        "indexer-pending-sweep": {
            "task": str(TaskName.SWEEP_PENDING),
            "schedule": settings.pending_sweep_interval_s,
            "args": (SweepPending().model_dump(mode="json"),),
            "options": {"queue": str(Queue.INDEX)},
        },
    }
    app.conf.beat_schedule_filename = str(Path(settings.index_dir) / "celerybeat-schedule")
    app.conf.beat_scheduler = RecoveringScheduler

    resources.serve(app)

    def give_up_store(task: Task, data: StoreEmbeddings, deliveries: int) -> dict[str, Any]:
        # The items of a poison message end as failed (a re-embed job's only in the job).
        plan = give_up(resources.engine, data, poison_reason(deliveries))
        return {"status": "poison", **send_plan(app, resources.redis, plan)}

    @policy_task(
        app,
        TaskName.STORE_EMBEDDINGS,
        base=IndexerTask,
        payload=StoreEmbeddings,
        on_poison=give_up_store,
    )
    def store_embeddings_task(task: Task, data: StoreEmbeddings) -> dict[str, Any]:
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

    @policy_task(app, TaskName.BUILD_INDEX, base=IndexerTask, payload=BuildIndex)
    def build_index_task(task: Task, data: BuildIndex) -> dict[str, Any]:
        result = build_index(
            resources.engine,
            resources.store,
            n_trees=settings.n_trees,
            ann_dim=settings.ann_dim,
            ann_projection=settings.ann_projection,
            vector_dtype=settings.vector_dtype,
            target_recall=settings.target_recall,
            calibration_queries=settings.calibration_queries,
            ann_candidates=settings.ann_candidates,
            force=data.force,
            reason=data.reason,
            settle_s=settings.settle_s,
            model_version=data.model_version,
        )
        build_id = result.manifest["build_id"] if result.manifest else None
        return {"status": result.status, "detail": result.detail, "build_id": build_id}

    @policy_task(app, TaskName.MODEL_ONLINE, base=IndexerTask, payload=ModelOnline)
    def model_online_task(task: Task, data: ModelOnline) -> dict[str, Any]:
        plan = model_online(resources.engine, data)
        return {"status": "ok", **send_plan(app, resources.redis, plan)}

    @policy_task(app, TaskName.SWEEP_PENDING, base=IndexerTask, payload=SweepPending)
    def sweep_pending_task(task: Task, data: SweepPending) -> dict[str, Any]:
        # With a backlog, pending items may just be waiting their turn (a long ingest):
        # counting that against them would fail them for their patience.
        backlog = embed_backlog(app)
        if backlog:
            return {"status": "deferred", "embed_backlog": backlog}
        plan = sweep_pending(
            resources.engine,
            timeout_s=settings.pending_timeout_s,
            max_requeues=settings.pending_max_requeues,
        )
        for payload in plan.embed:  # committed: what the upsert sent, sent again
            send(app, TaskName.EMBED_ITEMS, payload)
        return {
            "status": "ok",
            "requeued": plan.requeued,
            "failed": plan.failed,
            "embed_tasks": len(plan.embed),
        }

    return app
