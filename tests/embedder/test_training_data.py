"""Readers of the training layouts: DeepFashion (Anno_coarse / Anno, 1/-1 or 1/0) and CSV."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fashionrec_cli.datasets.deepfashion_attr import (
    plan_garments,
    write_deepfashion_attributes,
    write_training_csv,
)
from fashionrec_embedder.training.data import DataError, read_training_data


@pytest.fixture(scope="module")
def deepfashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("df")
    write_deepfashion_attributes(root, 30, seed=4, size=48)
    return root


def test_deepfashion_layout_parses_back_to_the_drawn_labels(deepfashion: Path) -> None:
    data = read_training_data(deepfashion)
    garments = {g.image_name: g for g in plan_garments(30, seed=4, size=48)}
    assert data.layout == "deepfashion" and len(data.samples) == 30
    assert [h.name for h in data.heads()] == [
        "category",
        "texture",
        "fabric",
        "shape",
        "part",
        "style",
    ]
    assert "polka dot" in data.attribute_heads["texture"]  # names with spaces survive
    for sample in data.samples:
        garment = garments[sample.image.relative_to(deepfashion).as_posix()]
        assert sample.split == garment.status
        assert {h: set(v) for h, v in sample.attributes.items()} == {
            h: set(v) for h, v in garment.attributes.items() if v
        }
    assert {s.split for s in data.samples} == {"train", "val", "test"}


def test_old_anno_folder_and_zero_labels(deepfashion: Path, tmp_path: Path) -> None:
    copy = tmp_path / "df"
    shutil.copytree(deepfashion, copy)
    (copy / "Anno_coarse").rename(copy / "Anno")
    attr = copy / "Anno" / "list_attr_img.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join(lines[:2] + [line.replace("-1", "0") for line in lines[2:]]) + "\n")
    a, b = read_training_data(deepfashion), read_training_data(copy)
    assert [s.attributes for s in a.samples] == [s.attributes for s in b.samples]


def test_csv_layout(tmp_path: Path) -> None:
    path = write_training_csv(tmp_path, 20, seed=5, size=48)
    header = path.read_text().splitlines()[0]
    assert header == "image,category,attributes,split"
    data = read_training_data(path)
    assert data.layout == "csv" and read_training_data(tmp_path).samples == data.samples
    # `_` in a token stands for a space: names read back as DeepFashion spells them.
    assert any(
        " " in name for name in data.attribute_heads["texture"] + data.attribute_heads["part"]
    )
    assert set(data.categories) <= {
        "t-shirt",
        "shirt",
        "tank-top",
        "hoodie",
        "jacket",
        "coat",
        "dress",
        "skirt",
        "trousers",
        "shorts",
    }
    # Plain tokens go to one head; without a split column a validation share is held out.
    plain = tmp_path / "plain.csv"
    plain.write_text(
        "image,category,attributes\n"
        + "".join(
            f"images/{p.name},c{i % 2},red cotton_blend\n"
            for i, p in enumerate(sorted((tmp_path / "images").iterdir()))
        )
    )
    data = read_training_data(plain)
    assert data.attribute_heads == {"attributes": ["cotton blend", "red"]}
    assert data.split("val") and data.split("train")


def test_bad_data_gives_clear_errors(deepfashion: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not training data"):
        read_training_data(tmp_path)
    copy = tmp_path / "df"
    shutil.copytree(deepfashion, copy)
    attr = copy / "Anno_coarse" / "list_attr_img.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join([*lines[:2], lines[2] + " 1", *lines[3:]]) + "\n")
    with pytest.raises(DataError, match="values of 1/-1"):
        read_training_data(copy)
    (copy / "Anno_coarse" / "list_category_img.txt").write_text("5\nimage_name x\n")
    with pytest.raises(DataError, match="count line"):
        read_training_data(copy)
