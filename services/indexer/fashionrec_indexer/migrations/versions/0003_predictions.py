"""model predictions: embeddings.predicted (JSONB) and embeddings.predicted_category

A trained model's heads predict a category and attributes for every image it embeds; they are
stored with the vector, per (image sha256, model version). NULL for a model without heads.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: adding them rewrites no rows.
    op.add_column("embeddings", sa.Column("predicted", JSONB, nullable=True))
    op.add_column("embeddings", sa.Column("predicted_category", sa.Text, nullable=True))
    # Items of a version by predicted category (rows without a prediction are left out).
    op.create_index(
        "embeddings_predicted_category_idx",
        "embeddings",
        ["model_version", "predicted_category"],
        postgresql_where=sa.text("predicted_category IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("embeddings_predicted_category_idx", table_name="embeddings")
    op.drop_column("embeddings", "predicted_category")
    op.drop_column("embeddings", "predicted")
