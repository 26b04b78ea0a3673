from __future__ import annotations

import json
from pathlib import Path

import pytest
from fashionrec_indexer.__main__ import cli
from sqlalchemy import Engine
from typer.testing import CliRunner

from tests.indexer.conftest import add_item, random_vectors


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASHIONREC_STORAGE_BACKEND", "local")
    monkeypatch.setenv("FASHIONREC_STORAGE_LOCAL_DIR", str(tmp_path / "blobs"))
    monkeypatch.setenv("FASHIONREC_INDEXER_N_TREES", "3")
    monkeypatch.setenv("FASHIONREC_INDEXER_SETTLE_S", "0")


def test_migrate_command(env: None, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_INDEXER_DATABASE_URL", database_url)
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(cli, ["migrate"]).exit_code == 0


def test_rebuild_command_prints_manifest(
    env: None, engine: Engine, migrated_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("DATABASE_URL", migrated_url)
    monkeypatch.delenv("FASHIONREC_INDEXER_DATABASE_URL", raising=False)
    add_item(engine, "A", random_vectors(1)[0])
    result = CliRunner().invoke(cli, ["rebuild"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output[result.output.index("{") :])
    assert manifest["item_count"] == 1 and manifest["n_trees"] == 3
    assert (tmp_path / "blobs" / "indexes" / manifest["build_id"] / "index.ann").is_file()
    skipped = CliRunner().invoke(cli, ["rebuild", "--if-changed"])
    assert skipped.exit_code == 0 and "skipped" in skipped.output
