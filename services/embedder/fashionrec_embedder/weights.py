"""Where the ResNet50 weights come from, and the model version string derived from that source.

`weights` setting:
- a file path: a torchvision ResNet50 state_dict (.pt/.pth read with
  `torch.load(weights_only=True)`, so no arbitrary object is ever unpickled) or a .safetensors
  file; classifier keys (fc.*) are dropped;
- `imagenet`: torchvision's IMAGENET1K_V2 weights, downloaded once into `cache_dir`;
- `random:SEED`: deterministic random weights, for tests and smoke runs only;
- a DIRECTORY written by `fashionrec-embedder train`/`export` (or its config.json): a fine-tuned
  multi-task model served as a whole (see artifact.py); its config names the version.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

log = logging.getLogger("fashionrec.embedder.weights")

EMBEDDING_DIM = 2048
IMAGENET_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2
_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RANDOM_RE = re.compile(r"^random:(\d{1,18})$")
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


class WeightsError(RuntimeError):
    """The configured weights cannot be used; the message says what to do instead."""


@dataclass(frozen=True)
class WeightsSource:
    kind: Literal["imagenet", "random", "file", "artifact"]
    seed: int | None = None
    path: Path | None = None

    @property
    def label(self) -> str:
        if self.kind == "random":
            return f"random:{self.seed}"
        return str(self.path) if self.kind in ("file", "artifact") else "imagenet"


def parse_weights(spec: str) -> WeightsSource:
    """Parse the `weights` setting; a file path must exist."""
    spec = spec.strip()
    if spec.lower() == "imagenet":
        return WeightsSource("imagenet")
    if spec.lower().startswith("random"):
        match = _RANDOM_RE.match(spec.lower())
        if not match:
            raise WeightsError(f"bad weights {spec!r}: use random:SEED with SEED a whole number")
        return WeightsSource("random", seed=int(match.group(1)))
    path = Path(spec).expanduser()
    # Imported here: artifact.py imports this module.
    from fashionrec_embedder.artifact import artifact_dir, is_artifact

    if is_artifact(path):
        return WeightsSource("artifact", path=artifact_dir(path).resolve())
    if path.is_dir():
        raise WeightsError(
            f"weights directory {str(path)!r} has no config.json; pass the directory a "
            "`fashionrec-embedder train --out DIR` wrote, or a ResNet50 state_dict file"
        )
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist; pass --weights PATH to a ResNet50 "
            "state_dict (.pt/.pth/.safetensors), 'imagenet', or random:SEED for testing"
        )
    return WeightsSource("file", path=path.resolve())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_version(source: WeightsSource, image_size: int = 224) -> str:
    """A short id of the weights; embeddings of different versions are never compared.

    The input size changes the embeddings too, so a non-default size is part of the version.
    A trained artifact carries its own version (content hash; its config fixes the size).
    """
    if source.kind == "artifact":
        from fashionrec_embedder.artifact import read_config

        assert source.path is not None
        return str(read_config(source.path)["model_version"])
    if source.kind == "imagenet":
        version = "resnet50-imagenet1k-v2"
    elif source.kind == "random":
        version = f"resnet50-random-s{source.seed}"
    else:
        assert source.path is not None
        version = f"resnet50-file-{file_sha256(source.path)[:12]}"
    if image_size != 224:
        version += f"-px{image_size}"
    assert _VERSION_RE.match(version), version
    return version


def new_backbone() -> nn.Module:
    """ResNet50 without its classifier: outputs the 2048-d global-average-pooled features."""
    model = resnet50(weights=None)
    model.fc = nn.Identity()
    return model


def random_backbone(seed: int) -> nn.Module:
    # fork_rng keeps the caller's global RNG untouched; init runs on CPU so the same seed gives
    # bit-identical weights on one machine.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_backbone()


def imagenet_state_dict(cache_dir: Path) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, downloaded once into `cache_dir` (hash checked)."""
    hub_dir = Path(cache_dir).expanduser() / "torch-hub"
    torch.hub.set_dir(str(hub_dir))
    try:
        return torch.hub.load_state_dict_from_url(
            IMAGENET_WEIGHTS.url,
            model_dir=str(hub_dir / "checkpoints"),
            map_location="cpu",
            progress=False,
            check_hash=True,
            weights_only=True,
        )
    except (URLError, OSError, RuntimeError) as exc:
        raise WeightsError(
            f"could not download the ImageNet weights ({IMAGENET_WEIGHTS.url}) into "
            f"{hub_dir}: {exc}. Without network access, put a ResNet50 weights file on this "
            "machine and pass --weights PATH (or FASHIONREC_EMBEDDER_WEIGHTS=PATH); for tests "
            "only, use --weights random:SEED"
        ) from exc


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


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the classifier head and DataParallel prefixes."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("fc."):
            continue
        cleaned[key] = value
    return cleaned


def load_backbone(source: WeightsSource, cache_dir: Path) -> nn.Module:
    """Build the feature extractor on CPU with the weights of `source`."""
    if source.kind == "random":
        assert source.seed is not None
        log.warning(
            "using RANDOM weights (seed %d): embeddings are deterministic but meaningless; "
            "never use them for a real shop",
            source.seed,
        )
        return random_backbone(source.seed)
    if source.kind == "imagenet":
        state = imagenet_state_dict(cache_dir)
    elif source.kind == "artifact":  # a trained model's body, e.g. to train further from it
        from fashionrec_embedder.artifact import load_artifact

        assert source.path is not None
        return load_artifact(source.path)[0].body
    else:
        assert source.path is not None
        state = file_state_dict(source.path)
    model = new_backbone()
    try:
        model.load_state_dict(clean_state_dict(state), strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"weights {source.label} do not fit torchvision's ResNet50: {str(exc)[:500]}"
        ) from exc
    return model


def ensure_available(source: WeightsSource, cache_dir: Path) -> None:
    """Fetch downloadable weights once, before worker processes start (they would race)."""
    if source.kind == "imagenet":
        imagenet_state_dict(cache_dir)
    elif source.kind == "artifact":  # validate config and content hash before forking
        from fashionrec_embedder.artifact import read_config, read_weights

        assert source.path is not None
        read_weights(source.path, read_config(source.path))
