from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from fashionrec_embedder import weights
from fashionrec_embedder.backbones import get_backbone
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.weights import (
    WeightsError,
    WeightsSource,
    file_state_dict,
    model_version,
    parse_weights,
    random_backbone,
)
from fashionrec_shared.files import file_sha256
from safetensors.torch import save_file
from torchvision.models import resnet18, resnet50

from .conftest import pattern_image, small_settings

VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _full_resnet50(seed: int) -> torch.nn.Module:
    """torchvision's ResNet50 with its fc head, initialised exactly like random:SEED."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resnet50(weights=None)


@pytest.fixture(scope="module")
def images() -> list:
    return [pattern_image(seed=i) for i in range(3)]


def test_parse_weights(tmp_path: Path) -> None:
    R50 = "resnet50"
    assert parse_weights("imagenet", R50) == WeightsSource("imagenet", backbone=R50)
    assert parse_weights("random:42", R50) == WeightsSource("random", seed=42, backbone=R50)
    path = tmp_path / "w.pt"
    path.write_bytes(b"x")
    assert parse_weights(str(path), R50) == WeightsSource("file", path=path.resolve(), backbone=R50)
    # A spec may name its backbone (previous_weights during a backbone change).
    assert parse_weights("efficientnet-lite0:random:3", R50) == WeightsSource(
        "random", seed=3, backbone="efficientnet-lite0"
    )
    assert parse_weights("resnet50:imagenet") == WeightsSource("imagenet", backbone=R50)
    for bad in ("random", "random:x", "random:-1"):
        with pytest.raises(WeightsError, match="random:SEED"):
            parse_weights(bad)
    with pytest.raises(WeightsError, match="does not exist"):
        parse_weights(str(tmp_path / "missing.pt"))


def test_model_version_formats(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"some bytes")
    digest = file_sha256(path)
    R50 = "resnet50"
    versions = {
        model_version(WeightsSource("imagenet", backbone=R50)): "resnet50-imagenet-11ad3fa6",
        model_version(WeightsSource("random", seed=3, backbone=R50)): "resnet50-random-s3",
        model_version(
            WeightsSource("file", path=path, backbone=R50)
        ): f"resnet50-file-{digest[:12]}",
        model_version(
            WeightsSource("random", seed=3, backbone=R50), image_size=128
        ): "resnet50-random-s3-px128",
        model_version(WeightsSource("random", seed=10**18 - 1), 1024): None,
        model_version(
            WeightsSource("imagenet", backbone="efficientnet-lite2")
        ): "efficientnet-lite2-imagenet-9656183e",
        model_version(
            WeightsSource("random", seed=1, backbone="efficientnet-lite0"), 224
        ): "efficientnet-lite0-random-s1",
    }
    for got, expected in versions.items():
        assert VERSION_RE.match(got)
        if expected is not None:
            assert got == expected


def test_random_weights_are_deterministic_per_seed() -> None:
    a, b = random_backbone(1, "resnet50").state_dict(), random_backbone(1, "resnet50").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = random_backbone(2, "resnet50").state_dict()
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert not any(k.startswith("fc.") for k in a)


def test_random_weights_log_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fashionrec.embedder.weights"):
        weights.load_body(WeightsSource("random", seed=5), Path("/nonexistent"))
    assert any("meaningless" in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_state_dict_and_safetensors_files_match_the_in_memory_model(
    tmp_path: Path, random_model: Embedder, images: list
) -> None:
    # A full torchvision state_dict, fc head included: the loader must drop fc.*.
    state = _full_resnet50(7).state_dict()
    assert "fc.weight" in state
    pt_path = tmp_path / "resnet50.pth"
    torch.save(state, pt_path)
    st_path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))

    expected = random_model.embed(images)
    for path in (pt_path, st_path):
        model = Embedder(small_settings(weights=str(path)))
        model.load()
        assert model.model_version.startswith("resnet50-file-")
        np.testing.assert_allclose(model.embed(images), expected, atol=1e-5)


def test_clean_state_dict_drops_head_and_dataparallel_prefix() -> None:
    t = torch.zeros(1)
    cleaned = get_backbone("resnet50").clean_state_dict(
        {"module.conv1.weight": t, "fc.weight": t, "module.fc.bias": t}
    )
    assert list(cleaned) == ["conv1.weight"]


def test_checkpoint_wrapper_is_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"conv1.weight": torch.ones(2)}, "epoch": 3}, path)
    assert list(file_state_dict(path)) == ["conv1.weight"]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_arbitrary_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for path, dump in (
        (tmp_path / "evil.pt", lambda obj, p: torch.save(obj, p)),
        (tmp_path / "evil_legacy.pth", lambda obj, p: p.write_bytes(pickle.dumps(obj))),
    ):
        dump({"conv1.weight": _Exploit(marker)}, path)
        with pytest.raises(WeightsError, match="refusing to load"):
            file_state_dict(path)
        with pytest.raises(WeightsError):
            Embedder(small_settings(weights=str(path))).load()
    assert not marker.exists()


def test_non_tensor_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"conv1.weight": 1}, plain)
    with pytest.raises(WeightsError, match="not a tensor"):
        file_state_dict(plain)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="cannot read"):
        file_state_dict(corrupt)


def test_state_dict_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit the resnet50 backbone"):
        Embedder(small_settings(weights=str(path))).load()


def _offline(*args: object, **kwargs: object) -> None:
    raise URLError("[Errno -3] Temporary failure in name resolution")


def test_imagenet_offline_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    model = Embedder(small_settings(tmp_path, weights="imagenet"))
    assert model.model_version == "resnet50-imagenet-11ad3fa6-px64"
    with pytest.raises(WeightsError) as info:
        model.load()
    message = str(info.value)
    assert "--weights PATH" in message and "efficientnet-lite" in message
    assert str(tmp_path / "cache") in message
    assert not model.loaded


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the network was used")


def test_imagenet_uses_the_cached_file_and_checks_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = tmp_path / "cache" / "torch-hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    url = get_backbone("resnet50")._url()  # type: ignore[attr-defined]
    # Not the real file: its sha256 does not start with the digest in its name.
    torch.save(_full_resnet50(7).state_dict(), checkpoints / url.rsplit("/", 1)[-1])
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    model = Embedder(small_settings(tmp_path, weights="imagenet"))
    with pytest.raises(WeightsError, match="does not match its sha256 prefix 11ad3fa6"):
        model.load()
