from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import pytest
from fashionrec_cli.datasets.inshop import (
    HEADER,
    PARTITION_FILE,
    plan_inshop,
    view_name,
    write_inshop,
)
from PIL import Image


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(partition: Path) -> tuple[int, str, list[list[str]]]:
    lines = partition.read_text().splitlines()
    return int(lines[0]), lines[1], [line.split(" ") for line in lines[2:]]


def test_layout_matches_the_published_partition_format(tmp_path: Path) -> None:
    partition = write_inshop(tmp_path, n_items=10, views_per_item=3, seed=1, size=64)
    assert partition == tmp_path / PARTITION_FILE == tmp_path / "Eval" / "list_eval_partition.txt"
    count, header, rows = _rows(partition)
    assert header == HEADER == "image_name item_id evaluation_status"
    assert count == len(rows) == 30
    by_item: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        assert len(row) == 3
        image, item, status = row
        parts = image.split("/")
        assert parts[0] == "img" and parts[1] in ("MEN", "WOMEN") and len(parts) == 5
        assert parts[3] == item and len(item) == 11 and item.startswith("id_")
        assert status in ("train", "query", "gallery")
        with Image.open(tmp_path / image) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
        by_item[item].append((parts[4], status))
    assert sorted(by_item) == [f"id_{i:08d}" for i in range(1, 11)]
    statuses = {item: sorted(s for _, s in views) for item, views in by_item.items()}
    train = [item for item, s in statuses.items() if s == ["train"] * 3]
    test = [item for item, s in statuses.items() if s == ["gallery", "gallery", "query"]]
    assert len(train) == 2 and len(test) == 8 and set(train) | set(test) == set(by_item)
    names = {name for views in by_item.values() for name, _ in views}
    assert names == {"01_1_front.jpg", "01_2_side.jpg", "01_3_back.jpg"}


def test_views_of_an_item_are_different_photos(tmp_path: Path) -> None:
    write_inshop(tmp_path, n_items=2, views_per_item=3, seed=0, size=64)
    digests = _digests(tmp_path / "img")
    assert len(set(digests.values())) == 6  # no two files alike


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    write_inshop(tmp_path / "a", n_items=6, views_per_item=2, seed=3, size=48)
    write_inshop(tmp_path / "b", n_items=6, views_per_item=2, seed=3, size=48)
    write_inshop(tmp_path / "c", n_items=6, views_per_item=2, seed=4, size=48)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _digests(tmp_path / "a") != _digests(tmp_path / "c")


def test_view_names_follow_inshop_slots() -> None:
    assert [view_name(v) for v in range(6)] == [
        "01_1_front.jpg",
        "01_2_side.jpg",
        "01_3_back.jpg",
        "01_4_full.jpg",
        "01_7_additional.jpg",
        "02_1_front.jpg",
    ]


def test_plan_validates_arguments() -> None:
    with pytest.raises(ValueError, match="views_per_item"):
        plan_inshop(3, views_per_item=1)
    with pytest.raises(ValueError, match="n_items"):
        plan_inshop(0)
    _, rows = plan_inshop(1, views_per_item=2, train_fraction=0.9)
    assert sorted(r.status for r in rows) == ["gallery", "query"]  # one test item at least
