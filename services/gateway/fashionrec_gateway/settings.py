"""Gateway settings (env prefix FASHIONREC_GATEWAY_); storage/broker read their own prefixes."""

from __future__ import annotations

from fashionrec_shared.limits import MAX_IMAGE_PIXELS
from fashionrec_shared.schemas import MAX_BATCH_ITEMS
from fashionrec_shared.settings import ServiceSettings
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict


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
