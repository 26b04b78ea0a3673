"""Alembic environment: online migrations only, URL from the Config the indexer builds.

`target_metadata` is fashionrec_indexer.schema: `alembic check` (tests/indexer/test_schema.py)
compares it, server defaults included, with a database the migrations built.
"""

from __future__ import annotations

from alembic import context
from fashionrec_indexer.schema import metadata
from sqlalchemy import engine_from_config, pool

config = context.config


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            compare_type=True,
            compare_server_default=True,
        )
        with context.begin_transaction():
            # Two indexer processes migrating at once must not race on the DDL.
            context.execute("SELECT pg_advisory_xact_lock(7423001)")
            context.run_migrations()


run_migrations_online()
