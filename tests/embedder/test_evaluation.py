from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fashionrec_cli.datasets.inshop import write_inshop
from fashionrec_embedder import evaluation
from fashionrec_embedder.__main__ import cli
from fashionrec_embedder.evaluation import (
    EvaluationError,
    average_precision_at_k,
    evaluate_inshop,
    map_at_k,
    rank_gallery,
    recall_at_k,
    relevance,
    retrieval_metrics,
)
from fashionrec_embedder.evaluation_inshop import check_images, read_partition
from typer.testing import CliRunner

from .conftest import small_settings

KEYS = ("recall@1", "recall@5", "recall@10", "recall@20", "map@10")


def _rel(*ranks: int, length: int = 20) -> np.ndarray:
    """A relevance row with hits at the given 1-based ranks."""
    row = np.zeros(length, dtype=bool)
    row[[r - 1 for r in ranks]] = True
    return row


# ---- metrics on hand-made rankings ----------------------------------------------------------


def test_average_precision_known_values() -> None:
    assert average_precision_at_k(_rel(1), 1, 10) == 1.0
    assert average_precision_at_k(_rel(3), 1, 10) == pytest.approx(1 / 3)
    # R = 2, hits at 1 and 3: (1/1 + 2/3) / 2
    assert average_precision_at_k(_rel(1, 3), 2, 10) == pytest.approx((1 + 2 / 3) / 2)
    # R = 3 but only one found, at rank 2: (1/2) / 3
    assert average_precision_at_k(_rel(2), 3, 10) == pytest.approx(1 / 6)
    # Relevant only at rank 11: outside the cut-off.
    assert average_precision_at_k(_rel(11), 1, 10) == 0.0


def test_average_precision_with_more_relevant_than_the_cutoff() -> None:
    # R = 15 > 10: a perfect top 10 scores 1 (normalised by min(R, 10)), not 10/15.
    assert average_precision_at_k(_rel(*range(1, 16)), 15, 10) == 1.0
    # Hits at ranks 2..10 with R = 15: sum_{k=2..10} (k-1)/k over 10.
    expected = sum((k - 1) / k for k in range(2, 11)) / 10
    assert average_precision_at_k(_rel(*range(2, 12)), 15, 10) == pytest.approx(expected)
    with pytest.raises(ValueError):
        average_precision_at_k(_rel(1), 0, 10)


def test_recall_at_k_counts_queries_with_any_hit() -> None:
    rel = np.stack([_rel(1), _rel(5), _rel(11), _rel(20), np.zeros(20, dtype=bool)])
    assert recall_at_k(rel, 1) == pytest.approx(1 / 5)
    assert recall_at_k(rel, 5) == pytest.approx(2 / 5)
    assert recall_at_k(rel, 10) == pytest.approx(2 / 5)  # rank 11 is not in the top 10
    assert recall_at_k(rel, 20) == pytest.approx(4 / 5)
    assert map_at_k(rel, [1, 1, 1, 1, 1], 10) == pytest.approx((1 + 1 / 5) / 5)


def test_rank_gallery_orders_by_cosine_and_breaks_ties_by_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gallery = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1], [0.8, 0.6]], dtype=np.float32)
    monkeypatch.setattr(evaluation, "QUERY_BLOCK", 2)  # exercise the blocking
    assert rank_gallery(queries, gallery, 2).tolist() == [[0, 2], [1, 3], [3, 0]]
    # k larger than the gallery: the whole gallery, ranked.
    assert rank_gallery(queries, gallery, 20).tolist() == [
        [0, 2, 3, 1],
        [1, 3, 0, 2],
        [3, 0, 2, 1],
    ]


def test_retrieval_metrics_on_known_embeddings() -> None:
    # Two items, gallery: a, a, b; queries: an a-image closer to b, and a b-image.
    gallery = np.array([[1, 0], [0.9, np.sqrt(1 - 0.81)], [0, 1]], dtype=np.float32)
    queries = np.array([[0, 1], [0.1, np.sqrt(0.99)], [1, 0]], dtype=np.float32)
    result = retrieval_metrics(queries, ["a", "b", "c"], gallery, ["a", "a", "b"])
    # q0 (item a): ranking b, a, a -> first hit at rank 2, AP = (1/2 + 2/3) / 2
    # q1 (item b): ranking b, ... -> AP = 1. q2 (item c) has no gallery image: skipped.
    assert result["queries"] == 2 and result["queries_skipped"] == 1
    assert result["gallery"] == 3 and result["items"] == 2
    assert result["recall@1"] == pytest.approx(0.5)
    assert result["recall@5"] == result["recall@20"] == 1.0
    assert result["map@10"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)
    with pytest.raises(EvaluationError, match="no query has a gallery image"):
        retrieval_metrics(queries[:1], ["x"], gallery, ["a", "a", "b"])


def test_relevance_compares_item_ids() -> None:
    ranking = np.array([[2, 0], [1, 2]])
    rel = relevance(ranking, ["a", "b"], ["a", "b", "b"])
    assert rel.tolist() == [[False, True], [True, True]]


# ---- partition file --------------------------------------------------------------------------


def _partition(root: Path, text: str) -> None:
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(text)


HEAD = "image_name item_id evaluation_status\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "row count and a header"),
        ("two\n" + HEAD, "line 1 must be the number of rows"),
        ("1\nname item status\nimg/a.jpg id_1 query\n", "line 2 must be the header"),
        ("3\n" + HEAD + "img/a.jpg id_1 query\n", "announces 3 rows, the file has 1"),
        ("1\n" + HEAD + "img/a.jpg id_1\n", "expected 3 fields"),
        ("1\n" + HEAD + "img/a.jpg id_1 test\n", "unknown evaluation_status 'test'"),
        ("1\n" + HEAD + "img/a.jpg id_1 query\n", "at least one query and one gallery"),
    ],
)
def test_malformed_partition_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    _partition(tmp_path, text)
    with pytest.raises(EvaluationError, match=message):
        read_partition(tmp_path)


def test_missing_partition_and_images_are_reported(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"list_eval_partition\.txt not found"):
        read_partition(tmp_path)
    _partition(tmp_path, "2\n" + HEAD + "img/a.jpg id_1 query\nimg/b.jpg id_1 gallery\n")
    partition = read_partition(tmp_path)
    assert partition.query_items == ["id_1"] and partition.gallery_images == ["img/b.jpg"]
    with pytest.raises(EvaluationError, match=r"2 of 2 query/gallery images are missing"):
        check_images(partition)
    with pytest.raises(EvaluationError, match="missing"):
        evaluate_inshop(tmp_path, small_settings(), progress=False)


# ---- end to end on a generated split ---------------------------------------------------------


@pytest.fixture(scope="module")
def inshop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inshop")
    write_inshop(root, n_items=12, views_per_item=3, seed=0, size=96)
    return root


def _well_formed(result: dict) -> None:
    values = [result[key] for key in KEYS[:4]]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values)  # non-decreasing in K
    assert 0.0 <= result["map@10"] <= result["recall@10"]


def test_evaluate_inshop_on_a_generated_split(inshop_root: Path, tmp_path: Path) -> None:
    settings = small_settings(tmp_path, weights="random:0")
    result = evaluate_inshop(inshop_root, settings, batch_size=8, progress=False)
    _well_formed(result)
    # 12 items, 20% train (2 items x 3 views); each test item: 1 query + 2 gallery views.
    assert result["queries"] == 10 and result["gallery"] == 20 and result["items"] == 10
    assert result["queries_skipped"] == 0 and result["train_images"] == 6
    assert result["model_version"] == "resnet50-random-s0-px64" and result["dim"] == 2048
    assert result["seconds"] > 0 and result["image_size"] == 64
    json.dumps(result)  # JSON-able


def test_evaluate_command_writes_json(
    inshop_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASHIONREC_EMBEDDER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "result.json"
    result = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--inshop",
            str(inshop_root),
            "--weights",
            "random:0",
            "--image-size",
            "64",
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "recall@5" in result.output and "map@10" in result.output
    data = json.loads(out.read_text())
    assert set(KEYS) <= set(data)
    _well_formed(data)
    assert data["model_version"] == "resnet50-random-s0-px64"


def test_evaluate_command_explains_a_bad_dataset(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["evaluate", "--inshop", str(tmp_path), "--weights", "random:0"]
    )
    assert result.exit_code == 1
    assert "list_eval_partition.txt not found" in result.output
