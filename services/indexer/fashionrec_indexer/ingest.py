"""The STORE_EMBEDDINGS work as plain functions of an engine (testable without Celery)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from fashionrec_shared.tasks import StoreEmbeddings
from fashionrec_shared.vectors import DTYPE, decode_vector
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo

log = logging.getLogger("fashionrec.indexer.ingest")


@dataclass(frozen=True)
class StoreOutcome:
    indexed: int
    failed: int
    changed_since_build: int


def store_embeddings(engine: Engine, payload: StoreEmbeddings) -> StoreOutcome:
    """Store vectors, mark items indexed/failed and finish their job entries; idempotent."""
    job_id = repo.parse_uuid(payload.job_id) if payload.job_id else None
    rows: dict[str, dict] = {}
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
        }
        successes.append((item_id, embedding.image_sha256))
    for failure in payload.failures:
        item_id = repo.parse_uuid(failure.item_id)
        if item_id is not None:
            failures.append((item_id, failure.error))

    indexed = failed = 0
    with engine.begin() as conn:
        repo.upsert_embeddings(conn, list(rows.values()))
        for item_id, sha in successes:
            current = repo.mark_indexed(conn, item_id, sha)
            indexed += current
            # The job asked for this image, so its entry is done even if the item was re-imaged
            # meanwhile; without a job id only entries of the current image are finished.
            if current or job_id is not None:
                repo.finish_job_item(conn, job_id, item_id, "done", None)
        for item_id, error in failures:
            failed += repo.mark_failed(conn, item_id, error)
            repo.finish_job_item(conn, job_id, item_id, "failed", error)
    return StoreOutcome(indexed, failed, changed_since_last_build(engine))


def give_up(engine: Engine, payload: StoreEmbeddings, reason: str) -> None:
    """Poison message: record every item of the payload as failed without processing it."""
    job_id = repo.parse_uuid(payload.job_id) if payload.job_id else None
    ids = [e.item_id for e in payload.embeddings] + [f.item_id for f in payload.failures]
    with engine.begin() as conn:
        for raw in ids:
            item_id = repo.parse_uuid(raw)
            if item_id is not None:
                repo.mark_failed(conn, item_id, reason)
                repo.finish_job_item(conn, job_id, item_id, "failed", reason)


def changed_since_last_build(engine: Engine) -> int:
    with engine.connect() as conn:
        last = repo.latest_ready_build(conn)
        since = int((last.manifest or {}).get("seen_change_seq", 0)) if last else 0
        return repo.count_changed_since(conn, since)
