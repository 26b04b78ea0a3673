"""All SQL of the indexer (SQLAlchemy Core); functions take a Connection the caller scopes."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fashionrec_shared.schemas import ItemMetadata
from fashionrec_shared.tasks import ImageRef
from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    and_,
    case,
    exists,
    func,
    null,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by, array_agg, insert

from fashionrec_indexer.manifest import IndexManifest
from fashionrec_indexer.schema import change_seq, embeddings, index_builds, items, job_items, jobs

MAX_JOB_ERRORS = 100
REEMBED = "reembed"  # kind of the jobs that embed the inventory with a new model version


def parse_uuid(value: str | uuid.UUID) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


# ---- model version and builds ------------------------------------------------------------


def latest_ready_build(conn: Connection) -> Row | None:
    return conn.execute(
        select(index_builds)
        .where(index_builds.c.status == "ready")
        .order_by(index_builds.c.finished_at.desc())
        .limit(1)
    ).first()


def latest_ready_manifest(conn: Connection) -> IndexManifest | None:
    """The manifest of the latest ready build (what a build is compared with)."""
    build = latest_ready_build(conn)
    return IndexManifest.from_json(build.manifest) if build is not None else None


def latest_embedding_model(
    conn: Connection, exclude: Collection[str] = ()
) -> tuple[str, int] | None:
    """(model_version, dim) of the most recently stored embedding, skipping `exclude`."""
    query = select(embeddings.c.model_version, embeddings.c.dim)
    if exclude:
        query = query.where(embeddings.c.model_version.not_in(list(exclude)))
    row = conn.execute(query.order_by(embeddings.c.created_at.desc()).limit(1)).first()
    return (row.model_version, row.dim) if row else None


def unbuilt_model(conn: Connection) -> tuple[str, int] | None:
    """The version served before the first build: the newest embedding's, except a version
    still being re-embedded (serving it would leave out the items not embedded yet)."""
    return latest_embedding_model(conn, exclude=reembedding_versions(conn)) or (
        latest_embedding_model(conn)
    )


def active_model_version(conn: Connection) -> str | None:
    """Model of the latest ready build, else of the newest embedding not being re-embedded."""
    build = latest_ready_build(conn)
    if build is not None:
        return build.model_version
    latest = unbuilt_model(conn)
    return latest[0] if latest else None


def model_dim(conn: Connection, model_version: str) -> int | None:
    row = conn.execute(
        select(embeddings.c.dim).where(embeddings.c.model_version == model_version).limit(1)
    ).first()
    return int(row.dim) if row else None


def insert_build(conn: Connection, build_id: uuid.UUID, model_version: str) -> None:
    conn.execute(
        index_builds.insert().values(
            id=build_id, status="building", model_version=model_version, created_at=func.now()
        )
    )


def finish_build(conn: Connection, build_id: uuid.UUID, manifest: IndexManifest) -> None:
    conn.execute(
        update(index_builds)
        .where(index_builds.c.id == build_id)
        .values(
            status="ready",
            item_count=manifest.item_count,
            dim=manifest.dim,
            max_change_seq=manifest.max_change_seq,
            manifest=manifest.to_json(),
            finished_at=func.clock_timestamp(),
        )
    )


def fail_build(conn: Connection, build_id: uuid.UUID, error: str) -> None:
    conn.execute(
        update(index_builds)
        .where(index_builds.c.id == build_id)
        .values(status="failed", error=error[:2000], finished_at=func.clock_timestamp())
    )


def max_change_seq(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(items.c.change_seq), 0))).scalar_one())


# The upper end of change_seq ranges. Writing "after seq" as a closed range keeps the plan on
# items_change_seq_idx even without planner statistics: Postgres estimates an open inequality
# on a never-analysed table at a third of the rows (a sequential scan; 40 ms at 100k items,
# after a bulk load with autovacuum off or not yet run) and a range at 0.5% (the index).
MAX_SEQ = 2**63 - 1


def _after(seq: int) -> Any:
    return items.c.change_seq.between(seq + 1, MAX_SEQ)


def count_changed_since(conn: Connection, seq: int) -> int:
    return int(conn.execute(select(func.count()).where(_after(seq))).scalar_one())


# ---- items ---------------------------------------------------------------------------------


def embedding_exists(conn: Connection, image_sha256: str, model_version: str | None) -> bool:
    if model_version is None:
        return False
    return bool(
        conn.execute(
            select(
                exists().where(
                    embeddings.c.image_sha256 == image_sha256,
                    embeddings.c.model_version == model_version,
                )
            )
        ).scalar_one()
    )


def items_missing_version(
    conn: Connection, model_version: str, skip_failed_in: uuid.UUID | None = None
) -> list[Row]:
    """Live items whose current image has no vector of `model_version` (failed items aside).

    `skip_failed_in`: also leave out items whose entry in that job failed (no endless retries).
    """
    query = select(items.c.id, items.c.image_key, items.c.image_sha256).where(
        items.c.deleted_at.is_(None),
        items.c.status != "failed",
        ~exists().where(
            embeddings.c.image_sha256 == items.c.image_sha256,
            embeddings.c.model_version == model_version,
        ),
    )
    if skip_failed_in is not None:
        query = query.where(
            ~exists().where(
                job_items.c.job_id == skip_failed_in,
                job_items.c.item_id == items.c.id,
                job_items.c.status == "failed",
            )
        )
    return list(conn.execute(query.order_by(items.c.id)))


@dataclass(frozen=True)
class Upserted:
    item_id: uuid.UUID
    created: bool
    status: str


def upsert_item(
    conn: Connection,
    metadata: ItemMetadata,
    image: ImageRef,
    model_version: str | None,
    pending_version: str | None = None,
) -> Upserted:
    """Insert or replace by sku: same sku keeps its id; a deleted item comes back to life.

    Indexed at once when the image already has a vector of `model_version` (and, during a model
    change, of `pending_version` too), else pending until the embedder has done it.
    """
    embedded = embedding_exists(conn, image.sha256, model_version) and (
        pending_version is None or embedding_exists(conn, image.sha256, pending_version)
    )
    status = "indexed" if embedded else "pending"
    previous = conn.execute(
        select(items.c.id, items.c.deleted_at).where(items.c.sku == metadata.sku)
    ).first()
    values = {
        "sku": metadata.sku,
        "title": metadata.title,
        "category": metadata.category,
        "price": metadata.price,
        "attributes": metadata.attributes,
        "variant_group": metadata.group,
        "image_key": image.key,
        "image_sha256": image.sha256,
        "status": status,
        "error": None,
        # A new upload is a new start for the pending sweep.
        "requeues": 0,
        "requeued_at": None,
    }
    # Colours belong to the image: a new one has none until it is embedded, unless another
    # item already has them (an image embedded before is not embedded again).
    known_colours = (
        select(items.c.colours)
        .where(items.c.image_sha256 == image.sha256, items.c.colours.is_not(None))
        .limit(1)
        .scalar_subquery()
    )
    stmt = insert(items).values(
        id=uuid.uuid4(),
        change_seq=change_seq.next_value(),
        created_at=func.now(),
        updated_at=func.now(),
        colours=known_colours,
        **values,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[items.c.sku],
        set_={
            **{k: stmt.excluded[k] for k in values},
            "colours": case(
                (items.c.image_sha256 == stmt.excluded.image_sha256, items.c.colours),
                else_=stmt.excluded.colours,
            ),
            "deleted_at": None,
            "change_seq": change_seq.next_value(),
            "updated_at": func.now(),
        },
    ).returning(items.c.id)
    item_id = conn.execute(stmt).scalar_one()
    created = previous is None or previous.deleted_at is not None
    return Upserted(item_id=item_id, created=created, status=status)


def item_columns(served_version: str | None = None) -> list[Any]:
    """The item, the model version of its current image's newest embedding (for display) and
    the predictions of `served_version` for that image (column `predicted`, NULL without one)."""
    # An aggregate, not ORDER BY created_at LIMIT 1: with that, a planner without statistics
    # walks embeddings_created_at_idx backwards through every embedding (40 ms at 100k)
    # instead of looking up the image's few rows by the primary key.
    newest_first = aggregate_order_by(embeddings.c.model_version, embeddings.c.created_at.desc())
    model = (
        select(array_agg(newest_first)[1])
        .where(embeddings.c.image_sha256 == items.c.image_sha256)
        .scalar_subquery()
    )
    predicted: Any = null()
    if served_version is not None:
        predicted = (
            select(embeddings.c.predicted)
            .where(
                embeddings.c.image_sha256 == items.c.image_sha256,
                embeddings.c.model_version == served_version,
            )
            .scalar_subquery()
        )
    return [*items.c, model.label("model_version"), predicted.label("predicted")]


def get_item(conn: Connection, item_id: uuid.UUID, served_version: str | None = None) -> Row | None:
    """A live item; with `served_version`, also its predictions under that version."""
    return conn.execute(
        select(*item_columns(served_version)).where(
            items.c.id == item_id, items.c.deleted_at.is_(None)
        )
    ).first()


def delete_item(conn: Connection, item_id: uuid.UUID) -> bool:
    result = conn.execute(
        update(items)
        .where(items.c.id == item_id, items.c.deleted_at.is_(None))
        .values(deleted_at=func.now(), change_seq=change_seq.next_value(), updated_at=func.now())
    )
    return result.rowcount > 0


def item_exists(conn: Connection, item_id: uuid.UUID) -> bool:
    """Whether a live item has this id."""
    return bool(
        conn.execute(
            select(exists().where(items.c.id == item_id, items.c.deleted_at.is_(None)))
        ).scalar_one()
    )


def item_vector(conn: Connection, item_id: uuid.UUID, model_version: str | None) -> Row | None:
    """(vector, dim, predicted, colours) of a live item's current image for `model_version`,
    if embedded."""
    if model_version is None:
        return None
    return conn.execute(
        select(embeddings.c.vector, embeddings.c.dim, embeddings.c.predicted, items.c.colours)
        .select_from(items.join(embeddings, embeddings.c.image_sha256 == items.c.image_sha256))
        .where(
            items.c.id == item_id,
            items.c.deleted_at.is_(None),
            embeddings.c.model_version == model_version,
        )
    ).first()


def _current_embedding(model_version: str) -> ColumnElement[bool]:
    """Join condition: the embedding of an item's current image under `model_version`."""
    return and_(
        embeddings.c.image_sha256 == items.c.image_sha256,
        embeddings.c.model_version == model_version,
    )


def _live_items(
    conn: Connection, item_ids: Sequence[uuid.UUID], model_version: str, *columns: Any
) -> dict[uuid.UUID, Row]:
    """`columns` of live items by id, with those of their current image's embedding under
    `model_version` (NULL where not embedded with it), in one query; unknown and deleted ids
    are left out."""
    if not item_ids:
        return {}
    rows = conn.execute(
        select(items.c.id, *columns)
        .select_from(items.outerjoin(embeddings, _current_embedding(model_version)))
        .where(items.c.id.in_(list(item_ids)), items.c.deleted_at.is_(None))
    )
    return {row.id: row for row in rows}


def example_items(
    conn: Connection, item_ids: Sequence[uuid.UUID], model_version: str
) -> dict[uuid.UUID, Row]:
    """The examples of a recommendation: (colours, vector, dim, predicted) by id."""
    return _live_items(
        conn,
        item_ids,
        model_version,
        items.c.colours,
        embeddings.c.vector,
        embeddings.c.dim,
        embeddings.c.predicted,
    )


def hits_metadata(
    conn: Connection, item_ids: Sequence[uuid.UUID], model_version: str
) -> dict[uuid.UUID, Row]:
    """Metadata of search hits, with their predictions under `model_version`."""
    return _live_items(
        conn,
        item_ids,
        model_version,
        items.c.sku,
        items.c.title,
        items.c.category,
        items.c.price,
        items.c.image_key,
        items.c.image_sha256,
        items.c.variant_group,
        items.c.colours,
        embeddings.c.predicted,
    )


def _searchable(model_version: str, dim: int) -> Any:
    return (
        items.join(embeddings, embeddings.c.image_sha256 == items.c.image_sha256),
        and_(
            items.c.deleted_at.is_(None),
            embeddings.c.model_version == model_version,
            embeddings.c.dim == dim,
        ),
    )


def count_build_rows(conn: Connection, model_version: str, dim: int) -> int:
    source, where = _searchable(model_version, dim)
    return int(conn.execute(select(func.count()).select_from(source).where(where)).scalar_one())


def plan_for_whole_tables(conn: Connection) -> None:
    """For the rest of this transaction (an index build's snapshot): join whole tables by
    hashing or merging, never by a nested loop. Without planner statistics (a bulk load not yet
    analysed) Postgres estimates the build's join at a few rows and loops over one index probe
    per embedding: minutes for a million items instead of seconds."""
    conn.execute(text("SET LOCAL enable_nestloop = off"))


def build_chunks(
    conn: Connection, model_version: str, dim: int, size: int
) -> Iterator[Sequence[Row]]:
    """Live items with an embedding of `model_version`, `size` rows at a time from a
    server-side cursor (for index builds: memory stays bounded whatever the inventory)."""
    source, where = _searchable(model_version, dim)
    result = conn.execution_options(stream_results=True, yield_per=size).execute(
        select(
            items.c.id,
            items.c.category,
            items.c.price,
            items.c.image_sha256,
            embeddings.c.predicted_category,
            embeddings.c.vector,
        )
        .select_from(source)
        .where(where)
        .order_by(items.c.id)
    )
    yield from result.partitions()


def settled_change_seq(conn: Connection, settle_s: float) -> tuple[int, int]:
    """(settled, newest) change_seq in this snapshot.

    `settled` only counts rows changed at least `settle_s` ago: a sequence value is taken when a
    writer's statement runs but becomes visible at its commit, so a newer value can be visible
    while an older one is still in flight. Readers re-check everything above `settled`.
    """
    row = conn.execute(
        select(
            func.coalesce(
                func.max(items.c.change_seq).filter(
                    items.c.updated_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settle_s)
                ),
                0,
            ).label("settled"),
            func.coalesce(func.max(items.c.change_seq), 0).label("newest"),
        )
    ).one()
    return int(row.settled), int(row.newest)


@dataclass(frozen=True)
class Horizon:
    """When the probe's snapshot is certain to hold every change made before some instant."""

    now: Any  # the database clock (clock_timestamp()) when this was read
    oldest: Any  # start of the oldest transaction of another session in progress (None: none)
    hidden: int  # sessions of this database whose state this role may not see

    @property
    def since(self) -> Any:
        """Every transaction that started before this instant has ended (None: unknown)."""
        if self.hidden:
            return None
        return self.now if self.oldest is None else self.oldest


HORIZON_SQL = text(
    # A transaction caches pg_stat_activity at its first read: clear it, read it fresh.
    "SELECT pg_stat_clear_snapshot(); "
    "SELECT clock_timestamp() AS now, min(xact_start) AS oldest, "
    "count(*) FILTER (WHERE state IS NULL) AS hidden FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND backend_type = 'client backend'"
)


def write_horizon(conn: Connection) -> Horizon:
    """See index_state.Delta: the instant before which no writer can still be in flight."""
    row = conn.execute(HORIZON_SQL).one()
    return Horizon(row.now, row.oldest, int(row.hidden))


PROBE_PAGE = 10_000


def probe_changes(conn: Connection, seq: int, settle_s: float, page: int = PROBE_PAGE) -> list[Row]:
    """Items changed after `seq`, in change_seq order: the per-search delta probe.

    (id, change_seq, settled, deleted, image_sha256, category, price): with predictions_of, what
    tells whether the change left the item as a build has it. One index range scan of one table
    per `page` rows (a closed range, see MAX_SEQ), whatever the table's statistics.
    """
    settled = items.c.updated_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settle_s)
    query = (
        select(
            items.c.id,
            items.c.change_seq,
            settled.label("settled"),
            items.c.deleted_at.is_not(None).label("deleted"),
            items.c.image_sha256,
            items.c.category,
            items.c.price,
        )
        .order_by(items.c.change_seq)
        .limit(page)
    )
    rows: list[Row] = []
    while True:
        got = list(conn.execute(query.where(_after(seq))))
        rows.extend(got)
        if len(got) < page:
            return rows
        seq = got[-1].change_seq


def predictions_of(
    conn: Connection, image_sha256s: Collection[str], model_version: str
) -> dict[str, str | None]:
    """image sha256 → predicted category under `model_version`, for images with a vector of it."""
    if not image_sha256s:
        return {}
    rows = conn.execute(
        select(embeddings.c.image_sha256, embeddings.c.predicted_category).where(
            embeddings.c.model_version == model_version,
            embeddings.c.image_sha256.in_(list(image_sha256s)),
        )
    )
    return {row.image_sha256: row.predicted_category for row in rows}


def vectors_of(
    conn: Connection, image_sha256s: Collection[str], model_version: str
) -> dict[str, bytes]:
    """image sha256 → vector bytes of `model_version` (images without one are left out)."""
    if not image_sha256s:
        return {}
    rows = conn.execute(
        select(embeddings.c.image_sha256, embeddings.c.vector).where(
            embeddings.c.model_version == model_version,
            embeddings.c.image_sha256.in_(list(image_sha256s)),
        )
    )
    return {row.image_sha256: row.vector for row in rows}


# ---- embeddings ------------------------------------------------------------------------------


def upsert_embeddings(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Store vectors keyed by (image sha, model version); the same image is stored once.

    A stored row keeps its vector; it only gains predictions it lacked (a row stored by an
    embedder that did not send them yet). `rows` must be distinct by (image_sha256,
    model_version): ON CONFLICT DO UPDATE cannot touch one row twice in a statement.
    """
    if not rows:
        return
    stmt = insert(embeddings).values([{**row, "created_at": func.now()} for row in rows])
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["image_sha256", "model_version"],
            set_={
                "predicted": stmt.excluded.predicted,
                "predicted_category": stmt.excluded.predicted_category,
            },
            where=and_(embeddings.c.predicted.is_(None), stmt.excluded.predicted.is_not(None)),
        )
    )


def mark_indexed(
    conn: Connection,
    item_id: uuid.UUID,
    image_sha256: str,
    colours: list[dict[str, Any]] | None = None,
) -> bool:
    """Mark an item indexed if its *current* image is the embedded one, storing the image's
    `colours` (None: keep those stored); bumps change_seq."""
    values: dict[str, Any] = {"colours": colours} if colours is not None else {}
    result = conn.execute(
        update(items)
        .where(items.c.id == item_id, items.c.image_sha256 == image_sha256)
        .values(
            status="indexed",
            error=None,
            change_seq=change_seq.next_value(),
            updated_at=func.now(),
            **values,
        )
    )
    return result.rowcount > 0


def store_colours(
    conn: Connection, item_id: uuid.UUID, image_sha256: str, colours: list[dict[str, Any]]
) -> None:
    """The image's colours on the item if it is still its current image; nothing searchable
    changes, so change_seq stays (a re-embed stores them this way)."""
    conn.execute(
        update(items)
        .where(items.c.id == item_id, items.c.image_sha256 == image_sha256)
        .values(colours=colours)
    )


def mark_failed(conn: Connection, item_id: uuid.UUID, error: str) -> bool:
    # Only a pending item fails: an indexed one already has a vector for its current image.
    result = conn.execute(
        update(items)
        .where(items.c.id == item_id, items.c.status == "pending")
        .values(status="failed", error=error[:2000], updated_at=func.now())
    )
    return result.rowcount > 0


# ---- pending sweep ---------------------------------------------------------------------------


def lock_stale_pending(conn: Connection, older_than_s: float, limit: int) -> list[Row]:
    """(id, image_key, image_sha256, requeues) of live items pending for `older_than_s` since
    their upsert or last re-queue, oldest first, locked for this transaction (rows another
    sweep holds, or a store is finishing, are skipped)."""
    since = func.coalesce(items.c.requeued_at, items.c.updated_at)
    return list(
        conn.execute(
            select(items.c.id, items.c.image_key, items.c.image_sha256, items.c.requeues)
            .where(
                items.c.status == "pending",
                items.c.deleted_at.is_(None),
                since < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s),
            )
            .order_by(since, items.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def queued_entries(
    conn: Connection, item_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[uuid.UUID]]:
    """item id -> the jobs, oldest first, in which its entry is still queued (re-embed jobs
    aside: they re-send their own entries, see model_change)."""
    if not item_ids:
        return {}
    rows = conn.execute(
        select(job_items.c.item_id, job_items.c.job_id)
        .select_from(job_items.join(jobs, jobs.c.id == job_items.c.job_id))
        .where(
            job_items.c.item_id.in_(list(item_ids)),
            job_items.c.status == "queued",
            jobs.c.kind != REEMBED,
        )
        .order_by(jobs.c.created_at)
    )
    found: dict[uuid.UUID, list[uuid.UUID]] = {}
    for row in rows:
        found.setdefault(row.item_id, []).append(row.job_id)
    return found


def mark_requeued(conn: Connection, item_ids: Sequence[uuid.UUID]) -> None:
    """Count a re-queue; change_seq and updated_at stay (nothing searchable changed)."""
    if item_ids:
        conn.execute(
            update(items)
            .where(items.c.id.in_(list(item_ids)))
            .values(requeues=items.c.requeues + 1, requeued_at=func.now())
        )


# ---- jobs ------------------------------------------------------------------------------------


def create_job(conn: Connection, kind: str, model_version: str | None = None) -> uuid.UUID:
    job_id = uuid.uuid4()
    conn.execute(
        jobs.insert().values(
            id=job_id,
            kind=kind,
            model_version=model_version,
            created_at=func.now(),
            updated_at=func.now(),
        )
    )
    return job_id


def get_job(conn: Connection, job_id: uuid.UUID) -> Row | None:
    return conn.execute(select(jobs).where(jobs.c.id == job_id)).first()


def add_job_items(conn: Connection, job_id: uuid.UUID, item_ids: Sequence[uuid.UUID]) -> None:
    """Attach many items as queued in one statement (re-embed jobs); re-attaching requeues."""
    if not item_ids:
        return
    stmt = insert(job_items).values(
        [{"job_id": job_id, "item_id": i, "status": "queued", "error": None} for i in item_ids]
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "item_id"], set_={"status": "queued", "error": None}
        )
    )
    touch_job(conn, job_id)


def queued_count(conn: Connection, job_id: uuid.UUID) -> int:
    return int(
        conn.execute(
            select(func.count()).where(job_items.c.job_id == job_id, job_items.c.status == "queued")
        ).scalar_one()
    )


def queued_items(conn: Connection, job_id: uuid.UUID) -> list[Row]:
    """(id, image_key, image_sha256) of the job's live items still queued."""
    return list(
        conn.execute(
            select(items.c.id, items.c.image_key, items.c.image_sha256)
            .select_from(job_items.join(items, items.c.id == job_items.c.item_id))
            .where(job_items.c.job_id == job_id, job_items.c.status == "queued")
            .order_by(items.c.id)
        )
    )


def job_idle_seconds(conn: Connection, job_id: uuid.UUID) -> float:
    return float(
        conn.execute(
            select(func.extract("epoch", func.now() - jobs.c.updated_at)).where(jobs.c.id == job_id)
        ).scalar_one()
    )


def _has_queued() -> Any:
    return exists().where(job_items.c.job_id == jobs.c.id, job_items.c.status == "queued")


def open_reembed_job(conn: Connection, model_version: str | None = None) -> Row | None:
    """The newest re-embed job with entries still queued (of `model_version` if given)."""
    query = select(jobs).where(jobs.c.kind == REEMBED, _has_queued())
    if model_version is not None:
        query = query.where(jobs.c.model_version == model_version)
    return conn.execute(query.order_by(jobs.c.created_at.desc()).limit(1)).first()


def reembedding_versions(conn: Connection) -> set[str]:
    """Versions with a re-embed job under way: not servable yet."""
    rows = conn.execute(
        select(jobs.c.model_version).where(jobs.c.kind == REEMBED, _has_queued()).distinct()
    )
    return {row.model_version for row in rows if row.model_version}


def ready_build_since(conn: Connection, model_version: str, since: Any) -> bool:
    """Whether a build of `model_version` became ready after `since`."""
    return bool(
        conn.execute(
            select(
                exists().where(
                    index_builds.c.status == "ready",
                    index_builds.c.model_version == model_version,
                    index_builds.c.finished_at > since,
                )
            )
        ).scalar_one()
    )


def latest_reembed_job(conn: Connection) -> Row | None:
    return conn.execute(
        select(jobs).where(jobs.c.kind == REEMBED).order_by(jobs.c.created_at.desc()).limit(1)
    ).first()


def lock_model_change(conn: Connection) -> None:
    """Transaction advisory lock: one model-change decision at a time across processes."""
    conn.execute(text("SELECT pg_advisory_xact_lock(7423003)"))


def job_exists(conn: Connection, job_id: uuid.UUID) -> bool:
    return bool(conn.execute(select(exists().where(jobs.c.id == job_id))).scalar_one())


def add_job_item(conn: Connection, job_id: uuid.UUID, item_id: uuid.UUID, status: str) -> None:
    """Attach an item to a job; re-uploading the same sku in a job restarts its entry."""
    stmt = insert(job_items).values(job_id=job_id, item_id=item_id, status=status, error=None)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "item_id"],
            set_={"status": stmt.excluded.status, "error": None},
        )
    )
    touch_job(conn, job_id)


def touch_job(conn: Connection, job_id: uuid.UUID) -> None:
    conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=func.now()))


def finish_job_item(
    conn: Connection, job_id: uuid.UUID | None, item_id: uuid.UUID, status: str, error: str | None
) -> list[uuid.UUID]:
    """Move queued entries to done/failed (never back): a redelivered task changes nothing.

    Without a job id every queued entry of the item is finished. Returns the touched job ids.
    """
    conditions = [job_items.c.item_id == item_id, job_items.c.status == "queued"]
    if job_id is not None:
        conditions.append(job_items.c.job_id == job_id)
    touched = [
        row.job_id
        for row in conn.execute(
            update(job_items)
            .where(*conditions)
            .values(status=status, error=error[:2000] if error else None)
            .returning(job_items.c.job_id)
        )
    ]
    for touched_id in set(touched):
        touch_job(conn, touched_id)
    return touched


def job_summary(conn: Connection, job_id: uuid.UUID) -> dict[str, Any] | None:
    """Job status and counts, derived from its entries (no counters to drift)."""
    job = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
    if job is None:
        return None
    counts = conn.execute(
        select(
            func.count().label("total"),
            func.count().filter(job_items.c.status == "done").label("done"),
            func.count().filter(job_items.c.status == "failed").label("failed"),
        ).where(job_items.c.job_id == job_id)
    ).one()
    errors = conn.execute(
        select(job_items.c.item_id, items.c.sku, job_items.c.error)
        .select_from(job_items.join(items, items.c.id == job_items.c.item_id))
        .where(job_items.c.job_id == job_id, job_items.c.status == "failed")
        .order_by(items.c.sku)
        .limit(MAX_JOB_ERRORS)
    )
    total, done, failed = int(counts.total), int(counts.done), int(counts.failed)
    return {
        "job_id": str(job.id),
        "kind": job.kind,
        "status": job_status(total, done, failed),
        "total": total,
        "done": done,
        "failed": failed,
        "errors": [
            {"item_id": str(e.item_id), "sku": e.sku, "error": e.error or "failed"} for e in errors
        ],
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def job_status(total: int, done: int, failed: int) -> str:
    terminal = done + failed
    if terminal == 0:  # includes a just-opened job with nothing attached yet
        return "queued"
    if terminal < total:
        return "running"
    return "failed" if done == 0 else "completed"


def acquire_build_lock(conn: Connection) -> None:
    """Session advisory lock that serialises index builds across worker processes."""
    conn.execute(text("SELECT pg_advisory_lock(7423002)"))


def release_build_lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_unlock(7423002)"))
