from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from celery import Celery
from fashionrec_embedder import worker
from fashionrec_embedder.__main__ import cli
from fashionrec_embedder.settings import EmbedderSettings
from typer.testing import CliRunner

from .conftest import encode, pattern_image

runner = CliRunner()
OPTION_ENV = ("WEIGHTS", "DEVICE", "CONCURRENCY", "IMAGE_SIZE", "CACHE_DIR")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Settings come from the environment: start each test from a known one.
    for name in OPTION_ENV:
        monkeypatch.setenv(f"FASHIONREC_EMBEDDER_{name}", "")
        monkeypatch.delenv(f"FASHIONREC_EMBEDDER_{name}")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_IMAGE_SIZE", "64")
    monkeypatch.setenv("FASHIONREC_EMBEDDER_CACHE_DIR", str(tmp_path / "cache"))


def test_embed_prints_version_and_norms(tmp_path: Path) -> None:
    files = []
    for i in range(2):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(encode(pattern_image(seed=i), "JPEG"))
        files.append(str(path))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    result = runner.invoke(cli, ["embed", *files, str(bad), "--weights", "random:1"])
    assert "model_version: resnet50-random-s1-px64" in result.output
    assert result.output.count("norm=1.000000") == 2
    assert "bad.jpg: error: cannot decode" in result.output
    assert result.exit_code == 1  # one file failed


def settings_given_to_worker_app(monkeypatch: pytest.MonkeyPatch) -> list[EmbedderSettings]:
    """The settings each `create_worker_app` call gets (the worker processes' settings)."""
    given: list[EmbedderSettings] = []
    create = worker.create_worker_app

    def spy(settings: EmbedderSettings, **kwargs: object) -> Celery:
        given.append(settings)
        return create(settings, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "create_worker_app", spy)
    return given


def test_worker_starts_celery_on_the_embed_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(Celery, "worker_main", lambda self, argv: calls.append(argv))
    given = settings_given_to_worker_app(monkeypatch)
    result = runner.invoke(
        cli, ["worker", "--weights", "random:1", "--concurrency", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    argv = calls[0]
    assert argv[:9] == [
        "worker",
        "-Q",
        "embed",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "-n",
        "embedder@%h",
    ]
    # Worker processes get the settings object by forking, not through the environment.
    [settings] = given
    assert settings.weights == "random:1"
    assert settings.device == "cpu"
    assert "FASHIONREC_EMBEDDER_WEIGHTS" not in os.environ


def test_worker_fails_fast_on_unusable_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(Celery, "worker_main", lambda self, argv: pytest.fail("started"))
    result = runner.invoke(cli, ["worker", "--weights", str(tmp_path / "nope.pt")])
    assert result.exit_code == 1 and "does not exist" in result.output

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = runner.invoke(cli, ["worker", "--weights", "imagenet"])
    assert result.exit_code == 1
    assert "--weights PATH" in result.output
