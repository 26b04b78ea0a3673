"""Table definitions for SQLAlchemy Core queries; the DDL itself lives in the alembic migrations."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData()

# Bumped on every change that affects search, so "what changed since build X" is one range scan.
change_seq = Sequence("items_change_seq", metadata=metadata)

items = Table(
    "items",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("sku", String(128), nullable=False, unique=True),
    Column("title", Text),
    Column("category", String(128)),
    Column("price", Float),
    Column("attributes", JSONB, nullable=False),
    Column("image_key", Text, nullable=False),
    Column("image_sha256", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("deleted_at", DateTime(timezone=True)),
    Column("change_seq", BigInteger, change_seq, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

embeddings = Table(
    "embeddings",
    metadata,
    Column("image_sha256", String(64), primary_key=True),
    Column("model_version", String(128), primary_key=True),
    Column("dim", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The model's predictions for the image (fashionrec_shared.tasks.Predicted as JSON) and
    # their category label, for filtering; NULL (not JSON null) for a model without heads.
    Column("predicted", JSONB(none_as_null=True)),
    Column("predicted_category", Text),
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
    Column("manifest", JSONB),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("model_version", String(128)),  # re-embed jobs: the version they embed with
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

job_items = Table(
    "job_items",
    metadata,
    Column("job_id", UUID(as_uuid=True), ForeignKey("jobs.id"), primary_key=True),
    Column("item_id", UUID(as_uuid=True), ForeignKey("items.id"), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("error", Text),
)
