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


def make_engine(database_url: str, pool_size: int = 5) -> Engine:
    # pre_ping: a restarted Postgres must not surface as errors on the first requests after it.
    return create_engine(
        normalise_database_url(database_url),
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=10,
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
