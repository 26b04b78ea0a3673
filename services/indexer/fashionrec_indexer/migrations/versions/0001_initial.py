"""initial schema: items, embeddings, index_builds, jobs, job_items

Revision ID: 0001
Revises:
Create Date: 2024-01-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE items_change_seq")
    now = sa.text("now()")
    op.create_table(
        "items",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("sku", sa.String(128), nullable=False),
        sa.Column("title", sa.Text),
        sa.Column("category", sa.String(128)),
        sa.Column("price", sa.Float),
        sa.Column("attributes", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("image_key", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("error", sa.Text),
        sa.Column("deleted_at", sa.DateTime(timezone=True)),
        sa.Column("change_seq", sa.BigInteger, nullable=False, server_default=sa.text("nextval('items_change_seq')")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.UniqueConstraint("sku", name="items_sku_key"),
        sa.CheckConstraint("status IN ('pending', 'indexed', 'failed')", name="items_status_check"),
    )
    op.execute("ALTER SEQUENCE items_change_seq OWNED BY items.change_seq")
    op.create_index("items_change_seq_idx", "items", ["change_seq"])
    op.create_index("items_image_sha256_idx", "items", ["image_sha256"])

    op.create_table(
        "embeddings",
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("image_sha256", "model_version"),
    )
    op.create_index("embeddings_created_at_idx", "embeddings", ["created_at"])

    op.create_table(
        "index_builds",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(128)),
        sa.Column("item_count", sa.Integer),
        sa.Column("dim", sa.Integer),
        sa.Column("max_change_seq", sa.BigInteger),
        sa.Column("manifest", JSONB),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("status IN ('building', 'ready', 'failed')", name="index_builds_status_check"),
    )
    op.create_index("index_builds_ready_idx", "index_builds", ["status", "finished_at"])

    op.create_table(
        "jobs",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=now),
    )
    op.create_table(
        "job_items",
        sa.Column("job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("item_id", UUID(as_uuid=True), sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("error", sa.Text),
        sa.PrimaryKeyConstraint("job_id", "item_id"),
        sa.CheckConstraint("status IN ('queued', 'done', 'failed')", name="job_items_status_check"),
    )
    op.create_index("job_items_item_id_idx", "job_items", ["item_id"])


def downgrade() -> None:
    op.drop_table("job_items")
    op.drop_table("jobs")
    op.drop_table("index_builds")
    op.drop_table("embeddings")
    op.drop_table("items")
    op.execute("DROP SEQUENCE IF EXISTS items_change_seq")
