"""Model changes: re-embed the inventory with a newly announced model, then build and swap.

Flow: an embedder process announces its primary model (MODEL_ONLINE). When that version is not
the one served, the indexer opens a `reembed` job for every live item without a vector of it and
sends EMBED_ITEMS(model_version=new). Stored results finish the job's entries without touching
the items (they stay searchable with the old version). The store that completes the job first
catches up on items added or re-imaged meanwhile, then asks for BUILD_INDEX(model_version=new);
the API swaps to that build when it is ready, so a query never mixes versions and the old
version serves until then.

The functions only decide, inside one transaction under an advisory lock (several processes
announce at once); they return the tasks to send, which the caller sends after the commit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from fashionrec_shared.tasks import BuildIndex, EmbedItem, EmbedItems, ImageRef, ModelOnline
from sqlalchemy import Connection, Engine, Row

from fashionrec_indexer import repository as repo

log = logging.getLogger("fashionrec.indexer.model_change")

REEMBED_BATCH = 16  # items per EMBED_ITEMS: a batch of the embedder, well inside its time limit
MODEL_CHANGE_REASON = "model change"
# A re-embed job that stored nothing for this long is considered stalled (its tasks were lost).
STALE_JOB_S = 600.0


@dataclass
class Plan:
    """What to send once the transaction that decided it has committed."""

    detail: str
    job_id: uuid.UUID | None = None
    embed: list[EmbedItems] = field(default_factory=list)
    build: BuildIndex | None = None


@dataclass(frozen=True)
class PendingChange:
    """A model change under way: the version coming and the job re-embedding the inventory."""

    model_version: str
    job_id: uuid.UUID


def pending_change(conn: Connection, served_version: str | None) -> PendingChange | None:
    """The change pending from its job's start until its build is swapped in (a later return
    to an older model has no job and does not count as pending)."""
    job = repo.latest_reembed_job(conn)
    if (
        job is None
        or job.model_version == served_version
        or repo.ready_build_since(conn, job.model_version, job.created_at)
    ):
        return None
    return PendingChange(job.model_version, job.id)


def coming_version(conn: Connection) -> str | None:
    """The version being re-embedded now, if any: an item added or re-imaged meanwhile needs
    a vector of it too before it counts as indexed."""
    job = repo.open_reembed_job(conn)
    return job.model_version if job is not None else None


def embed_batches(job_id: uuid.UUID, model_version: str, rows: list[Row]) -> list[EmbedItems]:
    items = [
        EmbedItem(item_id=str(r.id), image=ImageRef(key=r.image_key, sha256=r.image_sha256))
        for r in rows
    ]
    return [
        EmbedItems(
            job_id=str(job_id), model_version=model_version, items=items[i : i + REEMBED_BATCH]
        )
        for i in range(0, len(items), REEMBED_BATCH)
    ]


def model_build(model_version: str) -> BuildIndex:
    return BuildIndex(reason=MODEL_CHANGE_REASON, force=True, model_version=model_version)


def model_online(engine: Engine, announced: ModelOnline) -> Plan:
    """MODEL_ONLINE: start re-embedding when the announced version is not served; idempotent."""
    version = announced.model_version
    with engine.begin() as conn:
        repo.lock_model_change(conn)
        serving = repo.active_model_version(conn)
        if serving is None:
            return Plan("nothing stored yet: items are embedded as they arrive")
        if serving == version:
            return Plan(f"{version} is the served version")
        job = repo.open_reembed_job(conn, version)
        if job is not None:
            if repo.job_idle_seconds(conn, job.id) < STALE_JOB_S:
                return Plan(f"re-embed job {job.id} for {version} is under way", job_id=job.id)
            # Nothing stored for a long time: its tasks were lost (e.g. the broker was down
            # when they were sent). A restarted embedder announcing again sends them anew.
            queued = repo.queued_items(conn, job.id)
            repo.touch_job(conn, job.id)
            log.warning("re-embed job %s stalled: re-sending %d items", job.id, len(queued))
            return Plan(
                f"re-sent {len(queued)} stalled items",
                job_id=job.id,
                embed=embed_batches(job.id, version, queued),
            )
        missing = repo.items_missing_version(conn, version)
        if not missing:
            # Everything has a vector of it already (a finished job whose build failed, or a
            # return to a previous model): only the build is missing.
            if repo.model_dim(conn, version) is None:
                return Plan(f"no live items to embed with {version}")
            return Plan(f"every item has a {version} vector: build it", build=model_build(version))
        job_id = repo.create_job(conn, repo.REEMBED, model_version=version)
        repo.add_job_items(conn, job_id, [r.id for r in missing])
    log.info(
        "model %s announced by %s (serving %s): re-embedding %d items in job %s",
        version,
        announced.hostname or "?",
        serving,
        len(missing),
        job_id,
    )
    return Plan(
        f"re-embedding {len(missing)} items with {version}",
        job_id=job_id,
        embed=embed_batches(job_id, version, missing),
    )


def after_reembed_store(
    conn: Connection,
    job: Row,
    queued_before: int,
    max_failed_fraction: float,
) -> Plan:
    """Called in the STORE_EMBEDDINGS transaction of a re-embed job (lock held), after its
    entries were finished: when this store completed the job, catch up or request the build."""
    version = job.model_version
    if queued_before == 0 or repo.queued_count(conn, job.id) > 0:
        return Plan("re-embed job still running", job_id=job.id)
    # Items added or re-imaged while the job ran may lack the new vector (e.g. embedded by a
    # process without the new model): add them to the job before building.
    missing = repo.items_missing_version(conn, version, skip_failed_in=job.id)
    if missing:
        repo.add_job_items(conn, job.id, [r.id for r in missing])
        return Plan(
            f"catching up {len(missing)} items",
            job_id=job.id,
            embed=embed_batches(job.id, version, missing),
        )
    summary = repo.job_summary(conn, job.id)
    assert summary is not None
    total, failed = summary["total"], summary["failed"]
    if total and failed / total > max_failed_fraction:
        log.error(
            "re-embed job %s: %d of %d items failed with %s; keeping the served model "
            "(fix the errors, then restart the embedders to try again)",
            job.id,
            failed,
            total,
            version,
        )
        return Plan(f"{failed} of {total} items failed: not switching", job_id=job.id)
    log.info(
        "re-embed job %s done (%d items, %d failed): building %s", job.id, total, failed, version
    )
    return Plan(
        f"re-embedded {total} items: build {version}", job_id=job.id, build=model_build(version)
    )
