"""The backbone registry: packaged ImageNet weights offline, golden outputs, every backbone on
every runtime, predictions of a trained model on every runtime, training from the packaged body."""

from __future__ import annotations

import collections
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from fashionrec_cli.datasets.deepfashion_attr import write_deepfashion_attributes
from fashionrec_embedder.artifact import export_artifact, read_config
from fashionrec_embedder.backbones import BACKBONES, DEFAULT_BACKBONE, get_backbone, regions
from fashionrec_embedder.model import Embedded, Embedder
from fashionrec_embedder.network import HeadSpec, MultiTaskNet
from fashionrec_embedder.predictions import decode_predictions
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.training.run import TrainOptions, train
from fashionrec_embedder.weights import WeightsError, parse_weights, random_backbone
from PIL import Image
from torch import nn

from .conftest import pattern_image

GOLDEN = json.loads((Path(__file__).parent / "golden" / "packaged_backbones.json").read_text())
PACKAGED = [name for name, b in BACKBONES.items() if b.packaged]
SMALL = 96  # EfficientNet's "same" padding is computed for the size the model is built for


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backbone-cache")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _settings(cache_dir: Path, **values: object) -> EmbedderSettings:
    base: dict[str, object] = {"device": "cpu", "runtime": "torch", "cache_dir": cache_dir}
    return EmbedderSettings(**{**base, **values})  # type: ignore[arg-type]


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


def test_the_default_backbone_works_offline() -> None:
    assert get_backbone(DEFAULT_BACKBONE).packaged
    assert EmbedderSettings.model_fields["backbone"].default == DEFAULT_BACKBONE
    assert EmbedderSettings.model_fields["weights"].default == "imagenet"


@pytest.mark.parametrize("pooling", ["global", "regional"])
@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_weights_load_offline_and_give_the_golden_output(
    name: str, pooling: str, cache_dir: Path, no_network: None
) -> None:
    golden = GOLDEN["models"][name if pooling == "global" else f"{name} regional"]
    model = Embedder(_settings(cache_dir, backbone=name, pooling=pooling))
    # backbone + digest of the weights (+ the pooling)
    assert model.model_version == golden["model_version"]
    model.load()
    assert model.dim == golden["dim"] == get_backbone(name).embedding_dim(pooling)
    assert model.image_size == get_backbone(name).default_image_size(pooling)
    vector = model.embed([pattern_image(160, 120, seed=0)])[0]
    projection = np.random.default_rng(0).standard_normal((16, vector.shape[0])) @ vector
    np.testing.assert_allclose(projection, golden["projection"], atol=2e-4)


def test_pooling_auto_is_regional_for_lite_and_global_for_resnet50(cache_dir: Path) -> None:
    lite = Embedder(_settings(cache_dir, backbone="efficientnet-lite0"))
    assert (lite.pooling, lite.dim, lite.image_size) == ("regional", 1280 + 9 * 320, 288)
    assert lite.model_version.endswith("-reg3")
    plain = Embedder(_settings(cache_dir, backbone="efficientnet-lite0", pooling="global"))
    assert (plain.pooling, plain.dim, plain.image_size) == ("global", 1280, 224)
    assert plain.model_version == lite.model_version.removesuffix("-reg3")
    sized = Embedder(_settings(cache_dir, backbone="efficientnet-lite0", image_size=224))
    assert sized.model_version == lite.model_version + "-px224"
    resnet = Embedder(_settings(cache_dir, backbone="resnet50", weights="random:0"))
    assert (resnet.pooling, resnet.dim) == ("global", 2048)
    with pytest.raises(WeightsError, match="pooling 'regional' is not available for resnet50"):
        Embedder(_settings(cache_dir, backbone="resnet50", weights="random:0", pooling="regional"))


@pytest.mark.parametrize(("height", "width"), [(9, 9), (7, 7), (3, 3), (2, 5), (1, 1)])
def test_regions_cover_the_map_for_any_size(height: int, width: int) -> None:
    fmap = torch.arange(2 * height * width, dtype=torch.float32).reshape(1, 2, height, width)
    parts = regions(fmap)
    assert len(parts) == 9 and all(p.shape == (1, 2) for p in parts)
    if height % 3 == 0 and width % 3 == 0:  # an even split is adaptive average pooling
        expected = nn.functional.adaptive_avg_pool2d(fmap, 3).flatten(2)
        torch.testing.assert_close(torch.stack(parts, dim=2), expected)
    # the top-left region sees the top-left cell, the bottom-right one the last cell
    assert parts[0][0, 0] <= parts[-1][0, 0]


def test_unknown_backbone_and_resnet50_offline_say_what_to_do(
    cache_dir: Path, no_network: None
) -> None:
    with pytest.raises(WeightsError, match="unknown backbone 'vgg16'"):
        parse_weights("imagenet", "vgg16")
    with pytest.raises(ValueError, match="unknown backbone"):
        EmbedderSettings(backbone="vgg16")
    model = Embedder(_settings(cache_dir, backbone="resnet50"))
    with pytest.raises(WeightsError, match="efficientnet-lite0"):
        model.load()


@pytest.mark.parametrize(
    ("name", "pooling"),
    [(name, "global") for name in BACKBONES]
    + [(name, "regional") for name, b in BACKBONES.items() if "regional" in b.poolings],
)
def test_every_backbone_on_every_runtime_matches_torch(
    name: str, pooling: str, cache_dir: Path
) -> None:
    weights = "imagenet" if get_backbone(name).packaged else "random:1"
    images = [pattern_image(90 + 9 * i, 70 + 4 * i, seed=i) for i in range(4)]
    # Regional at 128 px: a 4x4 last map, split unevenly into the 3x3 grid.
    size = SMALL if pooling == "global" else 128
    values = {"backbone": name, "weights": weights, "image_size": size, "pooling": pooling}
    reference = Embedder(_settings(cache_dir, **values))
    reference.load()
    expected = reference.embed(images)
    assert expected.shape == (4, get_backbone(name).embedding_dim(pooling))
    for runtime in ("onnxruntime", "openvino"):
        model = Embedder(_settings(cache_dir, runtime=runtime, **values))
        model.load()
        assert model.model_version == reference.model_version
        assert _min_cos(model.embed(images), expected) >= 0.999, runtime
    int8 = Embedder(
        _settings(cache_dir, runtime="openvino", precision="int8", calibration_images=8, **values)
    )
    int8.load()
    assert int8.model_version == reference.model_version + "-int8"
    # Depthwise convolutions quantise less well than ResNet50's (benchmarks/quality.py measures
    # the top-5 agreement int8 vs fp32): a sanity bound here.
    assert _min_cos(int8.embed(images), expected) >= 0.9


HEADS = [
    HeadSpec("category", "single_label", ("tee", "skirt", "coat")),
    HeadSpec("texture", "multi_label", ("striped", "polka dot", "floral")),
]


@pytest.fixture(scope="module")
def lite_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lite-artifact") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        body = random_backbone(5, "efficientnet-lite0", SMALL)
        net = MultiTaskNet(body, HEADS, "efficientnet-lite0")
        for module in net.heads.modules():  # trained-like BatchNorm statistics
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    export_artifact(net.eval(), out, embedding="heads", image_size=SMALL)
    return out


def test_a_trained_model_predicts_the_same_on_every_runtime(
    lite_artifact: Path, cache_dir: Path
) -> None:
    config = read_config(lite_artifact)
    assert config["backbone"] == "efficientnet-lite0"
    assert config["preprocessing"]["mean"] == [round(127 / 255, 6)] * 3
    images = [pattern_image(100, 90, seed=i) for i in range(3)]
    outputs: dict[str, list[Embedded]] = {}
    for runtime in ("torch", "onnxruntime", "openvino"):
        model = Embedder(_settings(cache_dir, weights=str(lite_artifact), runtime=runtime))
        model.load()
        assert model.backbone.name == "efficientnet-lite0" and model.image_size == SMALL
        outputs[runtime] = [model.embed_image(img) for img in images]
    for runtime, got in outputs.items():
        for one, ref in zip(got, outputs["torch"], strict=True):
            assert float(one.vector @ ref.vector) >= 0.999, runtime
            assert one.predicted is not None and ref.predicted is not None
            assert one.predicted.category is not None and ref.predicted.category is not None
            assert one.predicted.category.label == ref.predicted.category.label
            assert abs(one.predicted.category.confidence - ref.predicted.category.confidence) < 1e-3


def test_a_plain_backbone_predicts_nothing(cache_dir: Path) -> None:
    model = Embedder(_settings(cache_dir, backbone="efficientnet-lite0", image_size=SMALL))
    model.load()
    assert model.embed_image(pattern_image(seed=1)).predicted is None


def test_decode_predictions_takes_the_category_and_attributes_over_the_threshold() -> None:
    probs = np.array([[0.1, 0.7, 0.2, 0.9, 0.2, 0.6]], dtype=np.float32)
    (predicted,) = decode_predictions(HEADS, probs, threshold=0.5)
    assert predicted.category is not None and predicted.category.label == "skirt"
    assert predicted.category.confidence == pytest.approx(0.7)
    assert [a.label for a in predicted.attributes["texture"]] == ["striped", "floral"]
    with pytest.raises(ValueError, match="do not fit"):
        decode_predictions(HEADS, probs[:, :4], threshold=0.5)


def test_training_from_the_packaged_body_beats_the_majority_class(tmp_path: Path) -> None:
    root = tmp_path / "df"
    write_deepfashion_attributes(root, 240, seed=2, size=SMALL)
    # Heads only (the packaged body frozen): one quick epoch on CPU.
    options = TrainOptions(
        epochs=0,
        freeze_epochs=1,
        image_size=SMALL,
        batch_size=16,
        backbone="efficientnet-lite0",
        weights="imagenet",
        lr=3e-3,
        device="cpu",
        seed=0,
    )
    result = train(root, tmp_path / "model", options, echo=lambda _: None)
    val = result.data.split("val")
    majority = max(collections.Counter(s.category for s in val).values()) / len(val)
    final = result.history[-1]
    assert final["category_accuracy"] > majority + 0.2, (final, majority)
    assert result.config["backbone"] == "efficientnet-lite0"
    assert result.config["training"]["weights"] == "imagenet"
    # The served model names the categories it predicts right: the head's output order is the
    # config's class order (DeepFashion's list is not alphabetical; fastai sorts by default).
    classes = list(result.data.heads()[0].classes)
    assert classes != sorted(classes)
    served = Embedder(_settings(tmp_path / "cache", weights=str(tmp_path / "model")))
    served.load()
    right = 0
    for sample in val:
        with Image.open(sample.image) as img:
            predicted = served.embed_image(img.convert("RGB")).predicted
        assert predicted is not None and predicted.category is not None
        right += predicted.category.label == sample.category
    assert abs(right / len(val) - final["category_accuracy"]) < 0.1, (right, len(val), final)


def test_worker_tasks_carry_a_trained_models_predictions(
    lite_artifact: Path, tmp_path: Path, redis_url: str
) -> None:
    import redis
    from fashionrec_embedder.worker import WorkerContext, embed_items, embed_query
    from fashionrec_shared.storage import LocalBlobStore, content_key
    from fashionrec_shared.tasks import EmbedQueryResult, StoreEmbeddings

    from .conftest import encode

    settings = _settings(
        tmp_path,
        weights=str(lite_artifact),
        broker={"url": redis_url},
        storage={"backend": "local", "local_dir": tmp_path / "blobs"},
    )
    model = Embedder(settings)
    model.load()
    client = redis.Redis.from_url(redis_url)
    context = WorkerContext(
        settings=settings, store=LocalBlobStore(tmp_path / "blobs"), redis=client, model=model
    )
    refs = []
    for i in range(3):
        data = encode(pattern_image(120, 100, seed=i), "JPEG", quality=90)
        key, digest = content_key("inventory", data, "jpg")
        context.store.put(key, data)
        refs.append({"key": key, "sha256": digest})
    sent: list[StoreEmbeddings] = []
    items = [{"item_id": f"i{i}", "image": ref} for i, ref in enumerate(refs)]
    embed_items(context, {"items": items}, store_results=sent.append)
    [stored] = sent
    labels = {c for h in HEADS if h.kind == "single_label" for c in h.classes}
    for embedding in stored.embeddings:
        assert embedding.predicted is not None and embedding.predicted.category is not None
        assert embedding.predicted.category.label in labels
    query = EmbedQueryResult.model_validate(embed_query(context, {"image": refs[0]}))
    assert query.predicted == stored.embeddings[0].predicted
    client.close()
