"""The synthetic DeepFashion Category and Attribute Prediction dataset: layout and labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fashionrec_cli.datasets.deepfashion_attr import (
    ATTRIBUTE_TYPES,
    CATEGORY_NAMES,
    garment_attributes,
    plan_garments,
    write_deepfashion_attributes,
    write_training_csv,
)
from fashionrec_cli.synthetic import FABRICS, generate_catalog, make_garment
from PIL import Image

N = 24


def _rows(path: Path) -> tuple[str, list[str]]:
    lines = path.read_text().splitlines()
    assert int(lines[0]) == len(lines) - 2, path
    return lines[1], lines[2:]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("df")
    assert write_deepfashion_attributes(out, N, seed=3, size=48) == out
    return out


def test_layout_is_the_published_one(root: Path) -> None:
    header, cats = _rows(root / "Anno_coarse" / "list_category_cloth.txt")
    assert header.split() == ["category_name", "category_type"]
    assert [r.split()[0] for r in cats] == [n for n, _ in CATEGORY_NAMES.values()]
    header, attrs = _rows(root / "Anno_coarse" / "list_attr_cloth.txt")
    assert header.split() == ["attribute_name", "attribute_type"]
    parsed = [r.rsplit(None, 1) for r in attrs]
    assert {int(t) for _, t in parsed} == set(ATTRIBUTE_TYPES)
    assert "polka dot" in [n.strip() for n, _ in parsed]
    _, cat_img = _rows(root / "Anno_coarse" / "list_category_img.txt")
    _, attr_img = _rows(root / "Anno_coarse" / "list_attr_img.txt")
    _, partition = _rows(root / "Eval" / "list_eval_partition.txt")
    assert len(cat_img) == len(attr_img) == len(partition) == N
    for c, a, p in zip(cat_img, attr_img, partition, strict=True):
        name = c.split()[0]
        assert name.startswith("img/") and a.split()[0] == p.split()[0] == name
        assert 1 <= int(c.split()[1]) <= len(cats)
        values = a.split()[1:]
        assert len(values) == len(attrs) and set(values) <= {"1", "-1"}
        assert p.split()[1] in ("train", "val", "test")
        with Image.open(root / name) as img:
            assert img.format == "JPEG" and img.size == (48, 48)
    assert {p.split()[1] for p in partition} == {"train", "val", "test"}


def test_labels_follow_from_the_drawing(root: Path) -> None:
    garments = plan_garments(N, seed=3, size=48)
    _, cat_img = _rows(root / "Anno_coarse" / "list_category_img.txt")
    categories = list(CATEGORY_NAMES)
    for garment, row in zip(garments, cat_img, strict=True):
        spec, attrs = garment.spec, garment.attributes
        assert categories[int(row.split()[1]) - 1] == spec.category
        assert ("hood" in attrs["part"]) == (spec.category == "hoodie")
        assert ("striped" in attrs["texture"]) == spec.pattern.startswith("stripes")
        assert attrs["fabric"] == [spec.fabric] and spec.fabric in FABRICS
        assert len(attrs["shape"]) == 2 and len(attrs["style"]) == 1
    # The fabric is drawn: the same garment in another fabric has other pixels.
    spec = garments[0].spec
    other = next(f for f in FABRICS if f != spec.fabric)
    assert (
        make_garment(spec).tobytes()
        != make_garment(dataclasses.replace(spec, fabric=other)).tobytes()
    )


def test_existing_catalogues_draw_as_before() -> None:
    # fabric=None (the default) draws no surface: catalogue images did not change.
    spec = generate_catalog(1, seed=0, size=64)[0]
    assert spec.fabric is None
    plain = dataclasses.replace(spec, fabric="cotton")
    assert make_garment(spec).tobytes() == make_garment(plain).tobytes()
    assert garment_attributes(spec)["fabric"] == ["cotton"]


def test_deterministic_and_csv_layout(root: Path, tmp_path: Path) -> None:
    again = write_deepfashion_attributes(tmp_path / "again", N, seed=3, size=48)
    for name in ("Anno_coarse/list_attr_img.txt", "Eval/list_eval_partition.txt"):
        assert (again / name).read_bytes() == (root / name).read_bytes()
    path = write_training_csv(tmp_path / "csv", 6, seed=3, size=48)
    lines = path.read_text().splitlines()
    assert lines[0] == "image,category,attributes,split" and len(lines) == 7
    image, _, attributes, split = lines[1].split(",")
    assert (path.parent / image).is_file() and split in ("train", "val", "test")
    assert all(":" in token and " " not in token for token in attributes.split())
