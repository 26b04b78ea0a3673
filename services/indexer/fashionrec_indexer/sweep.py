"""The pending sweep: no accepted item stays pending for ever.

An item is pending from its upsert until the embedder's STORE_EMBEDDINGS arrives. Its EMBED_ITEMS
can be lost: the broker flushed, or restarted without its append-only file; a worker killed
between taking the message and storing the result; a send that failed after the commit. The
indexer worker's beat runs this sweep: an item pending for longer than the timeout (since its
upsert or its last re-queue) gets the EMBED_ITEMS the upsert sent, once per job it is queued
in (so each job finishes), at most `max_requeues` times; then it ends failed with a reason, and
so do its job entries. Re-sending is safe: storing is idempotent, so a task that was only slow
costs one more embedding, not a wrong state.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from fashionrec_shared.tasks import EmbedItem, EmbedItems, ImageRef
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.upserts import EMBED_TASK_ITEMS

log = logging.getLogger("fashionrec.indexer.sweep")

SWEEP_LIMIT = 1000  # items per sweep: one bounded transaction; the next sweep takes the rest


@dataclass(frozen=True)
class SweepPlan:
    """What one sweep decided; `embed` is to be sent once its transaction has committed."""

    embed: list[EmbedItems]
    requeued: int
    failed: int


def give_up_reason(requeues: int, timeout_s: float) -> str:
    return (
        f"not embedded after {requeues} re-queues (pending longer than {timeout_s:g}s each "
        "time): its embed tasks were lost, or no embedder could process the image"
    )


def sweep_pending(
    engine: Engine, *, timeout_s: float, max_requeues: int, limit: int = SWEEP_LIMIT
) -> SweepPlan:
    """Re-queue or fail the items pending for longer than `timeout_s`, in one transaction."""
    by_job: dict[str | None, list[EmbedItem]] = {}
    requeued: list[uuid.UUID] = []
    failed = 0
    with engine.begin() as conn:
        stale = repo.lock_stale_pending(conn, timeout_s, limit)
        entries = repo.queued_entries(conn, [row.id for row in stale])
        for row in stale:
            jobs = entries.get(row.id, [])
            if row.requeues >= max_requeues:
                reason = give_up_reason(row.requeues, timeout_s)
                failed += repo.mark_failed(conn, row.id, reason)
                for job_id in jobs:
                    repo.finish_job_item(conn, job_id, row.id, "failed", reason)
                continue
            item = EmbedItem(
                item_id=str(row.id), image=ImageRef(key=row.image_key, sha256=row.image_sha256)
            )
            for job_id in jobs or [None]:
                by_job.setdefault(str(job_id) if job_id else None, []).append(item)
            requeued.append(row.id)
        repo.mark_requeued(conn, requeued)
    embed = [
        EmbedItems(job_id=job_id, items=batch[start : start + EMBED_TASK_ITEMS])
        for job_id, batch in by_job.items()
        for start in range(0, len(batch), EMBED_TASK_ITEMS)
    ]
    if requeued or failed:
        log.warning(
            "pending sweep: re-queued %d items pending for over %gs, failed %d after %d re-queues",
            len(requeued),
            timeout_s,
            failed,
            max_requeues,
        )
    return SweepPlan(embed, len(requeued), failed)
