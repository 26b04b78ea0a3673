"""Indexer settings (env prefix FASHIONREC_INDEXER_; the database URL also as DATABASE_URL)."""

from __future__ import annotations

from pathlib import Path

from fashionrec_shared.settings import ServiceSettings
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict


def normalise_database_url(url: str) -> str:
    """Point plain Postgres URLs at the psycopg2 driver; socket URLs (`?host=/dir`) pass as is."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    raise ValueError(f"database_url must be a postgresql:// URL, got {url.split(':', 1)[0]}://…")


class IndexerSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FASHIONREC_INDEXER_",
        extra="ignore",
        env_nested_delimiter="__",
        populate_by_name=True,
    )

    database_url: str = Field(
        validation_alias=AliasChoices(
            "FASHIONREC_INDEXER_DATABASE_URL", "DATABASE_URL", "database_url"
        ),
    )
    host: str = "127.0.0.1"
    port: int = 8001
    index_dir: Path = Path("data/index-cache")
    n_trees: int = Field(default=50, ge=1)
    search_k: int = -1
    rebuild_min_new: int = Field(default=1000, ge=1)
    rebuild_interval_s: float = Field(default=600, gt=0)
    refresh_interval_s: float = Field(default=1.0, gt=0)
    # How long a writer's transaction may take to commit; see repository.settled_change_seq.
    settle_s: float = Field(default=30.0, ge=0)

    @field_validator("database_url")
    @classmethod
    def _driver(cls, value: str) -> str:
        return normalise_database_url(value)
