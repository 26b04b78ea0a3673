"""Settings sections every service composes into its own pydantic-settings class.

Each service owns a class with its own env prefix (FASHIONREC_GATEWAY_, FASHIONREC_INDEXER_,
FASHIONREC_EMBEDDER_); storage and broker sections read their own prefixes so that one env file
configures all services the same way. Instances are built in startup hooks, never at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageSettings(BaseSettings):
    """Where images and index files live: a local directory or any S3 endpoint (MinIO)."""

    model_config = SettingsConfigDict(
        env_prefix="FASHIONREC_STORAGE_", extra="ignore", populate_by_name=True
    )

    backend: Literal["local", "s3"] | None = None
    local_dir: Path = Path("data/blobs")
    s3_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "FASHIONREC_STORAGE_S3_ENDPOINT", "S3_ENDPOINT", "s3_endpoint"
        ),
        description="host:port or http(s)://host:port of the S3 server",
    )
    s3_access_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "FASHIONREC_STORAGE_S3_ACCESS_KEY", "S3_ACCESS_KEY", "s3_access_key"
        ),
    )
    s3_secret_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "FASHIONREC_STORAGE_S3_SECRET_KEY", "S3_SECRET_KEY", "s3_secret_key"
        ),
    )
    s3_bucket: str = Field(
        default="fashionrec",
        validation_alias=AliasChoices("FASHIONREC_STORAGE_S3_BUCKET", "S3_BUCKET", "s3_bucket"),
    )
    s3_secure: bool = False
    s3_region: str | None = None
    s3_create_bucket: bool = True

    @model_validator(mode="after")
    def _resolve_backend(self) -> StorageSettings:
        # An endpoint given without a backend means S3; an explicit scheme decides TLS.
        if self.backend is None:
            self.backend = "s3" if self.s3_endpoint else "local"
        if self.s3_endpoint and "://" in self.s3_endpoint:
            parts = urlsplit(self.s3_endpoint)
            self.s3_secure = parts.scheme == "https"
            self.s3_endpoint = parts.netloc
        if self.backend == "s3" and not self.s3_endpoint:
            raise ValueError("storage backend 's3' needs FASHIONREC_STORAGE_S3_ENDPOINT")
        return self


class BrokerSettings(BaseSettings):
    """Celery broker and result backend (Redis)."""

    model_config = SettingsConfigDict(
        env_prefix="FASHIONREC_BROKER_", extra="ignore", populate_by_name=True
    )

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("FASHIONREC_BROKER_URL", "REDIS_URL", "url"),
    )
    result_url: str | None = None

    @property
    def result_backend(self) -> str:
        return self.result_url or self.url


class ServiceSettings(BaseSettings):
    """Fields common to every service; subclasses set their own env prefix."""

    model_config = SettingsConfigDict(extra="ignore", env_nested_delimiter="__")

    environment: Literal["development", "production"] = "development"
    log_level: str = "INFO"
    storage: StorageSettings = Field(default_factory=StorageSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
