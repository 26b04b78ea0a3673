"""The serving artifact of a trained model: a directory that loads without pickle or fastai.

    <dir>/model.safetensors   the MultiTaskNet state_dict (tensors only: nothing is executed)
    <dir>/config.json         what the tensors mean, how to feed them, and the model version

config.json (format_version 2; version 1 files are ResNet50 models and still load):

    {"format": "fashionrec-model", "format_version": 2, "architecture": "multitask",
     "backbone": "efficientnet-lite2" | "resnet50" | ...,
     "heads": [{"name": "category", "kind": "single_label", "classes": [...]},
               {"name": "texture", "kind": "multi_label", "classes": [...]}, ...],
     "embedding": {"kind": "heads" | "pooled", "dim": 512 * len(heads) | the backbone's},
     "preprocessing": {"image_size": 224, "mean": [...], "std": [...],  (the backbone's)
                       "resize": "shorter-side, center crop"},
     "attribute_threshold": 0.5,
     "training": {"epochs": ..., "metrics": {...}, ...},
     "model_version": "ft-<12 hex>-heads"}

model_version = "ft-" + the first 12 hex digits of sha256(safetensors bytes + canonical JSON of
the config without model_version) + "-" + embedding kind. It names the content, so any change of
weights, classes, preprocessing or embedding kind gives a new version, and `load_artifact`
refuses a directory whose files no longer match the version they claim.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from fashionrec_shared.files import write_atomic
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fashionrec_embedder.backbones import BACKBONES, Backbone, WeightsError, get_backbone
from fashionrec_embedder.network import (
    HeadSpec,
    MultiTaskNet,
    embedding_dim,
    resolve_head_weights,
)

FORMAT = "fashionrec-model"
FORMAT_VERSION = 2
ARCHITECTURE = "multitask"
# format_version 1 had no backbone field: its architecture named ResNet50.
_V1_ARCHITECTURE = "resnet50-multitask"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RESIZE = "shorter-side, center crop"


class ArtifactError(WeightsError):
    """The artifact directory is missing, malformed, tampered with or does not fit the network."""


# ---- config ---------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: metrics that are not finite become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def content_version(weights: bytes, config: Mapping[str, Any]) -> str:
    body = {k: v for k, v in config.items() if k != "model_version"}
    digest = hashlib.sha256(weights + canonical_json(body)).hexdigest()
    return f"ft-{digest[:12]}-{config['embedding']['kind']}"


def build_config(
    heads: list[HeadSpec],
    *,
    backbone: str,
    embedding: str,
    image_size: int,
    attribute_threshold: float = 0.5,
    training: Mapping[str, Any] | None = None,
    head_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The config without model_version (added by `write_artifact`)."""
    arch = get_backbone(backbone)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "backbone": arch.name,
        "heads": [h.to_json() for h in heads],
        "embedding": {
            "kind": embedding,
            "dim": embedding_dim(embedding, len(heads), arch.feature_dim),
        },
        "preprocessing": {"image_size": int(image_size), **arch.norm.to_json(), "resize": RESIZE},
        "attribute_threshold": float(attribute_threshold),
        "training": _finite(dict(training or {})),
    }
    if head_weights is not None:  # absent when equal: older models keep their version
        config["embedding"]["head_weights"] = [float(w) for w in head_weights]
    return config


def _fail(where: Path, problem: str) -> ArtifactError:
    return ArtifactError(f"model artifact {where}: {problem}")


class HeadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: Literal["single_label", "multi_label"]
    classes: tuple[str, ...] = Field(min_length=1)

    def spec(self) -> HeadSpec:
        return HeadSpec(self.name, self.kind, self.classes)


class EmbeddingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["heads", "pooled"]
    dim: int
    # One weight per head (heads kind): the block of head i is scaled by head_weights[i].
    head_weights: tuple[float, ...] | None = None

    @field_validator("head_weights")
    @classmethod
    def _weights(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None:
            if any(not 0.0 <= w <= 100.0 for w in value):
                raise ValueError("head weights must be between 0 and 100")
            if not any(value):
                raise ValueError("at least one head weight must be above 0")
        return value


class PreprocessingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(strict=True, ge=32, le=1024)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: Literal["shorter-side, center crop"]


class ArtifactConfig(BaseModel):
    """config.json, typed: what the tensors mean, how to feed them, and the model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["fashionrec-model"]
    format_version: Literal[1, 2]
    architecture: str
    backbone: str = "resnet50"  # format_version 1 has no field: all its models are ResNet50
    heads: tuple[HeadConfig, ...]
    embedding: EmbeddingConfig
    preprocessing: PreprocessingConfig
    attribute_threshold: float = Field(gt=0.0, lt=1.0)
    training: dict[str, Any] = Field(default_factory=dict)
    model_version: str

    @field_validator("heads")
    @classmethod
    def _some_heads(cls, heads: tuple[HeadConfig, ...]) -> tuple[HeadConfig, ...]:
        if not heads:
            raise ValueError("'heads' must be a non-empty list")
        return heads

    @model_validator(mode="after")
    def _consistent(self) -> ArtifactConfig:
        expected = _V1_ARCHITECTURE if self.format_version == 1 else ARCHITECTURE
        if self.architecture != expected:
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; this embedder knows {', '.join(BACKBONES)}"
            )
        arch = self.arch
        dim = embedding_dim(self.embedding.kind, len(self.heads), arch.feature_dim)
        if self.embedding.dim != dim:
            raise ValueError(
                f"embedding dim {self.embedding.dim} does not match kind "
                f"{self.embedding.kind!r} with {len(self.heads)} heads (expected {dim})"
            )
        weights = self.embedding.head_weights
        if weights is not None and (
            self.embedding.kind != "heads" or len(weights) != len(self.heads)
        ):
            raise ValueError(
                f"embedding.head_weights needs kind 'heads' and one weight per head "
                f"({len(self.heads)}), got {len(weights)} for kind {self.embedding.kind!r}"
            )
        # Serving normalises as the backbone was trained to see images.
        for key, want in (("mean", arch.norm.mean), ("std", arch.norm.std)):
            got = getattr(self.preprocessing, key)
            if any(abs(a - b) >= 1e-4 for a, b in zip(got, want, strict=True)):
                raise ValueError(f"preprocessing.{key} {list(got)} is not the {arch.name} one")
        return self

    @property
    def arch(self) -> Backbone:
        return get_backbone(self.backbone)

    @property
    def head_specs(self) -> list[HeadSpec]:
        return [head.spec() for head in self.heads]


def _problems(exc: ValidationError) -> str:
    """`field.path: what is wrong` for each error, without pydantic's prefixes."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "config"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def validate_config(config: Any, where: Path) -> ArtifactConfig:
    """Check every field serving relies on; returns the typed config."""
    if not isinstance(config, dict):
        raise _fail(where, "config.json must hold a JSON object")
    if config.get("format") != FORMAT:
        raise _fail(
            where,
            f"config.json has format {config.get('format')!r}, expected {FORMAT!r} "
            "(is this a fashionrec model directory written by `fashionrec-embedder train`?)",
        )
    if config.get("format_version") not in (1, FORMAT_VERSION):
        raise _fail(
            where,
            f"unsupported format_version {config.get('format_version')!r}; this embedder reads "
            f"format_version 1 and {FORMAT_VERSION}",
        )
    try:
        return ArtifactConfig.model_validate(config)
    except ValidationError as exc:
        raise _fail(where, _problems(exc)) from exc


def artifact_dir(path: Path | str) -> Path:
    """The artifact directory for a path to it or to its config.json."""
    path = Path(path).expanduser()
    return path.parent if path.name == CONFIG_NAME and path.is_file() else path


def is_artifact(path: Path | str) -> bool:
    path = Path(path).expanduser()
    return (path.is_dir() and (path / CONFIG_NAME).is_file()) or (
        path.name == CONFIG_NAME and path.is_file()
    )


def read_config(path: Path | str) -> dict[str, Any]:
    """Read and validate config.json as stored (does not read the weights)."""
    where = artifact_dir(path)
    config_path = where / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise _fail(where, f"no {CONFIG_NAME} in the directory") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(where, f"cannot read {CONFIG_NAME}: {exc}") from exc
    validate_config(config, where)
    return config


def load_config(path: Path | str) -> ArtifactConfig:
    """The typed config.json of a model directory (does not read the weights)."""
    return validate_config(read_config(path), artifact_dir(path))


def read_weights(path: Path | str, config: Mapping[str, Any]) -> bytes:
    """The safetensors bytes, checked against the model_version the config claims."""
    where = artifact_dir(path)
    try:
        data = (where / WEIGHTS_NAME).read_bytes()
    except OSError as exc:
        raise _fail(where, f"cannot read {WEIGHTS_NAME}: {exc}") from exc
    expected = content_version(data, config)
    if config["model_version"] != expected:
        raise _fail(
            where,
            f"model_version {config['model_version']!r} does not match the content "
            f"({expected!r}): config.json or {WEIGHTS_NAME} was changed after export. "
            "Export the model again instead of editing its files",
        )
    return data


# ---- export / load --------------------------------------------------------------------------


def write_artifact(out_dir: Path | str, weights: bytes, config: Mapping[str, Any]) -> dict:
    """Write weights + config (model_version computed here) into `out_dir`; returns the config."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    final = {k: v for k, v in config.items() if k != "model_version"}
    final["model_version"] = content_version(weights, final)
    validate_config(final, out)
    write_atomic(out / WEIGHTS_NAME, weights)
    text = json.dumps(final, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_atomic(out / CONFIG_NAME, text.encode())
    return final


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted.

    safetensors writes the header from a hash map, so the same tensors can give different bytes
    from run to run; sorting makes the bytes (and so the model_version) a function of the
    content. The tensor data and its offsets are unchanged; the header stays space-padded to 8.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def state_dict_bytes(model: MultiTaskNet) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return _canonical_header(save(state, metadata={"format": "pt", "fashionrec": FORMAT}))


def export_artifact(
    model: MultiTaskNet,
    out_dir: Path | str,
    *,
    embedding: str = "heads",
    image_size: int = 224,
    attribute_threshold: float = 0.5,
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Save `model` as a serving artifact (with its head weights); returns the written config."""
    config = build_config(
        model.heads_spec,
        backbone=model.backbone,
        embedding=embedding,
        image_size=image_size,
        attribute_threshold=attribute_threshold,
        training=training,
        head_weights=model.head_weights if embedding == "heads" else None,
    )
    return write_artifact(out_dir, state_dict_bytes(model), config)


def reexport(
    src: Path | str,
    out_dir: Path | str,
    *,
    embedding: str,
    head_weights: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Copy an artifact with another embedding kind or head weights (same weights, new
    model_version). `head_weights`: {head name: weight}, heads not named weigh 1; None keeps
    the source's (for the heads kind)."""
    config = read_config(src)
    weights = read_weights(src, config)
    typed = validate_config(config, artifact_dir(src))
    config = dict(config)
    dim = embedding_dim(embedding, len(typed.heads), typed.arch.feature_dim)
    config["embedding"] = {"kind": embedding, "dim": dim}
    if head_weights:
        if embedding != "heads":
            raise ArtifactError("head weights need the heads embedding")
        try:
            resolved = resolve_head_weights(typed.head_specs, head_weights)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from exc
        if resolved is not None:
            config["embedding"]["head_weights"] = list(resolved)
    elif embedding == "heads" and typed.embedding.head_weights is not None:
        config["embedding"]["head_weights"] = list(typed.embedding.head_weights)
    return write_artifact(out_dir, weights, config)


def load_artifact(path: Path | str) -> tuple[MultiTaskNet, ArtifactConfig]:
    """Load an exported model on CPU in eval mode; never unpickles anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = artifact_dir(path)
    raw = read_config(where)
    config = validate_config(raw, where)
    data = read_weights(where, raw)
    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _fail(where, f"{WEIGHTS_NAME} is not a valid safetensors file: {exc}") from exc
    body = config.arch.build(config.preprocessing.image_size)
    model = MultiTaskNet(
        body, config.head_specs, config.arch.name, head_weights=config.embedding.head_weights
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _fail(
            where, f"{WEIGHTS_NAME} does not fit the network config.json describes: {exc}"
        ) from exc
    return model.eval(), config
