"""The `fashionrec` command line: dataset writers, hand-over to service commands, `up`'s exit."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fashionrec_cli.main import app
from fashionrec_cli.restarts import RestartPolicy
from fashionrec_cli.supervisor import CrashLoop
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


@pytest.fixture
def signal_handlers_restored() -> Iterator[None]:
    """`up` installs its own SIGINT/SIGTERM handlers (and ignores both while stopping)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class CrashLoopingStack:
    """Stands in for the stack: ready at once, then a child crash-loops."""

    stopped = False

    def __init__(self, options: object) -> None:
        self.gateway_url = "http://127.0.0.1:1"

    def start(self, progress: Callable[[str], None]) -> float:
        return 0.1

    def watch(self) -> None:
        policy = RestartPolicy(limit=2, window_s=60)
        raise CrashLoop("embedder-0", "was killed by SIGKILL", policy, "[INFO/MainProcess] boom")

    def stop(self) -> None:
        CrashLoopingStack.stopped = True


def test_up_exits_non_zero_naming_the_child_that_crash_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_handlers_restored: None
) -> None:
    import fashionrec_cli.stack

    monkeypatch.setattr(fashionrec_cli.stack, "Stack", CrashLoopingStack)
    result = runner.invoke(app, ["up", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "embedder-0 keeps dying (last: it was killed by SIGKILL)" in result.output
    assert "[INFO/MainProcess] boom" in result.output  # the log tail, not read as markup
    assert CrashLoopingStack.stopped


def test_up_refuses_invalid_supervision_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_handlers_restored: None
) -> None:
    monkeypatch.setenv("FASHIONREC_UP_RESTART_LIMIT", "-1")
    result = runner.invoke(app, ["up", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "FASHIONREC_UP_" in result.output


def test_recommend_refuses_an_example_that_is_neither_file_nor_id(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    result = runner.invoke(app, ["recommend", "--like", str(missing), "--gateway", "http://x"])
    assert result.exit_code == 2
    assert "no such file and not an item id" in result.output and str(missing) in result.output
