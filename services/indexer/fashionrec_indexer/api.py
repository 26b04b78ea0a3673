"""Indexer HTTP API (internal; the gateway is its client). Errors are problem+json."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from celery import Celery
from fashionrec_shared.celery_app import make_celery, send
from fashionrec_shared.problems import ProblemError, install_problem_handlers, problem_response
from fashionrec_shared.schemas import (
    MAX_K,
    IndexerHit,
    IndexerItem,
    IndexerSearchResponse,
    IndexInfo,
    JobCreate,
    JobOut,
    RebuildAccepted,
    SearchFilters,
    UpsertItem,
    UpsertItemResult,
    UpsertItems,
    UpsertItemsResult,
    VectorQuery,
)
from fashionrec_shared.storage import make_blob_store
from fashionrec_shared.tasks import BuildIndex, EmbedItem, EmbedItems, ImageRef, Predicted, TaskName
from fashionrec_shared.vectors import decode_vector
from fastapi import Depends, FastAPI, Query, Request, Response
from kombu.exceptions import OperationalError as KombuOperationalError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from fashionrec_indexer import repository as repo
from fashionrec_indexer.db import make_engine
from fashionrec_indexer.index_state import DeltaView, IndexState, Snapshot
from fashionrec_indexer.metrics import Metrics, make_metrics
from fashionrec_indexer.search import search, searchable_count
from fashionrec_indexer.settings import IndexerSettings

log = logging.getLogger("fashionrec.indexer.api")

# Items per EMBED_ITEMS task of a bulk upsert: the embedder runs them in model batches while it
# fetches and decodes the next ones; small enough that a time limit or a crash costs little.
EMBED_TASK_ITEMS = 32


# ---- dependencies ----------------------------------------------------------------------------


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _state(request: Request) -> IndexState:
    return request.app.state.index_state


def _celery(request: Request) -> Celery:
    return request.app.state.celery


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _settings(request: Request) -> IndexerSettings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(_engine)]
StateDep = Annotated[IndexState, Depends(_state)]
CeleryDep = Annotated[Celery, Depends(_celery)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
SettingsDep = Annotated[IndexerSettings, Depends(_settings)]


def _snapshot(state: IndexState) -> Snapshot:
    snapshot = state.current
    if snapshot is None:
        raise ProblemError(503, "Service Unavailable", "the index is still loading; retry shortly")
    return snapshot


def _item_uuid(item_id: str) -> uuid.UUID:
    parsed = repo.parse_uuid(item_id)
    if parsed is None:
        raise ProblemError(404, "Not Found", f"no item {item_id!r}")
    return parsed


def _send(celery: Celery, task: TaskName, payload: Any) -> str:
    try:
        return send(celery, task, payload).id
    except (KombuOperationalError, RedisConnectionError, OSError) as exc:
        log.warning("broker unavailable sending %s: %s", task, exc)
        raise ProblemError(503, "Service Unavailable", "the task broker is unavailable") from exc


def _predicted(raw: Any) -> Predicted | None:
    """Stored predictions (JSONB) as the contract's model; unreadable ones count as none."""
    if raw is None:
        return None
    try:
        return Predicted.model_validate(raw)
    except ValidationError:
        log.warning("ignoring unreadable stored predictions: %.200r", raw)
        return None


def _item_out(row: Any) -> IndexerItem:
    return IndexerItem(
        item_id=str(row.id),
        sku=row.sku,
        title=row.title,
        category=row.category,
        price=row.price,
        attributes=row.attributes or {},
        status=row.status,
        error=row.error,
        image=ImageRef(key=row.image_key, sha256=row.image_sha256),
        model_version=row.model_version,
        predicted=_predicted(row.predicted),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


# ---- search ----------------------------------------------------------------------------------


def _active(snapshot: Snapshot, view: DeltaView) -> tuple[str | None, int | None]:
    if snapshot.build is not None:
        return snapshot.build_model_version, snapshot.build.dim
    return view.model_version, view.dim


def _run_search(
    engine: Engine,
    metrics: Metrics,
    settings: IndexerSettings,
    endpoint: str,
    snapshot: Snapshot,
    view: DeltaView,
    query: np.ndarray,
    k: int,
    filters: SearchFilters,
    model_version: str,
    exclude: tuple[uuid.UUID, ...] = (),
    timings: dict[str, float] | None = None,
) -> IndexerSearchResponse:
    started = time.perf_counter()
    hits, stats = search(
        snapshot.build,
        view,
        query,
        k,
        filters,
        exclude=exclude,
        search_k=settings.search_k,
        candidates=settings.ann_candidates,
    )
    if stats.fallback:
        metrics.search_fallbacks.inc()
    searched = time.perf_counter()
    metrics.search_latency.labels(endpoint, "ann").observe(searched - started)
    with engine.connect() as conn:
        rows = repo.hits_metadata(conn, [item_id for item_id, _ in hits], model_version)
    finished = time.perf_counter()
    metrics.search_latency.labels(endpoint, "metadata").observe(finished - searched)
    if timings is not None:
        timings.update(ann=searched - started, metadata=finished - searched)
    results = [
        IndexerHit(
            item_id=str(item_id),
            sku=rows[item_id].sku,
            title=rows[item_id].title,
            category=rows[item_id].category,
            price=rows[item_id].price,
            score=score,
            image=ImageRef(key=rows[item_id].image_key, sha256=rows[item_id].image_sha256),
            predicted=_predicted(rows[item_id].predicted),
        )
        for item_id, score in hits
        if item_id in rows  # deleted between the delta probe and now
    ]
    return IndexerSearchResponse(
        results=results, model_version=model_version, index_version=snapshot.index_version
    )


def server_timing(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={value * 1000:.2f}" for name, value in seconds.items())


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise ProblemError(422, "Unprocessable Content", "vector has zero or infinite length")
    return (vector / norm).astype(np.float32)


# ---- items ------------------------------------------------------------------------------------


def _upsert_many(
    engine: Engine, celery: Celery, bodies: list[UpsertItem], job_id: str | None
) -> tuple[str, list[UpsertItemResult]]:
    """Upsert items in one transaction, then send EMBED_ITEMS for those not embedded yet."""
    job_uuid = None
    if job_id is not None:
        job_uuid = repo.parse_uuid(job_id)
        if job_uuid is None:
            raise ProblemError(404, "Not Found", f"no job {job_id!r}")
    results: list[UpsertItemResult] = []
    to_embed: list[EmbedItem] = []
    with engine.begin() as conn:
        if job_uuid is not None and not repo.job_exists(conn, job_uuid):
            raise ProblemError(404, "Not Found", f"no job {job_id!r}")
        if job_uuid is None:
            job_uuid = repo.create_job(conn, "item")
        model_version = repo.active_model_version(conn)
        # During a model change the item needs a vector of the coming version too.
        reembed = repo.open_reembed_job(conn)
        pending = reembed.model_version if reembed is not None else None
        for body in bodies:
            upserted = repo.upsert_item(conn, body.metadata, body.image, model_version, pending)
            indexed = upserted.status == "indexed"
            repo.add_job_item(conn, job_uuid, upserted.item_id, "done" if indexed else "queued")
            if not indexed:
                to_embed.append(EmbedItem(item_id=str(upserted.item_id), image=body.image))
            results.append(
                UpsertItemResult(
                    item_id=str(upserted.item_id),
                    job_id=str(job_uuid),
                    created=upserted.created,
                    embed_queued=not indexed,
                )
            )
    for start in range(0, len(to_embed), EMBED_TASK_ITEMS):
        payload = EmbedItems(job_id=str(job_uuid), items=to_embed[start : start + EMBED_TASK_ITEMS])
        _send(celery, TaskName.EMBED_ITEMS, payload)
    return str(job_uuid), results


# ---- app -------------------------------------------------------------------------------------


def create_app(settings: IndexerSettings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or IndexerSettings()  # type: ignore[call-arg]
        engine = make_engine(resolved.database_url)
        state = IndexState(
            engine, make_blob_store(resolved.storage), resolved.index_dir, resolved.settle_s
        )
        app.state.settings = resolved
        app.state.engine = engine
        app.state.celery = make_celery("fashionrec-indexer-api", resolved.broker)
        app.state.index_state = state
        app.state.metrics = make_metrics()
        state.start(resolved.refresh_interval_s)
        try:
            yield
        finally:
            state.stop()
            engine.dispose()

    app = FastAPI(title="fashionrec indexer", version="0.1.0", lifespan=lifespan)
    install_problem_handlers(app)

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> Response:
        log.warning("database unavailable on %s: %s", request.url.path, exc)
        return problem_response(503, "Service Unavailable", "database unavailable", request)

    @app.get("/livez")
    def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(engine: EngineDep, state: StateDep) -> dict[str, Any]:
        snapshot = state.current
        if snapshot is None:
            raise ProblemError(503, "Service Unavailable", "index state not initialised yet")
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                view = snapshot.delta.refresh(conn)
        except OperationalError as exc:
            raise ProblemError(503, "Service Unavailable", "database unavailable") from exc
        model_version, _ = _active(snapshot, view)
        return {
            "status": "ready",
            "model_version": model_version,
            "index_version": snapshot.index_version,
            "items": searchable_count(snapshot.build, view),
        }

    @app.get("/metrics")
    def metrics_endpoint(metrics: MetricsDep, state: StateDep) -> Response:
        snapshot = state.current
        if snapshot is not None:
            metrics.items_in_index.set(snapshot.build.size if snapshot.build else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/items", response_model=UpsertItemResult)
    def upsert_item(body: UpsertItem, engine: EngineDep, celery: CeleryDep) -> UpsertItemResult:
        _, [result] = _upsert_many(engine, celery, [body], body.job_id)
        return result

    @app.post("/items/batch", response_model=UpsertItemsResult)
    def upsert_items(body: UpsertItems, engine: EngineDep, celery: CeleryDep) -> UpsertItemsResult:
        """Many items in one transaction and one job; EMBED_ITEMS of up to 32 images each."""
        seen: dict[str, int] = {}
        for n, item in enumerate(body.items):
            first = seen.setdefault(item.metadata.sku, n)
            if first != n:
                raise ProblemError(
                    422,
                    "Unprocessable Content",
                    f"items[{n}]: sku {item.metadata.sku!r} already in this batch (items[{first}])",
                )
        job_id, results = _upsert_many(engine, celery, body.items, body.job_id)
        queued = sum(r.embed_queued for r in results)
        tasks = -(-queued // EMBED_TASK_ITEMS)
        return UpsertItemsResult(job_id=job_id, results=results, embed_tasks=tasks)

    @app.get("/items/{item_id}", response_model=IndexerItem)
    def get_item(item_id: str, engine: EngineDep) -> IndexerItem:
        with engine.connect() as conn:
            # Predictions of the version searches are served with, as filters see them.
            row = repo.get_item(conn, _item_uuid(item_id), repo.active_model_version(conn))
        if row is None:
            raise ProblemError(404, "Not Found", f"no item {item_id!r}")
        return _item_out(row)

    @app.delete("/items/{item_id}", status_code=204)
    def delete_item(item_id: str, engine: EngineDep) -> Response:
        with engine.begin() as conn:
            deleted = repo.delete_item(conn, _item_uuid(item_id))
        if not deleted:
            raise ProblemError(404, "Not Found", f"no item {item_id!r}")
        return Response(status_code=204)

    @app.post("/search", response_model=IndexerSearchResponse)
    def search_vector(
        body: VectorQuery,
        response: Response,
        engine: EngineDep,
        state: StateDep,
        metrics: MetricsDep,
        settings: SettingsDep,
    ) -> IndexerSearchResponse:
        started = time.perf_counter()
        try:
            vector = decode_vector(body.vector)
        except ValueError as exc:
            raise ProblemError(422, "Unprocessable Content", str(exc)) from exc
        snapshot = _snapshot(state)
        with engine.connect() as conn:
            view = snapshot.delta.refresh(conn)
        probed = time.perf_counter()
        metrics.search_latency.labels("search", "delta").observe(probed - started)
        timings = {"delta": probed - started}
        if searchable_count(snapshot.build, view) == 0:
            return IndexerSearchResponse(
                results=[], model_version=body.model_version, index_version=snapshot.index_version
            )
        model_version, dim = _active(snapshot, view)
        if body.model_version != model_version:
            raise ProblemError(
                409,
                "Conflict",
                f"query embedded with model {body.model_version!r}, index uses {model_version!r}",
                model_version=model_version,
            )
        if vector.shape[0] != dim:
            raise ProblemError(
                422,
                "Unprocessable Content",
                f"vector has {vector.shape[0]} dimensions, expected {dim}",
            )
        found = _run_search(
            engine,
            metrics,
            settings,
            "search",
            snapshot,
            view,
            _normalise(vector),
            body.k,
            body.filters,
            model_version,
            timings=timings,
        )
        metrics.search_latency.labels("search", "total").observe(time.perf_counter() - started)
        # The gateway passes these on in its own Server-Timing header.
        response.headers["Server-Timing"] = server_timing(timings)
        return found

    @app.get("/items/{item_id}/similar", response_model=IndexerSearchResponse)
    def similar(
        item_id: str,
        engine: EngineDep,
        state: StateDep,
        metrics: MetricsDep,
        settings: SettingsDep,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 5,
        category: str | None = None,
        min_price: Annotated[float | None, Query(ge=0)] = None,
        max_price: Annotated[float | None, Query(ge=0)] = None,
        predicted_category: str | None = None,
    ) -> IndexerSearchResponse:
        started = time.perf_counter()
        item_uuid = _item_uuid(item_id)
        snapshot = _snapshot(state)
        with engine.connect() as conn:
            view = snapshot.delta.refresh(conn)
            if repo.get_item(conn, item_uuid) is None:
                raise ProblemError(404, "Not Found", f"no item {item_id!r}")
            model_version, dim = _active(snapshot, view)
            row = repo.item_vector(conn, item_uuid, model_version)
        if row is None or row.dim != dim:
            raise ProblemError(
                409, "Conflict", f"item {item_id} has no embedding for the active model yet"
            )
        vector = _normalise(np.frombuffer(row.vector, dtype="<f4").astype(np.float32))
        filters = SearchFilters(
            category=category,
            min_price=min_price,
            max_price=max_price,
            predicted_category=predicted_category,
        )
        assert model_version is not None
        response = _run_search(
            engine,
            metrics,
            settings,
            "similar",
            snapshot,
            view,
            vector,
            k,
            filters,
            model_version,
            exclude=(item_uuid,),
        )
        metrics.search_latency.labels("similar", "total").observe(time.perf_counter() - started)
        return response

    @app.post("/jobs", response_model=JobOut, status_code=201)
    def create_job(body: JobCreate, engine: EngineDep) -> JobOut:
        with engine.begin() as conn:
            job_id = repo.create_job(conn, body.kind)
            summary = repo.job_summary(conn, job_id)
        return JobOut.model_validate(summary)

    @app.get("/jobs/{job_id}", response_model=JobOut)
    def get_job(job_id: str, engine: EngineDep) -> JobOut:
        job_uuid = repo.parse_uuid(job_id)
        summary = None
        if job_uuid is not None:
            with engine.connect() as conn:
                summary = repo.job_summary(conn, job_uuid)
        if summary is None:
            raise ProblemError(404, "Not Found", f"no job {job_id!r}")
        return JobOut.model_validate(summary)

    @app.post("/index/rebuild", response_model=RebuildAccepted, status_code=202)
    def rebuild(celery: CeleryDep) -> RebuildAccepted:
        task_id = _send(celery, TaskName.BUILD_INDEX, BuildIndex(reason="api", force=True))
        return RebuildAccepted(task_id=task_id)

    @app.get("/index", response_model=IndexInfo)
    def index_info(engine: EngineDep, state: StateDep) -> IndexInfo:
        snapshot = _snapshot(state)
        with engine.connect() as conn:
            view = snapshot.delta.refresh(conn)
            since = 0
            if snapshot.build is not None:
                since = int(snapshot.build.manifest.get("seen_change_seq", 0))
            changed = repo.count_changed_since(conn, since)
            model_version, _ = _active(snapshot, view)
            # A model change is pending from its job's start until its build is swapped in
            # (a later return to an older model has no job and does not count as pending).
            reembed = repo.latest_reembed_job(conn)
            pending = (
                reembed is not None
                and reembed.model_version != model_version
                and not repo.ready_build_since(conn, reembed.model_version, reembed.created_at)
            )
        return IndexInfo(
            index_version=snapshot.index_version,
            model_version=model_version,
            items_in_index=snapshot.build.size if snapshot.build else 0,
            items_since_build=changed,
            built_at=snapshot.build.manifest.get("created_at") if snapshot.build else None,
            pending_model_version=reembed.model_version if pending and reembed else None,
            reembed_job_id=str(reembed.id) if pending and reembed else None,
        )

    return app
