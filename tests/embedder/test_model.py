from __future__ import annotations

import numpy as np
import pytest
import torch
from fashionrec_embedder.model import Embedder, ModelNotLoaded, resolve_device

from .conftest import pattern_image, small_settings


@pytest.fixture(scope="module")
def images() -> list:
    return [pattern_image(90 + 7 * i, 70 + 5 * i, seed=i) for i in range(5)]


def test_embeddings_are_2048_float32_unit_vectors(random_model: Embedder, images: list) -> None:
    vectors = random_model.embed(images)
    assert vectors.shape == (5, 2048) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(vectors).all()
    assert random_model.describe() == {
        "model_version": "resnet50-random-s7-px64",
        "dim": 2048,
        "device": "cpu",
        "backbone": "resnet50",
        "weights": "random:7",
        "pooling": "global",
        "runtime": "torch",
        "precision": "fp32",
    }


def test_batching_does_not_change_results(random_model: Embedder, images: list) -> None:
    assert random_model.settings.batch_size == 4  # 5 images → batches of 4 and 1
    together = random_model.embed(images)
    alone = np.concatenate([random_model.embed([img]) for img in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_same_seed_identical_different_seed_different(random_model: Embedder, images: list) -> None:
    same = Embedder(small_settings(weights="random:7"))
    same.load()
    np.testing.assert_array_equal(same.embed(images), random_model.embed(images))
    other = Embedder(small_settings(weights="random:8"))
    other.load()
    assert other.model_version == "resnet50-random-s8-px64"
    assert not np.allclose(other.embed(images), random_model.embed(images), atol=1e-3)


def test_load_is_idempotent_and_required(random_model: Embedder) -> None:
    module = random_model._model
    random_model.load()
    assert random_model._model is module
    fresh = Embedder(small_settings())
    with pytest.raises(ModelNotLoaded):
        fresh.embed([pattern_image()])
    assert fresh.embed([]).shape == (0, 2048)


def test_threads_setting_is_applied() -> None:
    before = torch.get_num_threads()
    try:
        Embedder(small_settings(threads=1)).load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")
