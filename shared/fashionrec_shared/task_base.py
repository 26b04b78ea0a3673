"""The Celery task base and the per-process resources every fashionrec worker shares.

Policy (`PolicyTask`): acks late and reject on worker lost (a crashed worker's message is
redelivered), automatic retries with exponential backoff for the errors a service names as
transient (never `Exception`: a bug is not an outage), soft and hard time limits.

Redelivery alone would let a message that kills its worker loop for ever, so every delivery is
counted in Redis under the task id. A Celery retry re-sends the message under the same id with
`request.retries` one higher, so the count net of retries is how often the message was delivered
anew (after a worker crash or a lost connection). Past MAX_DELIVERIES the body does not run: the
task's `on_poison` hook ends the message instead (by default it fails with PoisonMessage).

A service subclasses PolicyTask once, naming its transient errors in `autoretry_for`, and
registers every task with `policy_task`, which gives the body the validated payload model:

    @policy_task(app, TaskName.BUILD_INDEX, base=IndexerTask, payload=BuildIndex)
    def build_index_task(task: Task, data: BuildIndex) -> dict[str, Any]: ...

Per-process resources (`ProcessResources`) are opened after the fork, in `worker_process_init`,
or on first use where no child is forked (solo pool, eager `apply` in tests).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, Task, current_app
from celery.signals import worker_process_init, worker_process_shutdown
from pydantic import BaseModel

from fashionrec_shared.celery_app import HARD_TIME_LIMIT, MAX_DELIVERIES, SOFT_TIME_LIMIT
from fashionrec_shared.keys import DELIVERIES_TTL_S, deliveries_key

log = logging.getLogger("fashionrec.tasks")

# body(task, payload) -> result; on_poison(task, payload, deliveries) -> result (or raises)
Body = Callable[[Any, Any], Any]
PoisonHook = Callable[[Any, Any, int], Any]


class PoisonMessage(RuntimeError):
    """A message was delivered more than MAX_DELIVERIES times (it keeps killing workers)."""


def poison_reason(deliveries: int) -> str:
    return f"poison message: gave up after {deliveries} deliveries"


class PolicyTask(Task):
    """Every fashionrec task: the retry, acknowledgement, time-limit and poison policy."""

    # Errors a later attempt can fix (connection errors of storage, broker, database); each
    # service names its own in a subclass. Bad input is reported, never retried.
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff = True
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = 3
    acks_late = True
    reject_on_worker_lost = True
    soft_time_limit = SOFT_TIME_LIMIT
    time_limit = HARD_TIME_LIMIT
    max_deliveries = MAX_DELIVERIES
    # Set per task by `policy_task`.
    payload_model: type[BaseModel] = BaseModel

    _deliveries_redis: redis.Redis | None = None
    _deliveries_pid: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if any(error in (Exception, BaseException) for error in cls.autoretry_for):
            raise TypeError(f"{cls.__name__}: retry only transient errors, never Exception")

    def deliveries_redis(self) -> redis.Redis:
        """The delivery counters' client: the broker's Redis, one client per process (made
        after the fork)."""
        if self._deliveries_redis is None or self._deliveries_pid != os.getpid():
            self._deliveries_redis = redis.Redis.from_url(self.app.conf.broker_url)
            self._deliveries_pid = os.getpid()
        return self._deliveries_redis

    def count_delivery(self) -> int | None:
        """Count this delivery; the count net of retries, None without a message (direct call).

        The counters live in the broker's Redis, with a client per process (made after the fork).
        """
        request = self.request
        if request.called_directly or not request.id:
            return None
        key = deliveries_key(request.id)
        pipe = self.deliveries_redis().pipeline()
        pipe.incr(key)
        pipe.expire(key, DELIVERIES_TTL_S)
        total, _ = pipe.execute()
        return int(total) - (request.retries or 0)

    def deliver(self, body: Body, raw: Any) -> Any:
        """Validate the payload, count the delivery, then run the body or give up on it.

        Runs inside Celery's autoretry: transient errors while counting or giving up are
        retried like those of the body."""
        payload = self.payload_model.model_validate(raw)
        deliveries = self.count_delivery()
        if deliveries is not None and deliveries > self.max_deliveries:
            log.error("%s[%s]: %s", self.name, self.request.id, poison_reason(deliveries))
            return self.on_poison(payload, deliveries)
        return body(self, payload)

    def on_poison(self, payload: Any, deliveries: int) -> Any:
        """End a poison message; tasks whose items must end as failed give their own hook."""
        raise PoisonMessage(poison_reason(deliveries))


def policy_task(
    app: Celery,
    name: str,
    *,
    base: type[PolicyTask],
    payload: type[BaseModel],
    on_poison: PoisonHook | None = None,
) -> Callable[[Body], Any]:
    """Register `body(task, payload)` as the task `name` of `app`, with `base`'s policy.

    The task belongs to `app` only (`shared=False`): bodies close over their app's resources,
    and Celery's default would register them in every app of the process."""

    def register(body: Body) -> Any:
        @functools.wraps(body)
        def run(self: PolicyTask, raw: Any) -> Any:
            return self.deliver(body, raw)

        options: dict[str, Any] = {"payload_model": payload}
        if on_poison is not None:
            options["on_poison"] = on_poison
        return app.task(name=str(name), base=base, bind=True, shared=False, **options)(run)

    return register


class ProcessResources:
    """What one worker process owns (connections, the model), opened after the fork.

    `serve(app)` opens them in each prefork child of a worker running `app`
    (`worker_process_init`) and closes them when the child exits (`worker_process_shutdown`);
    where no child is forked (solo pool, eager `apply`) `ensure()` opens them on first use.
    They are kept per process id, so a child never uses what its parent opened. Subclasses
    implement `open` and `close`.
    """

    def __init__(self) -> None:
        self.app: Celery | None = None
        self._pid: int | None = None
        self._lock = threading.RLock()

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what `open` made (the default: nothing)."""

    def serve(self, app: Celery) -> None:
        self.app = app
        # Weak references (the default): the handlers live as long as these resources, and
        # they act only for the app the worker runs (prefork makes it the current app).
        worker_process_init.connect(self._process_init)
        worker_process_shutdown.connect(self._process_shutdown)

    def adopt(self) -> None:
        """Take what the caller made as opened in this process (tests)."""
        self._pid = os.getpid()

    def ensure(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid != pid:
                self.open()
                self._pid = pid

    def release(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._pid = None
                self.close()

    def _runs_my_app(self) -> bool:
        return self.app is not None and current_app._get_current_object() is self.app

    def _process_init(self, **_: Any) -> None:
        if self._runs_my_app():
            self.ensure()

    def _process_shutdown(self, **_: Any) -> None:
        if self._runs_my_app():
            self.release()
