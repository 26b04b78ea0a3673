"""The `fashionrec` command line: dataset writers and hand-over to the service commands."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from fashionrec_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def test_synth_catalog_writes_an_ingestable_catalogue(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "catalog", str(tmp_path), "--count", "4"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "catalog.csv").open()))
    assert len(rows) == 4
    assert all((tmp_path / row["image"]).is_file() for row in rows)


def test_synth_rejects_unknown_format(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "catalog", str(tmp_path), "--format", "xml"])
    assert result.exit_code == 2


def test_synth_inshop_and_deepfashion(tmp_path: Path) -> None:
    inshop = runner.invoke(app, ["synth", "inshop", str(tmp_path / "inshop"), "--items", "3"])
    assert inshop.exit_code == 0, inshop.output
    assert (tmp_path / "inshop" / "Eval" / "list_eval_partition.txt").is_file()
    attrs = runner.invoke(
        app, ["synth", "deepfashion", str(tmp_path / "attr"), "--images", "6", "--size", "64"]
    )
    assert attrs.exit_code == 0, attrs.output
    assert (tmp_path / "attr" / "Eval" / "list_eval_partition.txt").is_file()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fashionrec_cli", *args], capture_output=True, text=True, timeout=60
    )


def test_evaluate_needs_a_target() -> None:
    result = run_cli("evaluate")
    assert result.returncode == 2
    assert "--inshop" in result.stderr


def test_evaluate_hands_over_to_the_service_commands() -> None:
    inshop = run_cli("evaluate", "--inshop", "/nonexistent", "--weights", "random:0")
    assert inshop.returncode != 0
    assert "Traceback" not in inshop.stderr
    index = run_cli("evaluate", "--index", "--help")
    assert index.returncode == 0
    assert "--samples" in index.stdout


def test_ingest_missing_catalogue_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope.csv"), "--images", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not exist" in result.output
