"""model changes: jobs.model_version (the version a re-embed job embeds the inventory with)

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("model_version", sa.String(128), nullable=True))
    # Finds the re-embed job of a model version (few rows: one per model change).
    op.create_index(
        "jobs_reembed_model_idx",
        "jobs",
        ["model_version", "created_at"],
        postgresql_where=sa.text("kind = 'reembed'"),
    )


def downgrade() -> None:
    op.drop_index("jobs_reembed_model_idx", table_name="jobs")
    op.drop_column("jobs", "model_version")
