"""Database engine and schema migrations (alembic, run programmatically)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from fashionrec_indexer.settings import normalise_database_url

log = logging.getLogger("fashionrec.indexer.db")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


# The API's statements are key and range lookups: a parallel worker (or JIT compilation) never
# pays for itself there, but a planner without statistics can estimate a million-row table
# into one (the delta probe: 7-13 ms to start a worker for a range that holds no rows).
QUERY_PATH_OPTIONS = "-c max_parallel_workers_per_gather=0 -c jit=off"


def make_engine(database_url: str, pool_size: int = 5, options: str | None = None) -> Engine:
    """`options`: server settings for every session (libpq `options`, e.g. QUERY_PATH_OPTIONS)."""
    # pre_ping: a restarted Postgres must not surface as errors on the first requests after it.
    return create_engine(
        normalise_database_url(database_url),
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=10,
        connect_args={"options": options} if options else {},
    )


def wait_for_database(engine: Engine, timeout_s: float = 60.0) -> None:
    """Block until the database answers (compose/systemd start order is not readiness)."""

    @retry(
        retry=retry_if_exception_type(OperationalError),
        stop=stop_after_delay(timeout_s),
        wait=wait_exponential(multiplier=0.2, max=5),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    ping()


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Percent signs would be read as interpolation by configparser.
    config.set_main_option(
        "sqlalchemy.url", normalise_database_url(database_url).replace("%", "%%")
    )
    return config


def migrate(database_url: str, timeout_s: float = 60.0) -> None:
    """Wait for the database, then `alembic upgrade head` (idempotent)."""
    engine = make_engine(database_url, pool_size=1)
    try:
        wait_for_database(engine, timeout_s)
    finally:
        engine.dispose()
    command.upgrade(alembic_config(database_url), "head")
