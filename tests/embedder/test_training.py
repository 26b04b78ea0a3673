"""Real (small) fastai training on CPU: random:0 body, 64 px synthetic DeepFashion images."""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fashionrec_cli.datasets.deepfashion_attr import write_deepfashion_attributes
from fashionrec_embedder.__main__ import cli
from fashionrec_embedder.artifact import load_artifact, read_config, reexport
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.preprocess import image_to_tensor
from fashionrec_embedder.training.learner import COLUMNS
from fashionrec_embedder.training.run import TrainOptions, TrainResult, train
from fashionrec_embedder.weights import random_backbone
from PIL import Image
from typer.testing import CliRunner

from .conftest import small_settings

SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    root = tmp_path_factory.mktemp("deepfashion")
    write_deepfashion_attributes(root, 320, seed=1, size=SIZE)
    # The budget: two epochs. A random body gives informative but unnormalised features;
    # two frozen epochs teach the heads reliably (measured on dataset seeds 1-3: category
    # accuracy 0.44, 0.62, 0.42 against majority shares 0.17, 0.17, 0.21).
    options = TrainOptions(
        epochs=0,
        freeze_epochs=2,
        image_size=SIZE,
        batch_size=16,
        backbone="resnet50",
        weights="random:0",
        lr=3e-3,
        device="cpu",
        seed=0,
    )
    lines: list[str] = []
    result = train(root, tmp_path_factory.mktemp("model"), options, echo=lines.append)
    result.lines = lines  # type: ignore[attr-defined]
    return result


def test_training_lowers_the_loss_and_beats_the_majority_class(trained: TrainResult) -> None:
    final = trained.history[-1]
    assert final["valid_loss"] < trained.initial["valid_loss"]
    val = trained.data.split("val")
    majority = max(collections.Counter(s.category for s in val).values()) / len(val)
    assert final["category_accuracy"] > majority + 0.1, (final, majority)
    assert 0.0 < final["attr_fbeta"] <= 1.0 and 0.0 < final["attr_accuracy_multi"] <= 1.0


def test_epoch_table_is_printed_and_written_in_the_papers_form(trained: TrainResult) -> None:
    with (trained.out / "history.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert (
        tuple(rows[0])
        == COLUMNS
        == (
            "epoch",
            "train_loss",
            "valid_loss",
            "category_accuracy",
            "attr_accuracy_multi",
            "attr_fbeta",
            "time",
        )
    )
    assert [r[0] for r in rows[1:]] == ["0", "1"]
    assert all(float(r[2]) > 0 for r in rows[1:])
    printed = trained.lines  # type: ignore[attr-defined]
    assert any(line.split()[: len(COLUMNS)] == list(COLUMNS) for line in printed)
    assert sum(1 for line in printed if line.split() and line.split()[0] in "01") >= 2
    config = read_config(trained.out)
    assert config["training"]["epochs"] == 2
    # The exported weights are those of the epoch with the lowest validation loss.
    losses = [float(r[2]) for r in rows[1:]]
    exported = config["training"]["exported_epoch"]
    assert losses[exported] == min(losses)
    assert config["training"]["metrics"]["valid_loss"] == pytest.approx(losses[exported])
    assert [h["name"] for h in config["heads"]] == [
        "category",
        "texture",
        "fabric",
        "shape",
        "part",
        "style",
    ]


@pytest.mark.parametrize("kind", ["heads", "pooled"])
def test_exported_model_serves_the_trained_embeddings(
    trained: TrainResult, tmp_path: Path, kind: str
) -> None:
    out = trained.out if kind == "heads" else tmp_path / "pooled"
    if kind == "pooled":
        reexport(trained.out, out, embedding="pooled")
    images = [Image.open(s.image).convert("RGB") for s in trained.data.split("val")[:6]]
    model = Embedder(small_settings(weights=str(out)))
    model.load()
    got = model.embed(images)
    net = trained.model.eval()
    with torch.no_grad():
        expected = net.embed(torch.stack([image_to_tensor(img, SIZE) for img in images]), kind)
    assert got.shape == (6, 512 * 6 if kind == "heads" else 2048)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    # The loaded network predicts what the trained one predicts.
    loaded, _ = load_artifact(out)
    x = torch.stack([image_to_tensor(img, SIZE) for img in images])
    with torch.no_grad():
        for a, b in zip(loaded(x), net(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cli_fine_tunes_frozen_then_unfrozen_and_exports(
    tmp_path: Path, trained: TrainResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "data"
    write_deepfashion_attributes(root, 48, seed=2, size=SIZE)
    out = tmp_path / "model"
    args = [
        "train",
        str(root),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--freeze-epochs",
        "1",
        "--image-size",
        str(SIZE),
        "--weights",
        "random:0",
        "--batch-size",
        "8",
        "--embedding",
        "pooled",
        "--threshold",
        "0.1",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--keep",
        "last",  # export the unfrozen epoch even if it validates worse
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "category_accuracy" in result.output and "exported ft-" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["embedding"] == {"kind": "pooled", "dim": 2048}
    assert config["attribute_threshold"] == 0.1
    assert config["training"]["epochs"] == 2 and len(config["training"]["history"]) == 2
    # Unfrozen: the body moved away from its initialisation (with the smaller learning rate).
    net, _ = load_artifact(out)
    start = random_backbone(0, "resnet50").state_dict()
    assert not torch.equal(net.body.state_dict()["conv1.weight"], start["conv1.weight"])
    # Other weights, other version.
    assert config["model_version"] != read_config(trained.out)["model_version"]


def test_cli_reports_bad_data(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "not training data" in result.output
