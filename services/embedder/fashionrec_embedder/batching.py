"""Dynamic batching: the images of concurrent embed tasks share one model call.

With batching on (the default, one model process per worker) the worker runs Celery's threads
pool: up to `batch_tasks` tasks are in flight in the one process that holds the model, each in
its own thread, with the normal Celery tracer around it (acks late, results, retries, delivery
counting). A task thread fetches, decodes and preprocesses its images itself, then hands the
preprocessed rows to the process's `Batcher` and waits. One batcher thread runs the model:

- it takes rows in priority order: queries first, then item rows by the age of their task (the
  oldest task's rows first, so tasks finish one after another instead of all together late);
- it waits for more rows only while a batch could still grow: fewer rows than the model's batch
  size are queued, another task of this process is received or still preparing its images (or
  the last batch served several tasks, whose clients tend to come back at once), and the
  window (`batch_window_ms`, from the oldest queued row or the end of the last inference,
  whichever is later) is open. A lone request never waits;
- rows of different models (during a model change) never share a batch;
- if a batch's inference raises, its rows are run again one by one, so only the row that fails
  fails (its task), and the others get their vectors.

A message delivered again after its worker died is a suspect (it may be what killed the worker):
`BatchingEmbedderTask` runs suspects one at a time, each in batches of its own rows only, and
counts a suspect's delivery only once it runs. So when a suspect kills the worker again, the
suspects waiting beside it are not counted, and a poison message ends failed after
MAX_DELIVERIES without taking its batch-mates with it.

Multi-item tasks (bulk ingestion, re-embedding) take one of `bulk_tasks` slots (default 2: one
task's batch is inferred while the next one's images are decoded), which bounds the memory of
prepared images; single items and queries do not wait for a slot.

What the threads pool changes: Celery enforces no time limits on threads, so the soft limit is
kept by the waits here (past it a task's rows are withdrawn and SoftTimeLimitExceeded raised,
and EMBED_ITEMS reports the unfinished items failed); there is no hard limit. And there is no
pool child to lose: when the worker process dies, its unacknowledged messages come back after
the broker's visibility timeout (as for a killed prefork main process), not at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

if TYPE_CHECKING:
    from fashionrec_embedder.model import Embedded, Embedder
    from fashionrec_embedder.settings import EmbedderSettings

log = logging.getLogger("fashionrec.embedder.batching")


# How long a received task that has not started yet may hold batches open.
EXPECT_S = 2.0


class Priority(IntEnum):
    """Lower first: a query waits for no queued item row."""

    QUERY = 0
    ITEMS = 1


class BatcherStopped(RuntimeError):
    """The batcher was stopped while rows were waiting (the worker is shutting down)."""


@dataclass(eq=False)
class _Row:
    model: Embedder
    array: np.ndarray
    priority: int
    order: int  # the task's place: rows of older tasks go first
    seq: int  # arrival order
    group: int  # one `run` call
    isolated: bool
    enqueued: float
    done: threading.Event
    label: str = ""  # the task id, for logs
    result: Embedded | BaseException | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.priority, self.order, self.seq)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    sizes: Counter[int] = field(default_factory=Counter)  # batch size -> batches
    reruns: int = 0  # batches run again row by row after their inference raised
    wait_s: float = 0.0  # time spent holding a batch open for more rows

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "sizes": dict(sorted(self.sizes.items())),
            "mean_size": round(self.rows / self.batches, 2) if self.batches else 0.0,
            "reruns": self.reruns,
            "wait_ms": round(self.wait_s * 1000, 1),
        }


class Batcher:
    """Gathers the rows of concurrent `run` calls into model batches, run on one thread."""

    def __init__(self, *, window_s: float = 0.005, bulk_tasks: int = 2) -> None:
        self.window_s = window_s
        self.stats = BatchStats()
        self._suspects = threading.Lock()  # one redelivered message at a time (module doc)
        self._suspect_owner: int | None = None
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._seq = itertools.count()
        self._groups = itertools.count()
        self._orders = itertools.count()
        self._expected: dict[str, float] = {}  # task id -> when received, not started yet
        self._active = 0  # tasks inside `task()`
        self._waiting = 0  # of those, blocked in `run` or waiting for a bulk slot
        self._bulk = threading.BoundedSemaphore(bulk_tasks)
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._stopped = False
        self._last_tasks = 0  # tasks served by the last batch
        self._free_since = 0.0  # when the model last became free
        self.on_batch: Callable[[list[_Row]], None] | None = None  # tests observe batches

    # ---- what task threads call ---------------------------------------------------------------

    def next_order(self) -> int:
        return next(self._orders)

    def expect(self, task_id: str) -> None:
        """A task was received (its thread may not run yet): rows of it may follow soon."""
        with self._cond:
            self._expected[task_id] = time.monotonic()

    def forget(self, task_id: str) -> None:
        """A received task will not run (revoked, rejected)."""
        with self._cond:
            self._expected.pop(task_id, None)

    @contextlib.contextmanager
    def task(self, task_id: str | None = None) -> Iterator[None]:
        """Around a task body: while it prepares images the batcher may wait for them."""
        with self._cond:
            if task_id is not None:
                self._expected.pop(task_id, None)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def bulk_slot(self) -> Iterator[None]:
        """One of the `bulk_tasks` slots for a multi-item task (bounds prepared images)."""
        with self._blocked():
            self._bulk.acquire()
        try:
            yield
        finally:
            self._bulk.release()

    def acquire_suspect(self, timeout: float) -> None:
        """Wait until no other suspect (a redelivered message) of this process is in flight.

        The thread holds the turn until `release_suspect`: the worker calls it once the message
        is acknowledged or rejected, so a suspect that kills the process afterwards cannot take
        the previous one's unacknowledged message with it. Past `timeout` it goes ahead anyway
        (a turn that was never given back must not stop the worker)."""
        with self._blocked():
            acquired = self._suspects.acquire(timeout=timeout)
        if not acquired:
            log.warning("suspect turn not given back within %.0fs; going ahead", timeout)
            return
        self._suspect_owner = threading.get_ident()

    def holds_suspect_turn(self) -> bool:
        return self._suspect_owner == threading.get_ident()

    def release_suspect(self) -> None:
        """Give the suspect turn back, if this thread holds it."""
        if self._suspect_owner == threading.get_ident():
            self._suspect_owner = None
            self._suspects.release()

    def run(
        self,
        model: Embedder,
        batch: np.ndarray,
        *,
        priority: Priority,
        order: int | None = None,
        isolated: bool = False,
        deadline: float | None = None,
        label: str = "",
    ) -> list[Embedded]:
        """Embed the preprocessed rows of `batch` with `model`, batched with other calls' rows.

        Blocks until every row is done; the exception of a row that failed is raised. Past
        `deadline` (time.monotonic) the rows not started are withdrawn and SoftTimeLimitExceeded
        is raised, as the task's soft time limit would.
        """
        if len(batch) == 0:
            return []
        now = time.monotonic()
        order = self.next_order() if order is None else order
        group = next(self._groups)
        rows = [
            _Row(model, batch[i], int(priority), order, next(self._seq), group, isolated, now,
                 threading.Event(), label)
            for i in range(len(batch))
        ]  # fmt: skip
        with self._cond:
            if self._stopped:
                raise BatcherStopped("the embedder is shutting down")
            self._ensure_thread()
            self._rows.extend(rows)
            self._waiting += 1  # this task prepares nothing more until its rows are done
            self._cond.notify_all()
        try:
            for row in rows:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not row.done.wait(timeout):
                    self._withdraw(group)
                    raise SoftTimeLimitExceeded()
        finally:
            with self._cond:
                self._waiting -= 1
        results: list[Embedded] = []
        for row in rows:
            if isinstance(row.result, BaseException):
                raise row.result
            assert row.result is not None
            results.append(row.result)
        return results

    def runner(
        self,
        model: Embedder,
        *,
        priority: Priority,
        order: int | None = None,
        isolated: bool = False,
        deadline: float | None = None,
        label: str = "",
    ) -> Callable[[np.ndarray], list[Embedded]]:
        """`run` for one model and task, as Embedder.embed_and_predict's `run` argument."""
        order = self.next_order() if order is None else order

        def run(batch: np.ndarray) -> list[Embedded]:
            return self.run(
                model,
                batch,
                priority=priority,
                order=order,
                isolated=isolated,
                deadline=deadline,
                label=label,
            )

        return run

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            thread = self._thread if self._pid == os.getpid() else None
        if thread is not None:
            thread.join(timeout)

    # ---- internals ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _blocked(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._waiting -= 1

    def _preparing(self) -> int:
        """Tasks of this process that are received, or fetching or decoding images: rows of
        them may follow. A receipt older than EXPECT_S no longer counts (it may never run)."""
        if self._expected:
            stale = time.monotonic() - EXPECT_S
            for task_id in [t for t, at in self._expected.items() if at < stale]:
                del self._expected[task_id]
        return self._active - self._waiting + len(self._expected)

    def _withdraw(self, group: int) -> None:
        with self._cond:
            self._rows = [r for r in self._rows if r.group != group]

    def _ensure_thread(self) -> None:
        # Threads do not survive fork: a process that inherited a batcher starts its own thread.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="embedder-batcher", daemon=True)
            self._thread.start()

    def _pick(self) -> list[_Row]:
        """The next batch: the first row in priority order, and the rows that may join it."""
        ordered = sorted(self._rows, key=_Row.key)
        head = ordered[0]
        size = head.model.settings.batch_size
        if head.isolated:
            mates = [r for r in ordered if r.group == head.group]
        else:
            mates = [r for r in ordered if r.model is head.model and not r.isolated]
        return mates[:size]

    def _gather(self) -> list[_Row] | None:
        """Wait for rows, hold the batch open while it can still grow, take it off the queue."""
        with self._cond:
            while not self._rows:
                if self._stopped:
                    return None
                self._cond.wait()
            started = time.monotonic()
            while True:
                batch = self._pick()
                size = batch[0].model.settings.batch_size
                # Under load (the last batch served several tasks) their clients are likely to
                # come back within the window: it opens when the model became free, so rows
                # that queued during the last inference do not leave alone.
                hot = self._last_tasks > 1
                if len(batch) >= size or batch[0].isolated or (self._preparing() <= 0 and not hot):
                    break
                opened = max(min(r.enqueued for r in batch), self._free_since)
                remaining = opened + self.window_s - time.monotonic()
                if remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining)
            self.stats.wait_s += time.monotonic() - started
            taken = {id(r) for r in batch}
            self._rows = [r for r in self._rows if id(r) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                break
            self._execute(batch)
        with self._cond:  # stopped: nothing will run the rows still queued
            left, self._rows = self._rows, []
        for row in left:
            row.result = BatcherStopped("the embedder is shutting down")
            row.done.set()

    def _execute(self, batch: list[_Row]) -> None:
        model = batch[0].model
        if self.on_batch is not None:
            self.on_batch(batch)
        try:
            outcomes: list[Embedded | BaseException] = list(
                model._run(np.stack([r.array for r in batch]))
            )
        except Exception as exc:
            if len(batch) == 1:
                outcomes = [exc]
            else:
                # Which row fails? Run each alone: the others still get their vectors.
                log.warning(
                    "a batch of %d rows failed (%r): running them one by one", len(batch), exc
                )
                self.stats.reruns += 1
                outcomes = [self._run_one(model, r) for r in batch]
        except BaseException as exc:  # e.g. an interrupt: fail the rows, keep the thread
            outcomes = [exc] * len(batch)
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.sizes[len(batch)] += 1
        log.debug(
            "batch of %d rows (%d query) for %s",
            len(batch),
            sum(r.priority == Priority.QUERY for r in batch),
            model.model_version,
        )
        with self._cond:
            self._last_tasks = len({r.group for r in batch})
            self._free_since = time.monotonic()
        for row, outcome in zip(batch, outcomes, strict=True):
            row.result = outcome
            row.done.set()

    @staticmethod
    def _run_one(model: Embedder, row: _Row) -> Embedded | BaseException:
        try:
            (one,) = model._run(row.array[np.newaxis])
            return one
        except Exception as exc:
            return exc


def batching_wanted(settings: EmbedderSettings) -> bool:
    """`batching`, with auto (None) resolved: on where the model runs on a GPU."""
    if settings.batching is not None:
        return settings.batching
    if settings.device == "cpu":
        return False
    if settings.device == "cuda":
        return True
    import torch  # only for device auto; a GPU found here means the threads pool: no fork

    return bool(torch.cuda.is_available())


def batching_active(settings: EmbedderSettings) -> bool:
    """Dynamic batching applies: it is wanted and the worker has one model process."""
    return settings.concurrency == 1 and batching_wanted(settings)


def worker_tasks(settings: EmbedderSettings) -> int:
    """Tasks in flight per batching worker (threads of its pool, and its prefetch)."""
    return settings.batch_tasks or 2 * settings.batch_size
