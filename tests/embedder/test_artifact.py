"""The serving artifact: export/load round trip, tamper and malformed-config refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fashionrec_embedder.artifact import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ArtifactError,
    export_artifact,
    load_artifact,
    read_config,
    reexport,
    write_artifact,
)
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.network import HeadSpec, MultiTaskNet
from fashionrec_embedder.preprocess import image_to_tensor
from fashionrec_embedder.weights import (
    WeightsError,
    ensure_available,
    parse_weights,
    random_backbone,
)

from .conftest import pattern_image, small_settings

HEADS = [
    HeadSpec("category", "single_label", ("tee", "skirt", "coat")),
    HeadSpec("texture", "multi_label", ("striped", "polka dot")),
]
SIZE = 64


def _net(seed: int = 0) -> MultiTaskNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MultiTaskNet(random_backbone(seed, "resnet50"), HEADS, "resnet50")
    # Non-trivial BatchNorm statistics, as after training.
    with torch.no_grad():
        for module in net.heads.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultiTaskNet, Path]:
    out = tmp_path_factory.mktemp("artifact") / "model"
    net = _net()
    export_artifact(net, out, embedding="heads", image_size=SIZE, training={"epochs": 0})
    return net, out


def test_export_writes_safetensors_and_a_versioned_config(
    exported: tuple[MultiTaskNet, Path],
) -> None:
    _, out = exported
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["format"] == "fashionrec-model" and config["format_version"] == 2
    assert config["architecture"] == "multitask" and config["backbone"] == "resnet50"
    assert config["heads"][0] == {
        "name": "category",
        "kind": "single_label",
        "classes": ["tee", "skirt", "coat"],
    }
    assert config["embedding"] == {"kind": "heads", "dim": 1024}
    assert config["preprocessing"]["image_size"] == SIZE
    assert config["preprocessing"]["resize"] == "shorter-side, center crop"
    assert config["model_version"].startswith("ft-") and config["model_version"].endswith("-heads")
    assert len(config["model_version"]) == len("ft-") + 12 + len("-heads")
    assert not (out / WEIGHTS_NAME).read_bytes().startswith(b"\x80")  # not a pickle


@pytest.mark.parametrize("kind", ["heads", "pooled"])
def test_embedder_serves_the_artifact_like_the_in_memory_model(
    exported: tuple[MultiTaskNet, Path], tmp_path: Path, kind: str
) -> None:
    net, out = exported
    if kind == "pooled":
        out = tmp_path / "pooled"
        config = reexport(exported[1], out, embedding="pooled")
        assert config["embedding"] == {"kind": "pooled", "dim": 2048}
        assert config["model_version"].endswith("-pooled")
    images = [pattern_image(90 + 5 * i, 70, seed=i) for i in range(5)]
    # The weights setting accepts the directory or its config.json; image_size comes from it.
    model = Embedder(small_settings(weights=str(out / CONFIG_NAME), image_size=224))
    assert model.image_size == SIZE and model.model_version == read_config(out)["model_version"]
    model.load()
    got = model.embed(images)
    with torch.no_grad():
        expected = net.embed(torch.stack([image_to_tensor(img, SIZE) for img in images]), kind)
    assert got.shape == (5, model.dim) and got.dtype == np.float32
    assert model.dim == (1024 if kind == "heads" else 2048)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert model.describe()["dim"] == model.dim


def test_model_version_follows_the_content(
    exported: tuple[MultiTaskNet, Path], tmp_path: Path
) -> None:
    net, out = exported
    version = read_config(out)["model_version"]
    again = export_artifact(
        net, tmp_path / "same", embedding="heads", image_size=SIZE, training={"epochs": 0}
    )
    assert again["model_version"] == version  # deterministic
    changed = _net()
    with torch.no_grad():
        changed.heads[0].classifier.bias.add_(0.01)
    other = export_artifact(
        changed, tmp_path / "other", embedding="heads", image_size=SIZE, training={"epochs": 0}
    )
    assert other["model_version"] != version


def test_loading_never_imports_fastai(exported: tuple[MultiTaskNet, Path], tmp_path: Path) -> None:
    _, out = exported
    code = (
        "import sys\n"
        "from fashionrec_embedder.model import Embedder\n"
        "from fashionrec_embedder.settings import EmbedderSettings\n"
        "from PIL import Image\n"
        # The serving default runtime (auto), with its ONNX cache in this test's directory.
        f"m = Embedder(EmbedderSettings(weights={str(out)!r}, device='cpu',"
        f" cache_dir={str(tmp_path)!r}))\n"
        "m.load()\n"
        "v = m.embed([Image.new('RGB', (80, 60), 'red')])\n"
        "assert v.shape == (1, m.dim), v.shape\n"
        "bad = [n for n in sys.modules if n == 'fastai' or n.startswith('fastai.')]\n"
        "assert not bad, bad\n"
        "print('ok', m.model_version)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ft-")


def _copy(out: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    return target


def _edit(path: Path, **changes: object) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def test_tampered_config_or_weights_are_refused(
    exported: tuple[MultiTaskNet, Path], tmp_path: Path
) -> None:
    _, out = exported
    copy = _copy(out, tmp_path)
    config = read_config(copy)
    heads = config["heads"]
    heads[0]["classes"] = ["tee", "skirt", "jacket"]  # renamed: same shapes, other meaning
    _edit(copy, heads=heads)
    with pytest.raises(ArtifactError, match="was changed after export"):
        load_artifact(copy)
    with pytest.raises(WeightsError, match="was changed after export"):
        ensure_available(parse_weights(str(copy)), tmp_path)
    copy2 = tmp_path / "copy2"
    shutil.copytree(out, copy2)
    data = bytearray((copy2 / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (copy2 / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="was changed after export"):
        Embedder(small_settings(weights=str(copy2))).load()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": None}, "expected 'fashionrec-model'"),
        ({"format": "keras"}, "expected 'fashionrec-model'"),
        ({"format_version": 3}, "unsupported format_version 3"),
        ({"backbone": "vgg16"}, "unknown backbone 'vgg16'"),
        ({"architecture": "vit"}, "unknown architecture"),
        ({"heads": []}, "non-empty list"),
        ({"embedding": {"kind": "heads", "dim": 2048}}, "does not match kind"),
        ({"embedding": {"kind": "mean", "dim": 2048}}, "embedding.kind"),
        ({"preprocessing": {"image_size": 8}}, "image_size"),
        ({"attribute_threshold": 2}, "attribute_threshold"),
    ],
)
def test_malformed_config_is_refused_with_a_clear_error(
    exported: tuple[MultiTaskNet, Path], tmp_path: Path, changes: dict, message: str
) -> None:
    copy = _copy(exported[1], tmp_path)
    _edit(copy, **changes)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy)
    with pytest.raises(WeightsError, match=message):
        Embedder(small_settings(weights=str(copy)))


def test_missing_files_and_shape_mismatch(
    exported: tuple[MultiTaskNet, Path], tmp_path: Path
) -> None:
    _, out = exported
    with pytest.raises(WeightsError, match=r"no config\.json"):
        parse_weights(str(tmp_path))
    no_weights = _copy(out, tmp_path)
    (no_weights / WEIGHTS_NAME).unlink()
    with pytest.raises(ArtifactError, match=r"cannot read model\.safetensors"):
        load_artifact(no_weights)
    # A consistent (re-hashed) artifact whose config lists more classes than the weights hold.
    config = read_config(out)
    config["heads"][0]["classes"] = ["tee", "skirt", "coat", "dress"]
    write_artifact(tmp_path / "mismatch", (out / WEIGHTS_NAME).read_bytes(), config)
    with pytest.raises(ArtifactError, match="does not fit the network"):
        load_artifact(tmp_path / "mismatch")
    garbage = tmp_path / "garbage"
    write_artifact(garbage, b"not safetensors at all", read_config(out))
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        load_artifact(garbage)


def test_head_weights_are_served_and_part_of_the_version(
    exported: tuple[MultiTaskNet, Path], tmp_path: Path
) -> None:
    net, out = exported
    images = [pattern_image(90 + 5 * i, 70, seed=i) for i in range(4)]
    x = torch.stack([image_to_tensor(img, SIZE) for img in images])
    with torch.no_grad():
        pooled = net.body(x).float()
        category = torch.nn.functional.normalize(net.heads[0].features(pooled), dim=1).numpy()
        texture = torch.nn.functional.normalize(net.heads[1].features(pooled), dim=1).numpy()
    weighted = reexport(out, tmp_path / "w", embedding="heads", head_weights={"category": 3})
    assert weighted["embedding"] == {"kind": "heads", "dim": 1024, "head_weights": [3.0, 1.0]}
    assert weighted["model_version"] != read_config(out)["model_version"]
    model = Embedder(small_settings(weights=str(tmp_path / "w")))
    model.load()
    got = model.embed(images)
    # blocks scaled 3:1, then the whole row normalised: 3/sqrt(10) and 1/sqrt(10)
    np.testing.assert_allclose(got[:, :512], category * 3 / np.sqrt(10), atol=1e-5)
    np.testing.assert_allclose(got[:, 512:], texture / np.sqrt(10), atol=1e-5)
    # the weights travel with the model: re-exported without new weights, they stay
    again = reexport(tmp_path / "w", tmp_path / "again", embedding="heads")
    assert again["embedding"]["head_weights"] == [3.0, 1.0]
    assert again["model_version"] == weighted["model_version"]
    only = reexport(out, tmp_path / "only", embedding="heads", head_weights={"texture": 0})
    assert only["embedding"]["head_weights"] == [1.0, 0.0]
    # equal weights are the paper's embedding: the same version as without any
    equal = reexport(out, tmp_path / "eq", embedding="heads", head_weights={"category": 1})
    assert equal["model_version"] == read_config(out)["model_version"]


@pytest.mark.parametrize(
    ("weights", "embedding", "message"),
    [
        ({"colour": 2}, "heads", "no head named colour"),
        ({"category": -1}, "heads", "between 0 and 100"),
        ({"category": 0, "texture": 0}, "heads", "above 0"),
        ({"category": 2}, "pooled", "need the heads embedding"),
    ],
)
def test_bad_head_weights_are_refused(
    exported: tuple[MultiTaskNet, Path],
    tmp_path: Path,
    weights: dict[str, float],
    embedding: str,
    message: str,
) -> None:
    with pytest.raises(ArtifactError, match=message):
        reexport(exported[1], tmp_path / "bad", embedding=embedding, head_weights=weights)
    assert not (tmp_path / "bad").exists()
