"""Fast runtimes (ONNX Runtime, OpenVINO, int8) against the torch fp32 reference; ONNX cache;
the overlapped decode pipeline and its stage counters; runtime settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fashionrec_embedder.artifact import export_artifact, reexport
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.network import HeadSpec, MultiTaskNet
from fashionrec_embedder.preprocess import ImageDecodeError, decode_image
from fashionrec_embedder.runtimes import RuntimeUnavailable, resolve_runtime
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.weights import random_backbone
from pydantic import ValidationError

from .conftest import SMALL, encode, pattern_image, small_settings

HEADS = [
    HeadSpec("category", "single_label", ("tee", "skirt", "coat")),
    HeadSpec("texture", "multi_label", ("striped", "polka dot")),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("rt-artifact")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = MultiTaskNet(random_backbone(3, "resnet50"), HEADS, "resnet50")
        for module in net.heads.modules():  # trained-like BatchNorm statistics
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    export_artifact(net.eval(), out / "heads", embedding="heads", image_size=SMALL)
    reexport(out / "heads", out / "pooled", embedding="pooled")
    return {"heads": str(out / "heads"), "pooled": str(out / "pooled")}


@pytest.fixture(scope="module")
def images() -> list:
    return [pattern_image(90 + 9 * i, 70 + 4 * i, seed=i) for i in range(6)]


def _embedder(cache_dir: Path, **overrides: object) -> Embedder:
    settings = small_settings(**overrides)
    model = Embedder(settings.model_copy(update={"cache_dir": cache_dir}))
    model.load()
    return model


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.mark.parametrize("weights", ["random:7", "heads", "pooled"])
def test_every_runtime_matches_torch_fp32(
    weights: str, artifacts: dict[str, str], cache_dir: Path, images: list
) -> None:
    weights = artifacts.get(weights, weights)
    reference = _embedder(cache_dir, weights=weights, runtime="torch")
    expected = reference.embed(images)
    for runtime in ("onnxruntime", "openvino"):
        model = _embedder(cache_dir, weights=weights, runtime=runtime)
        assert model.runtime == runtime
        # Same vectors, so the same version: an index built on one runtime serves the other.
        assert model.model_version == reference.model_version
        got = model.embed(images)
        assert got.shape == expected.shape == (len(images), reference.dim)
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert _min_cos(got, expected) >= 0.999, runtime


def test_openvino_inference_is_pinned_to_f32(cache_dir: Path) -> None:
    model = _embedder(cache_dir, runtime="openvino")
    assert "float32" in model._model.precision  # type: ignore[union-attr]


def test_onnx_export_is_cached_per_version(cache_dir: Path) -> None:
    model = _embedder(cache_dir, runtime="onnxruntime")
    path = model.onnx_file()
    assert path.is_file() and model.model_version in path.name and f"px{SMALL}" in path.name
    stamp = path.stat().st_mtime_ns
    again = Embedder(small_settings(runtime="openvino").model_copy(update={"cache_dir": cache_dir}))
    assert again.prepare() == path and path.stat().st_mtime_ns == stamp  # reused, not re-exported
    other = Embedder(
        small_settings(weights="random:8", runtime="onnxruntime").model_copy(
            update={"cache_dir": cache_dir}
        )
    )
    assert other.onnx_file() != path
    assert not list(path.parent.glob(".*"))  # no temporary files left behind


def test_int8_runs_close_to_fp32_under_its_own_version(cache_dir: Path, images: list) -> None:
    fp32 = _embedder(cache_dir, runtime="onnxruntime")
    expected = fp32.embed(images)
    for runtime in ("onnxruntime", "openvino"):
        model = _embedder(
            cache_dir, runtime=runtime, precision="int8", calibration_images=8, batch_size=8
        )
        assert model.model_version == fp32.model_version + "-int8"
        assert model.onnx_file().name.endswith("-int8.onnx")
        got = model.embed(images)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert _min_cos(got, expected) >= 0.98, runtime


def test_overlapped_decode_equals_inline(random_model: Embedder, cache_dir: Path) -> None:
    blobs = [encode(pattern_image(200 + 10 * i, 160, seed=i), "JPEG", quality=90) for i in range(7)]
    blobs.insert(3, b"not an image")
    inline = _embedder(cache_dir, decode_threads=0)
    overlapped = _embedder(cache_dir, decode_threads=2)
    a, b = inline.embed_bytes(blobs), overlapped.embed_bytes(blobs)
    assert isinstance(a[3], ImageDecodeError) and isinstance(b[3], ImageDecodeError)
    good = [i for i in range(len(blobs)) if i != 3]
    np.testing.assert_array_equal(np.stack([a[i] for i in good]), np.stack([b[i] for i in good]))
    # The same vectors as decoding with draft mode and embedding the images directly.
    decoded = [decode_image(blobs[i], draft_size=SMALL) for i in good]
    np.testing.assert_allclose(np.stack([b[i] for i in good]), overlapped.embed(decoded), atol=1e-6)
    for model in (inline, overlapped):
        assert all(model.stage_seconds[s] > 0 for s in ("decode", "preprocess", "inference"))
        assert abs(sum(model.stage_shares().values()) - 1.0) < 1e-9


def test_sources_propagate_errors_not_caught(cache_dir: Path) -> None:
    model = _embedder(cache_dir, decode_threads=1)

    def broken() -> object:
        raise ConnectionError("storage down")

    with pytest.raises(ConnectionError):
        model.embed_sources([lambda: pattern_image(), broken], catch=(ValueError,))
    out = model.embed_sources([lambda: pattern_image(), broken], catch=(ConnectionError,))
    assert out[0].shape == (model.dim,) and isinstance(out[1], ConnectionError)


def test_runtime_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_RUNTIME", "openvino")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_PRECISION", "int8")
    settings = EmbedderSettings()
    assert (settings.runtime, settings.precision) == ("openvino", "int8")
    assert settings.decode_threads == 1 and settings.calibration_dir is None
    with pytest.raises(ValidationError, match="runtime"):
        EmbedderSettings(runtime="tensorrt")
    with pytest.raises(ValidationError, match="int8"):
        EmbedderSettings(runtime="torch", precision="int8")
    with pytest.raises(ValidationError):
        EmbedderSettings(precision="fp16")
    with pytest.raises(ValidationError):
        EmbedderSettings(decode_threads=-1)


def test_runtime_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu) == "openvino"
    assert resolve_runtime("auto", cpu, "int8") == "openvino"
    assert resolve_runtime("auto", cuda) == "torch"
    assert resolve_runtime("onnxruntime", cpu) == "onnxruntime"
    with pytest.raises(RuntimeUnavailable, match="CPU"):
        resolve_runtime("openvino", cuda)
    with pytest.raises(RuntimeUnavailable, match="int8"):
        resolve_runtime("auto", cuda, "int8")
