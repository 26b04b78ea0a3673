"""The task base every worker uses: policy, deliveries net of retries, the poison hook, and
per-process resources; against a real Redis broker."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest
import redis
from celery import Celery, Task, current_app
from celery.contrib.testing.worker import start_worker
from celery.signals import worker_process_init, worker_process_shutdown
from fashionrec_shared.celery_app import HARD_TIME_LIMIT, SOFT_TIME_LIMIT, make_celery
from fashionrec_shared.keys import EMBEDDER_ALIVE_PATTERN, deliveries_key, embedder_alive_key
from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.task_base import PoisonMessage, PolicyTask, ProcessResources, policy_task
from pydantic import BaseModel, ValidationError


class Payload(BaseModel):
    n: int


class DemoTask(PolicyTask):
    autoretry_for = (ConnectionError,)
    retry_backoff_max = 1  # keeps the real worker's retries short


class Flaky:
    """A body that fails with a transient error `failures` times, then answers."""

    def __init__(self, failures: int = 0, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.retries: list[int] = []  # request.retries of every attempt
        self.payloads: list[Payload] = []

    def __call__(self, task: Task, payload: Payload) -> dict[str, Any]:
        self.retries.append(task.request.retries)
        self.payloads.append(payload)
        if len(self.retries) <= self.failures:
            raise self.error("down for now")
        return {"n": payload.n}


def _app(redis_url: str) -> Celery:
    return make_celery("test-task-base", BrokerSettings(url=redis_url))


def _task(app: Celery, body: Flaky, **options: Any) -> Any:
    return policy_task(app, "fashionrec.test.flaky", base=DemoTask, payload=Payload, **options)(
        body
    )


def test_every_task_carries_the_policy(redis_url: str) -> None:
    app = _app(redis_url)
    task = _task(app, Flaky())
    assert task.autoretry_for == (ConnectionError,)
    assert task.max_retries == 3 and task.retry_backoff is True and task.retry_jitter is True
    assert task.acks_late and task.reject_on_worker_lost
    assert (task.soft_time_limit, task.time_limit) == (SOFT_TIME_LIMIT, HARD_TIME_LIMIT)
    # shared=False: a body closing over one app's resources is never registered in another.
    other = Celery("other")
    other.finalize()
    assert "fashionrec.test.flaky" in app.tasks and "fashionrec.test.flaky" not in other.tasks


def test_retrying_exception_is_refused() -> None:
    with pytest.raises(TypeError, match="never Exception"):

        class Everything(PolicyTask):
            autoretry_for = (ConnectionError, Exception)


def test_retries_are_not_counted_as_deliveries(redis_url: str) -> None:
    body = Flaky(failures=3)
    task = _task(_app(redis_url), body)
    result = task.apply(args=[{"n": 1}], task_id="t-retried")  # eager apply retries too
    assert result.successful(), result.traceback
    assert result.get() == {"n": 1}
    assert body.retries == [0, 1, 2, 3]  # the last attempt ran the body: no poison
    assert redis.Redis.from_url(redis_url).get(deliveries_key("t-retried")) == b"4"


def test_redeliveries_are_counted_and_end_in_the_poison_hook(redis_url: str) -> None:
    body = Flaky()
    poisoned: list[tuple[Payload, int]] = []

    def on_poison(task: Task, payload: Payload, deliveries: int) -> dict[str, Any]:
        poisoned.append((payload, deliveries))
        return {"status": "poison"}

    task = _task(_app(redis_url), body, on_poison=on_poison)
    for _ in range(3):  # the same message again and again, as after worker crashes
        assert task.apply(args=[{"n": 2}], task_id="t-crashing").get() == {"n": 2}
    assert task.apply(args=[{"n": 2}], task_id="t-crashing").get() == {"status": "poison"}
    assert len(body.retries) == 3  # the body did not run again
    assert poisoned == [(Payload(n=2), 4)]
    # A redelivery of a retried message counts too: 5 deliveries, 1 of them a retry.
    assert task.apply(args=[{"n": 2}], task_id="t-crashing", retries=1).get() == {
        "status": "poison"
    }
    assert poisoned[-1] == (Payload(n=2), 4)


def test_without_a_hook_a_poison_message_fails(redis_url: str) -> None:
    task = _task(_app(redis_url), Flaky())
    redis.Redis.from_url(redis_url).set(deliveries_key("t-poison"), 3)
    result = task.apply(args=[{"n": 3}], task_id="t-poison")
    assert result.failed()
    assert isinstance(result.result, PoisonMessage)
    assert str(result.result) == "poison message: gave up after 4 deliveries"


def test_other_errors_and_bad_payloads_are_not_retried(redis_url: str) -> None:
    body = Flaky(failures=1, error=ValueError)
    task = _task(_app(redis_url), body)
    result = task.apply(args=[{"n": 4}], task_id="t-bug")
    assert result.failed() and isinstance(result.result, ValueError)
    assert body.retries == [0]
    bad = task.apply(args=[{"n": "four"}], task_id="t-bad")
    assert bad.failed() and isinstance(bad.result, ValidationError)
    assert body.retries == [0]


def test_the_body_gets_the_payload_model_and_a_direct_call_counts_nothing(
    redis_url: str,
) -> None:
    body = Flaky()
    task = _task(_app(redis_url), body)
    assert task({"n": 5}) == {"n": 5}
    assert body.payloads == [Payload(n=5)]
    assert redis.Redis.from_url(redis_url).keys("fashionrec:deliveries:*") == []


def test_a_worker_retries_through_the_broker_without_counting_deliveries(redis_url: str) -> None:
    app = _app(redis_url)
    body = Flaky(failures=2)
    task = _task(app, body)
    previous = current_app._get_current_object()
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
            result = task.apply_async(args=[{"n": 6}])
            assert result.get(timeout=60) == {"n": 6}
    finally:
        previous.set_current()
    assert body.retries == [0, 1, 2]  # re-sent under the same id, not counted as deliveries
    assert redis.Redis.from_url(redis_url).get(deliveries_key(result.id)) == b"3"


class Opened(ProcessResources):
    def __init__(self) -> None:
        super().__init__()
        self.opened: list[int] = []
        self.closed = 0

    def open(self) -> None:
        self.opened.append(os.getpid())

    def close(self) -> None:
        self.closed += 1


def _opened_in_child(resources: Opened, queue: Any) -> None:
    resources.ensure()
    queue.put(resources.opened)


def test_resources_open_once_per_process_and_again_after_a_fork() -> None:
    resources = Opened()
    resources.ensure()
    resources.ensure()
    assert resources.opened == [os.getpid()]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_opened_in_child, args=(resources, queue))
    child.start()
    opened = queue.get(timeout=30)
    child.join(30)
    assert opened == [os.getpid(), child.pid]  # the child did not reuse the parent's


def test_process_signals_open_only_the_app_the_worker_runs() -> None:
    mine, other = Opened(), Opened()
    app = Celery("mine")
    mine.serve(app)
    other.serve(Celery("other"))
    previous = current_app._get_current_object()
    app.set_current()  # what the prefork pool does in each child before worker_process_init
    try:
        worker_process_init.send(sender=None)
        assert (mine.opened, other.opened) == ([os.getpid()], [])
        worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        assert (mine.closed, other.closed) == (1, 0)
    finally:
        previous.set_current()


def test_heartbeat_keys_match_the_pattern_readers_scan() -> None:
    from fnmatch import fnmatchcase

    assert fnmatchcase(embedder_alive_key("box-1", 42), EMBEDDER_ALIVE_PATTERN)
    assert embedder_alive_key("box-1", 42) == "fashionrec:embedder:alive:box-1:42"
