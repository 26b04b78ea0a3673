"""The served model: PIL images → L2-normalised float32 embeddings.

Either torchvision's ResNet50 body (2048-d pooled features; weights imagenet/random/file) or a
trained multi-task artifact (artifact.py), which fixes its own embedding kind, dimension, input
size and model version.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from fashionrec_embedder.artifact import load_artifact, read_config
from fashionrec_embedder.preprocess import image_to_tensor
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.weights import (
    EMBEDDING_DIM,
    WeightsError,
    WeightsSource,
    load_backbone,
    model_version,
    parse_weights,
)

log = logging.getLogger("fashionrec.embedder.model")


class ModelNotLoaded(RuntimeError):
    pass


def resolve_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    return torch.device("cuda" if available else "cpu")


class _ArtifactEmbedding(nn.Module):
    """A trained MultiTaskNet seen as a feature extractor of the configured embedding kind."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x, self.kind)


class Embedder:
    """Holds one model; `load()` once per process (after fork), then `embed()` many times."""

    def __init__(self, settings: EmbedderSettings) -> None:
        self.settings = settings
        self.source: WeightsSource = parse_weights(settings.weights)
        self.config: dict[str, object] | None = None
        self.dim: int = EMBEDDING_DIM
        # The input size the model expects: an artifact's config overrides the setting.
        self.image_size: int = settings.image_size
        if self.source.kind == "artifact":
            assert self.source.path is not None
            config = read_config(self.source.path)
            self.config = config
            self.dim = int(config["embedding"]["dim"])
            self.image_size = int(config["preprocessing"]["image_size"])
            self.model_version: str = str(config["model_version"])
            if self.image_size != settings.image_size:
                log.info(
                    "model %s fixes image_size=%d (setting image_size=%d is ignored)",
                    self.model_version,
                    self.image_size,
                    settings.image_size,
                )
        else:
            self.model_version = model_version(self.source, settings.image_size)
        self.device: torch.device | None = None
        self.load_seconds: float | None = None
        self._model: nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Build the model, move it to the device and run one warm-up pass. Idempotent."""
        with self._lock:
            if self._model is not None:
                return
            started = time.perf_counter()
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            device = resolve_device(self.settings.device)
            if self.source.kind == "artifact":
                assert self.source.path is not None and self.config is not None
                net, config = load_artifact(self.source.path)  # checks the content hash
                if config["model_version"] != self.model_version:
                    raise WeightsError(
                        f"model artifact {self.source.path} changed while loading "
                        f"({self.model_version} → {config['model_version']}); restart"
                    )
                model = _ArtifactEmbedding(net, str(config["embedding"]["kind"]))
            else:
                model = load_backbone(self.source, self.settings.cache_dir)
            # channels_last lets oneDNN (CPU) and cuDNN pick their fastest convolution kernels.
            model = model.to(device=device, memory_format=torch.channels_last).eval()
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            self._model, self.device = model, device
            # The first pass allocates buffers and picks kernels; do it now, not on a request.
            self._forward(torch.zeros(1, 3, self.image_size, self.image_size))
            self.load_seconds = time.perf_counter() - started
            log.info(
                "model %s loaded on %s in %.2fs (threads=%d, batch_size=%d, image_size=%d)",
                self.model_version,
                device,
                self.load_seconds,
                torch.get_num_threads(),
                self.settings.batch_size,
                self.image_size,
            )

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        if self._model is None or self.device is None:
            raise ModelNotLoaded("call load() before embed()")
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True).contiguous(
                memory_format=torch.channels_last
            )
            features = self._model(x).float()
            features = nn.functional.normalize(features, p=2.0, dim=1)
            return features.cpu().numpy().astype(np.float32, copy=False)

    def embed_tensors(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """Preprocessed (3, S, S) tensors → (N, dim) float32 unit vectors, in batches."""
        if not tensors:
            return np.empty((0, self.dim), dtype=np.float32)
        size = self.settings.batch_size
        parts = [
            self._forward(torch.stack(tensors[i : i + size])) for i in range(0, len(tensors), size)
        ]
        return np.concatenate(parts, axis=0)

    def embed(self, batch: list[Image.Image]) -> np.ndarray:
        """RGB PIL images → (N, dim) float32 L2-normalised embeddings."""
        if not batch:
            return np.empty((0, self.dim), dtype=np.float32)
        if self._model is None:
            raise ModelNotLoaded("call load() before embed()")
        size = self.image_size
        return self.embed_tensors([image_to_tensor(img, size) for img in batch])

    def describe(self) -> dict[str, object]:
        return {
            "model_version": self.model_version,
            "dim": self.dim,
            "device": str(self.device) if self.device else None,
        }
