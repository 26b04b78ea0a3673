"""Celery worker of the embedder (queue `embed`): the only process family that runs the model.

`create_worker_app(settings)` builds the Celery app (no module-level app, no settings read from
the environment after the fork); its tasks close over this process's `EmbedderResources`. Each
prefork child builds its `WorkerContext` (blob store, Redis client, models) in
`worker_process_init` (after the fork: torch thread pools and CUDA do not survive a fork), then
announces itself with a heartbeat key the gateway's /readyz counts. The task policy, the
poison-message guard included, is `fashionrec_shared.task_base.PolicyTask`.

Task bodies are plain functions (`embed_query`, `embed_queries`, `embed_items`) taking a
`WorkerContext`, so tests run them against real storage and Redis without a worker. Every result
carries the image's dominant colours (colours.py), computed once per decoded image.

Dynamic batching (batching.py; on by default with one model process per worker): the worker
runs Celery's threads pool with `batch_tasks` tasks in flight in the process that holds the
model; each task prepares its images in its own thread and hands them to the process's
`Batcher`, which gathers the images of concurrent tasks (queries first) into one model call.
Every task still goes through Celery's own tracer and `PolicyTask` (acks late, retries,
delivery counting); `BatchingEmbedderTask` adds the suspect rule for redelivered messages.
With batching off, or with several processes (`concurrency` > 1), the worker is prefork with
one task at a time per process.

Model changes: besides its primary model (`weights`) a process may hold the previous ones
(`previous_weights`). Queries are embedded with the version the live index serves when it is
loaded; items without a requested version are embedded with every loaded model, so they are
searchable before and after the indexer swaps to the new version. Once loaded, each process
announces its primary model to the indexer (MODEL_ONLINE), which starts the re-embedding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import numpy as np
import redis
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    task_received,
    task_rejected,
    task_revoked,
    worker_init,
    worker_shutdown,
)
from celery.worker.request import Request
from fashionrec_shared.celery_app import HARD_TIME_LIMIT, make_celery, send
from fashionrec_shared.keys import (
    DELIVERIES_TTL_S,
    EMBEDDER_ALIVE_TTL_S,
    deliveries_key,
    embedder_alive_key,
)
from fashionrec_shared.storage import (
    BlobNotFound,
    BlobStore,
    StorageUnavailable,
    make_blob_store,
    sha256_hex,
)
from fashionrec_shared.task_base import (
    PolicyTask,
    ProcessResources,
    poison_reason,
    policy_task,
)
from fashionrec_shared.tasks import (
    Colour,
    EmbedItem,
    EmbedItems,
    EmbedQueries,
    EmbedQueriesResult,
    EmbedQuery,
    EmbedQueryResult,
    ImageRef,
    ItemEmbedding,
    ItemFailure,
    ModelOnline,
    Queue,
    StoreEmbeddings,
    TaskName,
)
from fashionrec_shared.vectors import encode_vector
from PIL import Image

from fashionrec_embedder.batching import Batcher, Priority, batching_active, worker_tasks
from fashionrec_embedder.colours import dominant_colours, name_table
from fashionrec_embedder.model import Embedded, Embedder
from fashionrec_embedder.preprocess import decode_image
from fashionrec_embedder.settings import EmbedderSettings

log = logging.getLogger("fashionrec.embedder.worker")

# Only errors that a later attempt can fix are retried; bad input is reported, never retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StorageUnavailable,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
)
HEARTBEAT_INTERVAL_S = 10.0

# Infers one stacked batch of preprocessed images; per model (dynamic batching, batching.py).
RunBatch = Callable[[np.ndarray], list[Embedded]]
RunFor = Callable[[Embedder], RunBatch]


class EmbedderTask(PolicyTask):
    """The embedder's tasks: retried on storage and broker connection errors."""

    autoretry_for = TRANSIENT_ERRORS


# KEYS[1] the delivery counter, ARGV retries and TTL: deliveries counted before (net of retries)
# mean a redelivery (0 is returned, nothing counted); else the counter after counting this one.
_COUNT_FIRST_DELIVERY = """
local counted = tonumber(redis.call('GET', KEYS[1]) or '0')
if counted - tonumber(ARGV[1]) > 0 then return 0 end
counted = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return counted
"""


class BatchingEmbedderTask(EmbedderTask):
    """The embedder's tasks in a batching worker (threads pool; batching.py).

    A message delivered anew (its earlier delivery never finished: the worker died) is a
    suspect: it runs only while no other suspect of this process runs, in model batches of its
    own rows, and its delivery is counted once it runs. So the suspects waiting beside one that
    kills the worker again are not counted, and only the poison message reaches MAX_DELIVERIES.
    `create_worker_app` subclasses it per app with that app's `batcher`.
    """

    batcher: Batcher
    Request = "fashionrec_embedder.worker:BatchingRequest"

    def deliver(self, body: Any, raw: Any) -> Any:
        with self.batcher.task(self.request.id):
            try:
                return super().deliver(body, raw)
            finally:
                if self.request.is_eager:  # no message to acknowledge: give the turn back now
                    self.batcher.release_suspect()

    def count_delivery(self) -> int | None:
        """Count this delivery; a redelivered message is counted only once its suspect turn
        comes (the turn is given back when the message is acknowledged: BatchingRequest)."""
        request = self.request
        if request.called_directly or not request.id:
            return None
        retries = request.retries or 0
        # One atomic step: a first delivery is counted at once; a redelivery is not (yet), so
        # a suspect running now that kills the process cannot take this one's count with it.
        counted = self.deliveries_redis().eval(
            _COUNT_FIRST_DELIVERY, 1, deliveries_key(request.id), retries, DELIVERIES_TTL_S
        )
        if int(counted) > 0:
            return int(counted) - retries
        self.batcher.acquire_suspect(timeout=float(self.time_limit or HARD_TIME_LIMIT))
        request.fashionrec_suspect = True
        return super().count_delivery()

    def batched(self, priority: Priority) -> RunFor:
        """How this task's rows reach the model: through the batcher, in priority order."""
        isolated = bool(getattr(self.request, "fashionrec_suspect", False))
        deadline = time.monotonic() + self.soft_time_limit if self.soft_time_limit else None
        order = self.batcher.next_order()
        label = self.request.id or ""

        def run_for(model: Embedder) -> RunBatch:
            return self.batcher.runner(
                model,
                priority=priority,
                order=order,
                isolated=isolated,
                deadline=deadline,
                label=label,
            )

        return run_for


class BatchingRequest(Request):
    """A batching worker's task request: gives the suspect turn back once the message is
    acknowledged or rejected (the pool thread that ran the task does both)."""

    # The worker's event loop sends the acknowledgement soon after; wait for it (bounded).
    ACK_WAIT_S = 5.0

    def acknowledge(self) -> None:
        try:
            super().acknowledge()
        finally:
            self._release_when_done()

    def reject(self, requeue: bool = False) -> None:
        try:
            super().reject(requeue=requeue)
        finally:
            self._release_when_done()

    def _release_when_done(self) -> None:
        batcher = self.task.batcher
        if not batcher.holds_suspect_turn():
            return
        deadline = time.monotonic() + self.ACK_WAIT_S
        while not self._message.acknowledged and time.monotonic() < deadline:
            time.sleep(0.001)
        batcher.release_suspect()


class ImageMismatch(ValueError):
    """The stored bytes do not hash to the sha256 the message names."""


class VersionNotLoaded(RuntimeError):
    """EMBED_ITEMS asked for a model version this process does not hold (another one may)."""


# Model batches per pipelined call of EMBED_ITEMS: decoding overlaps inference inside a call, and
# the items of finished calls are kept when the task hits its time limit.
PIPELINE_BATCHES = 4

# A process without the requested version hands the task back this many times (another process,
# e.g. one already rolled out with the new model, picks it up) before reporting the items failed.
VERSION_RETRIES = 12
VERSION_RETRY_S = 5.0


def heartbeat_key(hostname: str | None = None, pid: int | None = None) -> str:
    return embedder_alive_key(hostname or socket.gethostname(), pid or os.getpid())


class Heartbeat:
    """Refreshes this process's alive key (TTL 30 s) every 10 s from a daemon thread."""

    def __init__(
        self,
        client: redis.Redis,
        info: dict[str, Any],
        *,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        ttl_s: int = EMBEDDER_ALIVE_TTL_S,
    ) -> None:
        self.client = client
        self.key = heartbeat_key()
        self.value = json.dumps(info)
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.client.set(self.key, self.value, ex=self.ttl_s)

    def _beat_logged(self) -> None:
        try:
            self.beat()
        except redis.RedisError as exc:  # keep trying: Redis may come back before the TTL
            log.warning("heartbeat %s failed: %s", self.key, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat_logged()

    def start(self) -> None:
        """Announce now (the process is ready), then refresh from a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._beat_logged()
            self._thread = threading.Thread(
                target=self._run, name="embedder-heartbeat", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        with contextlib.suppress(redis.RedisError):  # the TTL removes it anyway
            self.client.delete(self.key)


def default_threads(settings: EmbedderSettings) -> EmbedderSettings:
    """With several CPU worker processes, split the cores instead of oversubscribing them."""
    if settings.threads is not None or settings.concurrency <= 1:
        return settings
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return settings.model_copy(update={"threads": max(1, (cores or 1) // settings.concurrency)})


@dataclass
class WorkerContext:
    """Everything a task needs; one per worker process."""

    settings: EmbedderSettings
    store: BlobStore
    redis: redis.Redis
    model: Embedder  # the primary model
    previous: list[Embedder] = field(default_factory=list)  # kept loaded during a model change
    heartbeat: Heartbeat | None = field(default=None, repr=False)

    @classmethod
    def build(cls, settings: EmbedderSettings) -> WorkerContext:
        model = Embedder(settings)
        model.load()
        name_table()  # the colour names' lookup table, before the first image needs it
        return cls(
            settings=settings,
            store=make_blob_store(settings.storage),
            redis=redis.Redis.from_url(settings.broker.url),
            model=model,
            previous=load_previous(settings, model.model_version),
        )

    @property
    def models(self) -> dict[str, Embedder]:
        """Every loaded model by version, the primary first."""
        loaded = {self.model.model_version: self.model}
        for model in self.previous:
            loaded.setdefault(model.model_version, model)
        return loaded

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "model_versions": list(self.models)}

    def start_heartbeat(self) -> None:
        self.heartbeat = Heartbeat(self.redis, self.describe())
        self.heartbeat.start()

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.redis.close()


def load_previous(settings: EmbedderSettings, primary_version: str) -> list[Embedder]:
    """Load the `previous_weights` models; one that cannot be loaded is skipped, not fatal."""
    loaded: list[Embedder] = []
    seen = {primary_version}
    for spec in settings.previous_weights:
        try:
            model = Embedder(settings.model_copy(update={"weights": spec}))
            if model.model_version in seen:
                continue
            model.load()
        except Exception as exc:  # a bad previous model must not stop the primary from serving
            log.error("previous weights %r not loaded: %s", spec, exc)
            continue
        seen.add(model.model_version)
        loaded.append(model)
    return loaded


def announce_model(
    context: WorkerContext, app: Celery, sender: Callable[..., object] = send
) -> bool:
    """Send MODEL_ONLINE for the primary model with the worker's own app; the indexer starts a
    re-embed if it is new."""
    try:
        sender(
            app,
            TaskName.MODEL_ONLINE,
            ModelOnline(
                model_version=context.model.model_version,
                dim=context.model.dim,
                hostname=socket.gethostname(),
            ),
        )
        return True
    except Exception as exc:  # the next process start announces again; serving goes on
        log.warning("could not announce model %s: %s", context.model.model_version, exc)
        return False


class EmbedderResources(ProcessResources):
    """This process's WorkerContext, built after the fork; or one the caller built (tests)."""

    def __init__(self, settings: EmbedderSettings, context: WorkerContext | None = None) -> None:
        super().__init__()
        self.settings = default_threads(settings)
        self.context = context
        if context is not None:
            self.adopt()

    def open(self) -> None:
        started = time.perf_counter()
        context = WorkerContext.build(self.settings)
        context.start_heartbeat()
        if self.app is not None:
            announce_model(context, self.app)
        self.context = context
        log.info(
            "embedder process %d ready: model %s (dim %d, also loaded: %s) on %s, "
            "model load %.2fs, init %.2fs, heartbeat %s",
            os.getpid(),
            context.model.model_version,
            context.model.dim,
            ", ".join(m.model_version for m in context.previous) or "-",
            context.model.device,
            context.model.load_seconds or 0.0,
            time.perf_counter() - started,
            context.heartbeat.key if context.heartbeat else "-",
        )

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
            self.context = None

    def get(self) -> WorkerContext:
        self.ensure()
        assert self.context is not None
        return self.context


# ---- task bodies ----------------------------------------------------------------------------


def load_image(context: WorkerContext, ref: ImageRef) -> Image.Image:
    """Fetch and decode one stored image: the one path for query and inventory images."""
    data = context.store.get(ref.key)
    return decode_image_checked(context, ref, data)


def decode_image_checked(context: WorkerContext, ref: ImageRef, data: bytes) -> Image.Image:
    if sha256_hex(data) != ref.sha256:
        raise ImageMismatch(f"stored bytes of {ref.key} do not match sha256 {ref.sha256}")
    # A trained artifact fixes its own input size; decode large enough for every loaded model.
    draft = max(model.image_size for model in context.models.values())
    return decode_image(data, max_pixels=context.settings.max_image_pixels, draft_size=draft)


def _valid_vector(vector: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(vector))) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3


def _model_for(context: WorkerContext, version: str | None) -> Embedder:
    # The version the index serves if this process holds it, else the primary (the indexer
    # answers 409 naming its version and the gateway asks again).
    return context.models.get(version or "", context.model)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _query_result(
    model: Embedder,
    embedded: Embedded,
    colours: list[Colour],
    timings_ms: dict[str, float],
) -> EmbedQueryResult:
    vector = embedded.vector
    if not _valid_vector(vector):
        raise ValueError("the model produced a non-finite or zero embedding for this image")
    return EmbedQueryResult(
        vector=encode_vector(vector),
        dim=int(vector.shape[0]),
        model_version=model.model_version,
        predicted=embedded.predicted,
        colours=colours,
        timings_ms=timings_ms,
    )


def embed_query(
    context: WorkerContext,
    payload: EmbedQuery | dict[str, Any],
    *,
    run_for: RunFor | None = None,
) -> dict[str, Any]:
    """EMBED_QUERY: one stored query image → EmbedQueryResult (as a dict).

    `run_for(model)` infers the preprocessed image (dynamic batching); default: the model now."""
    request = EmbedQuery.model_validate(payload)
    model = _model_for(context, request.model_version)
    t0 = time.perf_counter()
    data = context.store.get(request.image.key)
    t1 = time.perf_counter()
    image = decode_image_checked(context, request.image, data)
    t2 = time.perf_counter()
    colours = dominant_colours(image)
    t3 = time.perf_counter()
    if run_for is None:
        embedded = model.embed_image(image)
    else:
        (embedded,) = model.embed_and_predict([lambda: image], catch=(), run=run_for(model))
        assert isinstance(embedded, Embedded)
    t4 = time.perf_counter()
    timings = {"fetch": _ms(t1 - t0), "decode": _ms(t2 - t1), "colours": _ms(t3 - t2)}
    timings["infer"] = _ms(t4 - t3)
    return _query_result(model, embedded, colours, timings).model_dump()


def embed_queries(
    context: WorkerContext,
    payload: EmbedQueries | dict[str, Any],
    *,
    run_for: RunFor | None = None,
) -> dict[str, Any]:
    """EMBED_QUERIES: several stored query photos → EmbedQueriesResult (as a dict), in order.

    One model call for all of them (up to the model's batch size), all with one model version
    (chosen as for EMBED_QUERY). The photos are fetched and decoded on the model's decode
    threads; a photo that is missing, undecodable or not the named bytes fails the task with
    the error EMBED_QUERY raises for it. Each result's `infer` is the model call they shared
    (from the last photo being ready until the vectors are back)."""
    request = EmbedQueries.model_validate(payload)
    model = _model_for(context, request.model_version)
    n = len(request.images)
    colours: list[list[Colour]] = [[] for _ in range(n)]
    timings: list[dict[str, float]] = [{} for _ in range(n)]
    ready = [0.0] * n

    def load(i: int) -> Image.Image:
        ref = request.images[i]
        t0 = time.perf_counter()
        data = context.store.get(ref.key)
        t1 = time.perf_counter()
        image = decode_image_checked(context, ref, data)
        t2 = time.perf_counter()
        colours[i] = dominant_colours(image)
        ready[i] = time.perf_counter()
        timings[i] = {"fetch": _ms(t1 - t0), "decode": _ms(t2 - t1), "colours": _ms(ready[i] - t2)}
        return image

    outcomes = model.embed_and_predict(
        [functools.partial(load, i) for i in range(n)],
        catch=(),
        run=run_for(model) if run_for is not None else None,
    )
    done = time.perf_counter()
    infer = _ms(done - max(ready))
    results = []
    for i, embedded in enumerate(outcomes):
        assert isinstance(embedded, Embedded)
        results.append(_query_result(model, embedded, colours[i], {**timings[i], "infer": infer}))
    return EmbedQueriesResult(results=results).model_dump()


def _failure(item: EmbedItem, error: str) -> ItemFailure:
    return ItemFailure(item_id=item.item_id, error=error)


def _targets(context: WorkerContext, version: str | None) -> list[Embedder]:
    if version is None:
        return list(context.models.values())
    model = context.models.get(version)
    return [model] if model is not None else []


def fail_items(
    context: WorkerContext,
    request: EmbedItems,
    reason: str,
    *,
    store_results: Callable[[StoreEmbeddings], object],
    poison: bool = False,
) -> dict[str, Any]:
    """Report every item of `request` failed with `reason`, under the first version it names."""
    targets = _targets(context, request.model_version)
    version = targets[0].model_version if targets else str(request.model_version)
    if request.items:
        store_results(
            StoreEmbeddings(
                job_id=request.job_id,
                model_version=version,
                dim=targets[0].dim if targets else context.model.dim,
                failures=[_failure(item, reason) for item in request.items],
            )
        )
    return {
        "job_id": request.job_id,
        "model_version": version,
        "embedded": 0,
        "failed": len(request.items),
        "poison": poison,
        "model_versions": [version],
    }


def embed_items(
    context: WorkerContext,
    payload: EmbedItems | dict[str, Any],
    *,
    store_results: Callable[[StoreEmbeddings], object],
    final: bool = True,
    run_for: RunFor | None = None,
) -> dict[str, Any]:
    """EMBED_ITEMS: embed inventory images in batches, then hand results to the indexer.

    With `model_version` only that loaded model embeds (re-embed jobs); without, every loaded
    model does, and one STORE_EMBEDDINGS goes out per version. Per-item problems (missing blob,
    undecodable image) become ItemFailure; transient storage or broker errors propagate so
    Celery retries the whole (idempotent) task. A requested version this process does not hold
    raises VersionNotLoaded (another process may hold it) unless `final`: then the items fail.
    `run_for(model)` infers each batch (dynamic batching); default: the model itself.
    """
    request = EmbedItems.model_validate(payload)
    items = request.items
    targets = _targets(context, request.model_version)
    if not targets:
        loaded = ", ".join(context.models)
        if not final:
            raise VersionNotLoaded(f"model {request.model_version} is not loaded here ({loaded})")
        reason = f"model {request.model_version} is not loaded by any embedder (loaded: {loaded})"
        return fail_items(context, request, reason, store_results=store_results)
    # version -> (embeddings, failures)
    results: dict[str, tuple[list[ItemEmbedding], list[ItemFailure]]] = {
        m.model_version: ([], []) for m in targets
    }
    summary: dict[str, Any] = {"job_id": request.job_id, "model_version": targets[0].model_version}
    # Item position -> its colours, computed by the first model's pass over the decoded image.
    colours: dict[int, list[Colour]] = {}

    def load(position: int) -> Image.Image:
        image = load_image(context, items[position].image)
        if position not in colours:
            colours[position] = dominant_colours(image)
        return image

    started = time.perf_counter()
    try:
        window = context.settings.batch_size * PIPELINE_BATCHES
        for start, model in ((s, m) for s in range(0, len(items), window) for m in targets):
            embeddings, failures = results[model.model_version]
            chunk = items[start : start + window]
            # The model's pipeline fetches and decodes the next batch on its decode threads
            # while the current one is inferred.
            sources = [functools.partial(load, start + j) for j in range(len(chunk))]
            outcomes = model.embed_and_predict(
                sources,
                catch=(BlobNotFound, ValueError),
                run=run_for(model) if run_for is not None else None,
            )
            for j, (item, outcome) in enumerate(zip(chunk, outcomes, strict=True)):
                if isinstance(outcome, BlobNotFound):
                    failures.append(_failure(item, f"image not found in storage: {item.image.key}"))
                elif isinstance(outcome, BaseException):  # ImageDecodeError, ImageMismatch
                    failures.append(_failure(item, str(outcome)))
                elif _valid_vector(outcome.vector):
                    embeddings.append(
                        ItemEmbedding(
                            item_id=item.item_id,
                            image_sha256=item.image.sha256,
                            vector=encode_vector(outcome.vector),
                            predicted=outcome.predicted,
                            colours=colours.get(start + j),
                        )
                    )
                else:
                    failures.append(_failure(item, "the model produced a non-finite embedding"))
    except SoftTimeLimitExceeded:
        log.warning("soft time limit hit: reporting the items not embedded yet as failed")
        for embeddings, failures in results.values():
            reported = {e.item_id for e in (*embeddings, *failures)}
            failures.extend(
                _failure(item, "embedding timed out (task time limit); upload the item again")
                for item in items
                if item.item_id not in reported
            )
    summary["seconds"] = round(time.perf_counter() - started, 3)

    if items:
        for model in targets:
            embeddings, failures = results[model.model_version]
            store_results(
                StoreEmbeddings(
                    job_id=request.job_id,
                    model_version=model.model_version,
                    dim=model.dim,
                    embeddings=embeddings,
                    failures=failures,
                )
            )
    first_embeddings, first_failures = results[targets[0].model_version]
    summary.update(
        embedded=len(first_embeddings),
        failed=len(first_failures),
        poison=False,
        model_versions=list(results),
    )
    return summary


# ---- Celery app -----------------------------------------------------------------------------


class BatchingWorker:
    """What a batching worker adds to its app: the batcher, and resources opened in the worker
    process itself (the threads pool forks no children, so worker_process_init never comes)."""

    def __init__(self, app: Celery, resources: EmbedderResources, batcher: Batcher) -> None:
        self.app, self.resources, self.batcher = app, resources, batcher
        # Weak references (the default): the handlers live as long as this object, which the
        # app holds.
        worker_init.connect(self._worker_init)
        worker_shutdown.connect(self._worker_shutdown)
        task_received.connect(self._received)
        task_revoked.connect(self._dropped)
        task_rejected.connect(self._dropped_message)

    def _ours(self, request: Any) -> bool:
        task = getattr(request, "task", None)
        return getattr(task, "app", None) is self.app and getattr(task, "batcher", None) is not None

    def _received(self, request: Any = None, **_: Any) -> None:
        # Received by the consumer; its pool thread may start a little later. Tasks due later
        # (a retry's countdown) are not expected now.
        if request is not None and self._ours(request) and not request.eta:
            self.batcher.expect(request.id)

    def _dropped(self, request: Any = None, **_: Any) -> None:
        if request is not None and self._ours(request):
            self.batcher.forget(request.id)

    def _dropped_message(self, message: Any = None, **_: Any) -> None:
        task_id = getattr(message, "headers", {}).get("id") if message is not None else None
        if task_id:
            self.batcher.forget(task_id)

    def _mine(self, sender: Any) -> bool:
        if getattr(sender, "app", None) is not self.app:
            return False
        pool = getattr(sender, "pool_cls", "")
        name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__qualname__}"
        return "thread" in name.lower()

    def _worker_init(self, sender: Any = None, **_: Any) -> None:
        if self._mine(sender):
            # Load the model before consuming: the first task must not wait for it, and the
            # heartbeat (what /readyz counts) means "ready".
            self.resources.ensure()

    def _worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if self._mine(sender):
            self.batcher.stop()
            log.info("batching: %s", json.dumps(self.batcher.stats.snapshot()))
            self.resources.release()


def worker_argv(settings: EmbedderSettings, loglevel: str) -> list[str]:
    """Celery worker arguments: the threads pool of a batching worker, else prefork."""
    if batching_active(settings):
        pool, concurrency = "threads", worker_tasks(settings)
    else:
        pool, concurrency = "prefork", settings.concurrency
    return [
        "worker",
        "-Q",
        Queue.EMBED.value,
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "-n",
        "embedder@%h",
        "--loglevel",
        loglevel.upper(),
    ]


def create_worker_app(
    settings: EmbedderSettings, *, resources: EmbedderResources | None = None
) -> Celery:
    """The embedder's Celery app with its tasks registered (sent by name from other services).

    The tasks close over `resources` (default: built in each worker process from `settings`,
    which the parent passes to its children by forking, never through the environment). With
    batching (`batching_active`) they hand their images to one `Batcher` per app."""
    app = make_celery("fashionrec_embedder", settings.broker)
    resources = resources or EmbedderResources(settings)
    resources.serve(app)
    base: type[EmbedderTask] = EmbedderTask
    batcher: Batcher | None = None
    if batching_active(settings):
        batcher = Batcher(window_s=settings.batch_window_ms / 1000, bulk_tasks=settings.bulk_tasks)
        base = type("AppBatchingEmbedderTask", (BatchingEmbedderTask,), {"batcher": batcher})
        app.fashionrec_batching = BatchingWorker(app, resources, batcher)  # type: ignore[attr-defined]

    def store_results(result: StoreEmbeddings) -> None:
        send(app, TaskName.STORE_EMBEDDINGS, result)

    def give_up_items(task: Task, request: EmbedItems, deliveries: int) -> dict[str, Any]:
        reason = poison_reason(deliveries)
        log.error("%s: reporting %d items failed", reason, len(request.items))
        return fail_items(
            resources.get(), request, reason, store_results=store_results, poison=True
        )

    @policy_task(app, TaskName.EMBED_QUERY, base=base, payload=EmbedQuery)
    def embed_query_task(task: Task, request: EmbedQuery) -> dict[str, Any]:
        if batcher is None:
            return embed_query(resources.get(), request)
        return embed_query(resources.get(), request, run_for=task.batched(Priority.QUERY))

    @policy_task(app, TaskName.EMBED_QUERIES, base=base, payload=EmbedQueries)
    def embed_queries_task(task: Task, request: EmbedQueries) -> dict[str, Any]:
        if batcher is None:
            return embed_queries(resources.get(), request)
        return embed_queries(resources.get(), request, run_for=task.batched(Priority.QUERY))

    @policy_task(app, TaskName.EMBED_ITEMS, base=base, payload=EmbedItems, on_poison=give_up_items)
    def embed_items_task(task: Task, request: EmbedItems) -> dict[str, Any]:
        retries = task.request.retries or 0
        bulk = (
            batcher.bulk_slot()
            if batcher is not None and len(request.items) > 1
            else contextlib.nullcontext()
        )
        try:
            with bulk:
                return embed_items(
                    resources.get(),
                    request,
                    store_results=store_results,
                    final=retries >= VERSION_RETRIES,
                    run_for=task.batched(Priority.ITEMS) if batcher is not None else None,
                )
        except VersionNotLoaded as exc:
            # Back on the queue for a process that holds the version (a rolling deploy).
            raise task.retry(
                exc=exc, countdown=VERSION_RETRY_S, max_retries=VERSION_RETRIES
            ) from exc

    return app
