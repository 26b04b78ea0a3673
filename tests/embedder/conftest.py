"""Fixtures for the embedder tests: small images, small-input random models (fast on CPU)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.settings import EmbedderSettings
from PIL import Image

SMALL = 64  # input size for unit tests: ~12x cheaper than 224


def pattern_image(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric RGB image (JPEG-friendly; rotations change it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    arr = np.stack(
        [
            (base[0] + 200 * x / width) % 256,
            (base[1] + 150 * y / height) % 256,
            (base[2] + 100 * (x + 2 * y) / (width + height)) % 256,
        ],
        axis=-1,
    )
    return Image.fromarray(arr.astype(np.uint8))


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def small_settings(tmp_path: Path | None = None, **overrides: object) -> EmbedderSettings:
    values: dict[str, object] = {
        # ResNet50 (the paper's backbone) for most unit tests; tests/embedder/test_backbones.py
        # covers the EfficientNet-Lite ones.
        "backbone": "resnet50",
        "weights": "random:7",
        "device": "cpu",
        "image_size": SMALL,
        "batch_size": 4,
        # Eager torch: no ONNX export per test model (tests/embedder/test_runtimes.py covers
        # the exported runtimes against it).
        "runtime": "torch",
    }
    if tmp_path is not None:
        values["cache_dir"] = tmp_path / "cache"
    values.update(overrides)
    return EmbedderSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _resnet50_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read from the environment (CLI, worker processes) use ResNet50 here too."""
    monkeypatch.setenv("FASHIONREC_EMBEDDER_BACKBONE", "resnet50")


@pytest.fixture(scope="session")
def random_model() -> Embedder:
    """One loaded random:7 model at 64 px, shared by the tests that only read it."""
    model = Embedder(small_settings())
    model.load()
    return model
