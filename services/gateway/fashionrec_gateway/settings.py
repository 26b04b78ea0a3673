"""Gateway settings (env prefix FASHIONREC_GATEWAY_); storage/broker read their own prefixes."""

from __future__ import annotations

from typing import Annotated, Any

from fashionrec_shared.limits import MAX_IMAGE_PIXELS
from fashionrec_shared.schemas import MAX_BATCH_ITEMS
from fashionrec_shared.settings import ServiceSettings
from limits import parse_many
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

RATE_HELP = (
    "per-client limit, `limits` notation: '60/minute', '10/second;300/hour' (all apply). "
    "Off (None) by default: behind a proxy whose X-Forwarded-For is not trusted "
    "(trusted_proxies) every client has the proxy's address and would share one limit"
)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FASHIONREC_GATEWAY_", extra="ignore", env_nested_delimiter="__"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    indexer_url: str = "http://127.0.0.1:8001"
    indexer_timeout_s: float = Field(default=10.0, gt=0, description="per indexer HTTP call")
    public_url: str | None = Field(
        default=None, description="base of image URLs; default: the request's base URL"
    )
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=MAX_IMAGE_PIXELS, gt=0)
    max_batch_items: int = Field(
        default=64, ge=1, le=MAX_BATCH_ITEMS, description="items per POST /v1/items/batch"
    )
    max_batch_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="request body limit of POST /v1/items/batch"
    )
    embed_timeout_s: float = Field(default=30.0, gt=0)
    query_cache_ttl_s: int = Field(default=86400, ge=0, description="0 disables the cache")
    api_key: SecretStr | None = Field(
        default=None, description="when set, POST/DELETE calls need the X-API-Key header"
    )
    workers: int = Field(default=1, ge=1)
    retry_after_s: int = Field(
        default=5,
        ge=1,
        description="Retry-After (seconds) of 503/504 answers: a dependency (storage, broker, "
        "embedder, indexer, its database) is down or too slow",
    )
    rate_limit_search: str | None = Field(default=None, description=f"POST /v1/search: {RATE_HELP}")
    rate_limit_writes: str | None = Field(
        default=None, description=f"POST /v1/items, /v1/items/batch, /v1/jobs, DELETE: {RATE_HELP}"
    )
    trusted_proxies: int = Field(
        default=0,
        ge=0,
        description="reverse proxies in front of the gateway that append the client address "
        "to X-Forwarded-For: the client is the entry this many places from its end. 0: the "
        "header is ignored (anyone can forge it) and the client is the connection's peer",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins (comma-separated, or '*') whose pages may call the API from a "
        "browser; empty (default): no CORS headers, browsers allow same-origin pages only",
    )

    @field_validator("rate_limit_search", "rate_limit_writes")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_many(value)  # ValueError on a typo: at startup, not on the first request
        return value.strip()

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        # A browser's Origin header never ends with a slash, so a configured one would not match.
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [str(o).strip().rstrip("/") for o in value if str(o).strip()]
        return value

    @model_validator(mode="after")
    def _production_needs_api_key(self) -> GatewaySettings:
        # A public write API without a key is fine on a laptop, never in production.
        if self.environment == "production" and (
            self.api_key is None or not self.api_key.get_secret_value()
        ):
            raise ValueError("environment=production needs FASHIONREC_GATEWAY_API_KEY")
        if self.public_url is not None:
            self.public_url = self.public_url.rstrip("/") or None
        return self
