"""Embedder settings (env prefix FASHIONREC_EMBEDDER_); storage/broker from ServiceSettings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fashionrec_shared.settings import ServiceSettings
from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict


class EmbedderSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FASHIONREC_EMBEDDER_", extra="ignore", env_nested_delimiter="__"
    )

    weights: str = Field(
        default="imagenet",
        description="'imagenet', 'random:SEED' (tests only) or a path to a .pt/.pth/.safetensors "
        "ResNet50 state_dict",
    )
    # During a model change workers also hold the model(s) the live index still serves, so
    # queries keep working and new items are embedded under both versions until the swap.
    previous_weights: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated weights specs of models to keep loaded besides `weights`",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=16, ge=1, le=1024)
    image_size: int = Field(default=224, ge=32, le=1024)
    cache_dir: Path = Path("~/.cache/fashionrec")
    concurrency: int = Field(default=1, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1, le=256)
    # Same default as the gateway's limit; the embedder re-checks because it decodes blobs itself.
    max_image_pixels: int = Field(default=40_000_000, ge=1)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("previous_weights", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("weights")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("weights must not be empty")
        return value
