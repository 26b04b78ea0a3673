"""The STORE_EMBEDDINGS work as plain functions of an engine (testable without Celery)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from fashionrec_shared.tasks import Predicted, StoreEmbeddings
from fashionrec_shared.vectors import DTYPE, decode_vector
from sqlalchemy import Connection, Engine, Row

from fashionrec_indexer import repository as repo
from fashionrec_indexer.model_change import Plan, after_reembed_store

# A model change is not swapped in when more of the inventory than this failed to re-embed.
MAX_REEMBED_FAILED_FRACTION = 0.01

log = logging.getLogger("fashionrec.indexer.ingest")


@dataclass(frozen=True)
class StoreOutcome:
    indexed: int
    failed: int
    changed_since_build: int
    plan: Plan | None = None  # re-embed jobs: the tasks to send next


def store_embeddings(
    engine: Engine,
    payload: StoreEmbeddings,
    *,
    max_failed_fraction: float = MAX_REEMBED_FAILED_FRACTION,
) -> StoreOutcome:
    """Store vectors, mark items indexed/failed and finish their job entries; idempotent.

    Results of a re-embed job (model change) only store vectors and finish the job's entries:
    the items keep their status and stay searchable with the served version.
    """
    job_id = repo.parse_uuid(payload.job_id) if payload.job_id else None
    rows: dict[str, dict] = {}
    colours: dict[str, list[dict[str, Any]]] = {}  # image sha256 → its colours as JSON
    successes: list[tuple[uuid.UUID, str]] = []
    failures: list[tuple[uuid.UUID, str]] = []
    for embedding in payload.embeddings:
        item_id = repo.parse_uuid(embedding.item_id)
        if item_id is None:
            log.warning("store_embeddings: ignoring bad item id %r", embedding.item_id)
            continue
        try:
            vector = decode_vector(embedding.vector, payload.dim)
        except ValueError as exc:
            failures.append((item_id, f"invalid embedding: {exc}"))
            continue
        rows[embedding.image_sha256] = {
            "image_sha256": embedding.image_sha256,
            "model_version": payload.model_version,
            "dim": payload.dim,
            "vector": vector.astype(DTYPE).tobytes(),
            **prediction_columns(embedding.predicted),
        }
        if embedding.colours is not None:
            colours[embedding.image_sha256] = [c.model_dump(mode="json") for c in embedding.colours]
        successes.append((item_id, embedding.image_sha256))
    for failure in payload.failures:
        item_id = repo.parse_uuid(failure.item_id)
        if item_id is not None:
            failures.append((item_id, failure.error))

    indexed = failed = 0
    with engine.begin() as conn:
        job = repo.get_job(conn, job_id) if job_id is not None else None
        if job is not None and job.kind == repo.REEMBED:
            # Colours belong to the image, whatever the model: stored on the item at once.
            for item_id, sha in successes:
                if sha in colours:
                    repo.store_colours(conn, item_id, sha, colours[sha])
            plan = _store_reembed(
                conn, job, payload, rows, successes, failures, max_failed_fraction
            )
            return StoreOutcome(0, 0, 0, plan)
        repo.upsert_embeddings(conn, list(rows.values()))
        for item_id, sha in successes:
            # Only for the item's current image (the rule the embedding itself follows).
            current = repo.mark_indexed(conn, item_id, sha, colours.get(sha))
            indexed += current
            # The job asked for this image, so its entry is done even if the item was re-imaged
            # meanwhile; without a job id only entries of the current image are finished.
            if current or job_id is not None:
                repo.finish_job_item(conn, job_id, item_id, "done", None)
        for item_id, error in failures:
            failed += repo.mark_failed(conn, item_id, error)
            repo.finish_job_item(conn, job_id, item_id, "failed", error)
    return StoreOutcome(indexed, failed, changed_since_last_build(engine))


def prediction_columns(predicted: Predicted | None) -> dict[str, Any]:
    """The embeddings row's `predicted` (JSON) and `predicted_category` of a model's predictions."""
    if predicted is None:
        return {"predicted": None, "predicted_category": None}
    category = predicted.category.label if predicted.category is not None else None
    return {"predicted": predicted.model_dump(mode="json"), "predicted_category": category}


def _store_reembed(
    conn: Connection,
    job: Row,
    payload: StoreEmbeddings,
    rows: dict[str, dict],
    successes: list[tuple[uuid.UUID, str]],
    failures: list[tuple[uuid.UUID, str]],
    max_failed_fraction: float,
) -> Plan:
    # Serialised with other stores of the job and with MODEL_ONLINE, so exactly one store sees
    # the job complete.
    repo.lock_model_change(conn)
    repo.upsert_embeddings(conn, list(rows.values()))
    if payload.model_version != job.model_version:
        log.warning(
            "re-embed job %s wants %s, got vectors of %s: stored, entries left queued",
            job.id,
            job.model_version,
            payload.model_version,
        )
        return Plan("wrong model version", job_id=job.id)
    before = repo.queued_count(conn, job.id)
    for item_id, _sha in successes:
        repo.finish_job_item(conn, job.id, item_id, "done", None)
    for item_id, error in failures:
        repo.finish_job_item(conn, job.id, item_id, "failed", error)
    return after_reembed_store(conn, job, before, max_failed_fraction)


def give_up(engine: Engine, payload: StoreEmbeddings, reason: str) -> Plan | None:
    """Poison message: record every item of the payload as failed without processing it."""
    job_id = repo.parse_uuid(payload.job_id) if payload.job_id else None
    ids = [e.item_id for e in payload.embeddings] + [f.item_id for f in payload.failures]
    item_ids = [i for i in (repo.parse_uuid(raw) for raw in ids) if i is not None]
    with engine.begin() as conn:
        job = repo.get_job(conn, job_id) if job_id is not None else None
        if job is not None and job.kind == repo.REEMBED:
            # The items stay served by the old model; only the job learns of the failure.
            failures = [(item_id, reason) for item_id in item_ids]
            empty = payload.model_copy(update={"embeddings": [], "failures": []})
            return _store_reembed(conn, job, empty, {}, [], failures, MAX_REEMBED_FAILED_FRACTION)
        for item_id in item_ids:
            repo.mark_failed(conn, item_id, reason)
            repo.finish_job_item(conn, job_id, item_id, "failed", reason)
    return None


def changed_since_last_build(engine: Engine) -> int:
    with engine.connect() as conn:
        last = repo.latest_ready_manifest(conn)
        return repo.count_changed_since(conn, last.seen_change_seq if last else 0)
