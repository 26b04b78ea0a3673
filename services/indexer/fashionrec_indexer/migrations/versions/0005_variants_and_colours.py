"""variants and colours: items.variant_group (+ index) and items.colours

`variant_group` names the product an item is a variant of (colourway, size): results show one
item per group unless collapse=false. `colours` holds the dominant colours of the item's current
image (a list of fashionrec_shared.tasks.Colour as JSON), stored with its embedding; NULL until
the image is embedded (or by an embedder older than colours).

Revision ID: 0005
Revises: 0004
Create Date: 2025-03-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: Postgres adds both columns without rewriting the table.
    op.add_column("items", sa.Column("variant_group", sa.Text, nullable=True))
    op.add_column("items", sa.Column("colours", JSONB(none_as_null=True), nullable=True))
    op.create_index("items_variant_group_idx", "items", ["variant_group"])


def downgrade() -> None:
    op.drop_index("items_variant_group_idx", table_name="items")
    op.drop_column("items", "colours")
    op.drop_column("items", "variant_group")
