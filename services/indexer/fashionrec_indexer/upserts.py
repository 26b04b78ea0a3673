"""Upserting items (POST /items, /items/batch): one transaction decides, the caller sends after.

Every item is inserted or replaced by sku and attached to a job (the given one, else a new `item`
job). An item whose image already has a vector of the served version (and, during a model change,
of the coming one too) is indexed at once and its job entry done; the others are queued and one
EMBED_ITEMS per EMBED_TASK_ITEMS of them is to be sent once the transaction has committed, so an
embedder never sees an item that is not stored yet.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from fashionrec_shared.schemas import UpsertItem, UpsertItemResult
from fashionrec_shared.tasks import EmbedItem, EmbedItems
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.model_change import coming_version

# Items per EMBED_ITEMS task of a bulk upsert: the embedder runs them in model batches while it
# fetches and decodes the next ones; small enough that a time limit or a crash costs little.
EMBED_TASK_ITEMS = 32


class UnknownJob(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")


class DuplicateSku(ValueError):
    """The same sku twice in one batch (which one would win is not defined)."""


@dataclass(frozen=True)
class UpsertPlan:
    """The upserted items and what to send once their transaction has committed."""

    job_id: uuid.UUID
    results: list[UpsertItemResult]
    embed: list[EmbedItems]


def check_distinct_skus(bodies: Sequence[UpsertItem]) -> None:
    seen: dict[str, int] = {}
    for n, item in enumerate(bodies):
        first = seen.setdefault(item.metadata.sku, n)
        if first != n:
            raise DuplicateSku(
                f"items[{n}]: sku {item.metadata.sku!r} already in this batch (items[{first}])"
            )


def upsert_items(engine: Engine, bodies: Sequence[UpsertItem], job_id: str | None) -> UpsertPlan:
    """Upsert `bodies` in one transaction, into job `job_id` (UnknownJob if there is none)."""
    job_uuid = None
    if job_id is not None:
        job_uuid = repo.parse_uuid(job_id)
        if job_uuid is None:
            raise UnknownJob(job_id)
    results: list[UpsertItemResult] = []
    to_embed: list[EmbedItem] = []
    with engine.begin() as conn:
        if job_uuid is None:
            job_uuid = repo.create_job(conn, "item")
        elif not repo.job_exists(conn, job_uuid):
            raise UnknownJob(str(job_id))
        model_version = repo.active_model_version(conn)
        pending = coming_version(conn)
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
    embed = [
        EmbedItems(job_id=str(job_uuid), items=to_embed[start : start + EMBED_TASK_ITEMS])
        for start in range(0, len(to_embed), EMBED_TASK_ITEMS)
    ]
    return UpsertPlan(job_uuid, results, embed)
