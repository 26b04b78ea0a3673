"""Celery app factory with the app-wide settings every fashionrec service shares.

App-wide: acks late and reject on worker lost (a crashed worker's message is redelivered),
prefetch 1 (long model tasks are not hoarded by one worker), JSON only, routes from
`tasks.TASK_QUEUES`. The per-task policy (retries, time limits, the poison-message guard that
gives up after `MAX_DELIVERIES`) is `task_base.PolicyTask`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult
from pydantic import BaseModel

from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.tasks import TASK_QUEUES, TaskName

MAX_DELIVERIES = 3
# Per-task limits (seconds), in the app's defaults and in task_base.PolicyTask.
SOFT_TIME_LIMIT = 120
HARD_TIME_LIMIT = 150


def make_celery(name: str, broker: BrokerSettings) -> Celery:
    app = Celery(name, broker=broker.url, backend=broker.result_backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_routes={str(t): {"queue": str(q)} for t, q in TASK_QUEUES.items()},
        task_soft_time_limit=SOFT_TIME_LIMIT,
        task_time_limit=HARD_TIME_LIMIT,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        # Longer than the hard time limit, so a slow task is not redelivered while it still runs.
        broker_transport_options={"visibility_timeout": 4 * HARD_TIME_LIMIT},
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        task_track_started=False,
    )
    return app


def send(app: Celery, task: TaskName, payload: BaseModel, **options: Any) -> AsyncResult:
    """Send a task by name with its typed payload, on the queue the contract gives it."""
    return app.send_task(
        str(task), args=[payload.model_dump(mode="json")], queue=str(TASK_QUEUES[task]), **options
    )
