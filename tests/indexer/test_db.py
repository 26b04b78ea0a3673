from __future__ import annotations

import pytest
from fashionrec_indexer.db import make_engine, migrate
from fashionrec_indexer.settings import IndexerSettings, normalise_database_url
from sqlalchemy import inspect, text


def test_migrations_apply_on_empty_database_and_are_idempotent(database_url: str) -> None:
    migrate(database_url, timeout_s=10)
    migrate(database_url, timeout_s=10)  # second run is a no-op
    engine = make_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"items", "embeddings", "index_builds", "jobs", "job_items"} <= tables
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"
            assert conn.execute(text("SELECT nextval('items_change_seq')")).scalar() >= 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@db:5432/app", "postgresql+psycopg2://u:p@db:5432/app"),
        ("postgres://u@db/app", "postgresql+psycopg2://u@db/app"),
        (
            "postgresql://postgres:@/dbname?host=/tmp/sock",
            "postgresql+psycopg2://postgres:@/dbname?host=/tmp/sock",
        ),
        ("postgresql+psycopg2://u@h/d", "postgresql+psycopg2://u@h/d"),
    ],
)
def test_database_url_is_normalised(url: str, expected: str) -> None:
    assert normalise_database_url(url) == expected
    assert IndexerSettings(database_url=url).database_url == expected


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASHIONREC_INDEXER_DATABASE_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@h/d")
    monkeypatch.setenv("FASHIONREC_INDEXER_N_TREES", "7")
    monkeypatch.setenv("FASHIONREC_INDEXER_REBUILD_MIN_NEW", "3")
    settings = IndexerSettings()  # type: ignore[call-arg]
    assert settings.database_url == "postgresql+psycopg2://x@h/d"
    assert settings.n_trees == 7
    assert settings.rebuild_min_new == 3
    assert settings.port == 8001
    monkeypatch.setenv("FASHIONREC_INDEXER_DATABASE_URL", "postgresql://y@h/d")
    assert IndexerSettings().database_url == "postgresql+psycopg2://y@h/d"  # type: ignore[call-arg]


def test_socket_url_connects(migrated_url: str) -> None:
    # The fixture database may be a Unix-socket URL (embedded Postgres); it must work as given.
    engine = make_engine(migrated_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
