"""pending sweep: items.requeues, items.requeued_at and an index of the pending items

An item that stays pending past a bound (its embed task lost) is re-sent by the indexer
worker's periodic sweep; the columns count the re-sends since the item's upsert, so it ends
failed with a reason after the maximum instead of being re-sent for ever.

Revision ID: 0004
Revises: 0003
Create Date: 2025-02-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: Postgres adds the column without rewriting the table.
    op.add_column("items", sa.Column("requeues", sa.Integer, nullable=False, server_default="0"))
    op.add_column("items", sa.Column("requeued_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "items_pending_idx",
        "items",
        ["updated_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("items_pending_idx", table_name="items")
    op.drop_column("items", "requeued_at")
    op.drop_column("items", "requeues")
