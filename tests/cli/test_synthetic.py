from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from fashionrec_cli.catalog import read_catalog
from fashionrec_cli.synthetic import (
    CATEGORIES,
    PALETTE,
    PATTERNS,
    GarmentSpec,
    generate_catalog,
    make_garment,
    perturb,
    write_catalog,
)
from PIL import Image, ImageFilter


def _features(img: Image.Image) -> np.ndarray:
    """Small blurred thumbnail, divided by its mean: the brightness change of `perturb` cancels."""
    thumb = img.convert("RGB").resize((16, 16), Image.Resampling.BOX)
    arr = np.asarray(thumb.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    return arr / arr.mean() * 128.0


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    # Flip-invariant: perturb may mirror the photo.
    return min(float(np.abs(a - b).mean()), float(np.abs(a[:, ::-1] - b).mean()))


def test_catalog_is_deterministic_per_seed() -> None:
    a, b = generate_catalog(12, seed=7), generate_catalog(12, seed=7)
    assert a == b
    for x, y in zip(a, b, strict=True):
        assert make_garment(x).tobytes() == make_garment(y).tobytes()
    other = generate_catalog(12, seed=8)
    assert [s.sku for s in other] != [s.sku for s in a]
    pairs = zip(a, other, strict=True)
    assert any(make_garment(x).tobytes() != make_garment(y).tobytes() for x, y in pairs)


def test_specs_are_valid_and_varied() -> None:
    specs = generate_catalog(80, seed=1, size=64)
    assert len({s.sku for s in specs}) == 80
    # Drawn without replacement: no two items share category, colour and pattern.
    assert len({(s.category, s.colour, s.pattern) for s in specs}) == 80
    assert {s.category for s in specs} == set(CATEGORIES)
    assert {s.pattern for s in specs} == set(PATTERNS)
    assert len({s.colour for s in specs}) >= len(PALETTE) - 2
    for s in specs:
        assert s.price > 0
        assert s.attributes["colour"] == s.colour
        assert s.attributes["pattern"] == s.pattern
        assert "sleeve" in s.attributes
        assert s.category in s.title
        img = make_garment(s)
        assert img.mode == "RGB" and img.size == (64, 64)


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_every_category_draws_a_garment_on_background(category: str) -> None:
    spec = GarmentSpec(
        sku="X", title="x", category=category, colour="red", pattern="solid", price=1.0, seed=3
    )
    arr = np.asarray(make_garment(spec), dtype=np.int16)
    red = (arr[..., 0] > 150) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    covered = red.mean()
    assert 0.05 < covered < 0.6, f"{category}: garment covers {covered:.0%} of the image"
    corner = arr[:8, :8].reshape(-1, 3).mean(axis=0)
    assert corner.min() > 190, "background stays light"


def test_distinct_items_differ_more_than_an_item_and_its_perturbation() -> None:
    specs = generate_catalog(40, seed=3)
    originals = [make_garment(s) for s in specs]
    feats = [_features(img) for img in originals]
    perturbed = [_features(perturb(img, seed=100 + i)) for i, img in enumerate(originals)]

    pairs = [
        _distance(feats[i], feats[j]) for i in range(len(feats)) for j in range(len(feats)) if i < j
    ]
    same = [_distance(p, f) for p, f in zip(perturbed, feats, strict=True)]
    assert min(pairs) > 1.0, "two catalogue items look the same"
    assert np.median(pairs) > 2.0 * np.median(same)
    # Retrieval by pixels alone already finds most originals from their perturbed photos.
    hits = sum(
        int(np.argmin([_distance(p, f) for f in feats]) == i) for i, p in enumerate(perturbed)
    )
    assert hits >= 0.85 * len(specs)


def test_perturb_is_a_modified_photo() -> None:
    img = make_garment(generate_catalog(1, seed=5)[0])
    out = perturb(img, seed=11)
    assert out.mode == "RGB"
    w, h = out.size
    assert 0.8 * 256 - 1 <= w <= 256 and 0.8 * 256 - 1 <= h <= 256
    assert perturb(img, seed=11).tobytes() == out.tobytes()
    assert perturb(img, seed=12).tobytes() != out.tobytes()
    assert out.tobytes() != img.resize(out.size).tobytes()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_write_catalog_round_trips_through_the_reader(tmp_path: Path, fmt: str) -> None:
    specs = generate_catalog(6, seed=2, size=96)
    path = write_catalog(specs, tmp_path, fmt=fmt)  # type: ignore[arg-type]
    assert path == tmp_path / f"catalog.{fmt}"
    if fmt == "csv":
        with path.open(newline="") as fh:
            header = next(csv.reader(fh))
        assert header[:5] == ["sku", "title", "category", "price", "image"]
    else:
        first = json.loads(path.read_text().splitlines()[0])
        assert first["image"] == f"images/{specs[0].sku}.jpg"

    catalog = read_catalog(path, tmp_path)
    assert catalog.errors == []
    assert [r.sku for r in catalog.rows] == [s.sku for s in specs]
    for row, spec in zip(catalog.rows, specs, strict=True):
        assert row.title == spec.title and row.category == spec.category
        assert row.price == pytest.approx(spec.price)
        assert row.attributes == spec.attributes
        with Image.open(row.image_path) as img:
            assert img.format == "JPEG" and img.size == (96, 96)


def test_write_catalog_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown catalogue format"):
        write_catalog([], tmp_path, fmt="xml")  # type: ignore[arg-type]
