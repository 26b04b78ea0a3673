"""The database schema: tables with their keys, constraints, indexes and server defaults.

The migrations (alembic, migrations/versions) create it; this module is alembic's
`target_metadata`, and tests/indexer/test_schema.py runs `alembic check` against a freshly
migrated database, so a change here without a migration (or the reverse) fails the tests.
Queries (repository.py) use these tables through SQLAlchemy Core.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

NOW = text("now()")

# Bumped on every change that affects search, so "what changed since build X" is one range scan.
change_seq = Sequence("items_change_seq", metadata=metadata)

items = Table(
    "items",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("sku", String(128), nullable=False),
    Column("title", Text),
    Column("category", String(128)),
    Column("price", Float),
    Column("attributes", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("image_key", Text, nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("error", Text),
    Column("deleted_at", DateTime(timezone=True)),
    # Server default nextval('items_change_seq'), owned by the column; alembic reflects a
    # sequence default as the Sequence itself, so it is declared as one.
    Column("change_seq", BigInteger, change_seq, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # How often the pending sweep re-sent the item's embedding since its upsert, and when last
    # (sweep.py); an upsert resets both.
    Column("requeues", Integer, nullable=False, server_default="0"),
    Column("requeued_at", DateTime(timezone=True)),
    # The product the item is a variant of (ItemMetadata.group): results collapse to one per group.
    Column("variant_group", Text),
    # Dominant colours of the current image (fashionrec_shared.tasks.Colour list as JSON), stored
    # with its embedding; NULL (not JSON null) until then.
    Column("colours", JSONB(none_as_null=True)),
    UniqueConstraint("sku", name="items_sku_key"),
    CheckConstraint("status IN ('pending', 'indexed', 'failed')", name="items_status_check"),
    Index("items_change_seq_idx", "change_seq"),
    Index("items_image_sha256_idx", "image_sha256"),
    Index("items_variant_group_idx", "variant_group"),
    # The pending sweep's scan touches pending items only (few, next to the indexed ones).
    Index("items_pending_idx", "updated_at", postgresql_where=text("status = 'pending'")),
)

embeddings = Table(
    "embeddings",
    metadata,
    Column("image_sha256", String(64), nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("dim", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # The model's predictions for the image (fashionrec_shared.tasks.Predicted as JSON) and
    # their category label, for filtering; NULL (not JSON null) for a model without heads.
    Column("predicted", JSONB(none_as_null=True)),
    Column("predicted_category", Text),
    PrimaryKeyConstraint("image_sha256", "model_version", name="embeddings_pkey"),
    Index("embeddings_created_at_idx", "created_at"),
    # Items of a version by predicted category (rows without a prediction are left out).
    Index(
        "embeddings_predicted_category_idx",
        "model_version",
        "predicted_category",
        postgresql_where=text("predicted_category IS NOT NULL"),
    ),
)

index_builds = Table(
    "index_builds",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("model_version", String(128)),
    Column("item_count", Integer),
    Column("dim", Integer),
    Column("max_change_seq", BigInteger),
    Column("manifest", JSONB),  # fashionrec_indexer.manifest.IndexManifest as JSON
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("finished_at", DateTime(timezone=True)),
    CheckConstraint("status IN ('building', 'ready', 'failed')", name="index_builds_status_check"),
    Index("index_builds_ready_idx", "status", "finished_at"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True, server_default=text("gen_random_uuid()")),
    Column("kind", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("model_version", String(128)),  # re-embed jobs: the version they embed with
    # Finds the re-embed job of a model version (few rows: one per model change).
    Index(
        "jobs_reembed_model_idx",
        "model_version",
        "created_at",
        postgresql_where=text("kind = 'reembed'"),
    ),
)

job_items = Table(
    "job_items",
    metadata,
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column(
        "item_id", UUID(as_uuid=True), ForeignKey("items.id", ondelete="CASCADE"), nullable=False
    ),
    Column("status", String(16), nullable=False, server_default="queued"),
    Column("error", Text),
    PrimaryKeyConstraint("job_id", "item_id", name="job_items_pkey"),
    CheckConstraint("status IN ('queued', 'done', 'failed')", name="job_items_status_check"),
    Index("job_items_item_id_idx", "item_id"),
)
