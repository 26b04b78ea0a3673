from __future__ import annotations

import json
from pathlib import Path

import pytest
from fashionrec_cli.catalog import CatalogError, read_catalog
from PIL import Image


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.png"):
        Image.new("RGB", (8, 8), "red").save(folder / name)
    return folder


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_good_and_bad_rows_with_line_numbers(tmp_path: Path, images: Path) -> None:
    path = _write(
        tmp_path / "cat.csv",
        "sku,title,category,price,image,colour\n"  # line 1
        "A1,Red tee,t-shirt,19.99,a.jpg,red\n"  # 2 ok
        ",No sku,t-shirt,5,b.jpg,\n"  # 3 missing sku
        "A2,Missing file,shirt,10,nope.jpg,\n"  # 4 missing image file
        "A3,Bad price,shirt,cheap,b.jpg,\n"  # 5 bad price
        "A4,Negative,shirt,-1,b.jpg,\n"  # 6 negative price
        "\n"  # 7 blank: skipped
        'A5,"Two-line\ntitle",dress,,c.png,blue\n'  # 8-9 ok, multi-line field
        "A6,No image,dress,3,,\n"  # 10 missing image
        "A1,Duplicate,t-shirt,1,a.jpg,\n"  # 11 duplicate sku
        "A7,Inf,shirt,inf,b.jpg,\n",  # 12 not finite
    )
    catalog = read_catalog(path, images)

    assert [r.sku for r in catalog.rows] == ["A1", "A5"]
    first, second = catalog.rows
    assert first.line == 2 and first.price == 19.99 and first.attributes == {"colour": "red"}
    assert first.image_path == images / "a.jpg"
    assert second.line == 8 and second.price is None and second.title == "Two-line\ntitle"
    assert second.metadata() == {
        "sku": "A5",
        "title": "Two-line\ntitle",
        "category": "dress",
        "price": None,
        "attributes": {"colour": "blue"},
    }

    errors = {e.line: e for e in catalog.errors}
    assert sorted(errors) == [3, 4, 5, 6, 10, 11, 12]
    assert errors[3].message == "missing sku"
    assert "image file not found" in errors[4].message and "nope.jpg" in errors[4].message
    assert "bad price 'cheap'" in errors[5].message
    assert ">= 0" in errors[6].message
    assert errors[10].message == "missing image"
    assert "duplicate sku (first on line 2)" in errors[11].message
    assert "finite" in errors[12].message
    assert str(errors[4]).startswith("line 4 (sku A2): ")
    assert catalog.total == 9


def test_jsonl_rows_attributes_and_errors(tmp_path: Path, images: Path) -> None:
    lines = [
        json.dumps({"sku": "J1", "image": "a.jpg", "price": 5, "attributes": {"fit": "slim"}}),
        "",
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"sku": "J2", "image": str(images / "b.jpg"), "Colour": "navy"}),
        json.dumps({"sku": "J3", "image": "a.jpg", "price": True}),
        json.dumps({"sku": "x" * 200, "image": "a.jpg"}),
        json.dumps({"sku": "J4", "image": "a.jpg", "attributes": [1]}),
    ]
    path = _write(tmp_path / "cat.jsonl", "\n".join(lines) + "\n")
    catalog = read_catalog(path, images)

    assert [(r.line, r.sku) for r in catalog.rows] == [(1, "J1"), (5, "J2")]
    assert catalog.rows[0].attributes == {"fit": "slim"}
    assert catalog.rows[1].attributes == {"colour": "navy"}  # keys are case-insensitive
    assert catalog.rows[1].image_path == images / "b.jpg"  # absolute paths kept
    errors = {e.line: e.message for e in catalog.errors}
    assert sorted(errors) == [3, 4, 6, 7, 8]
    assert errors[3].startswith("invalid JSON")
    assert errors[4] == "expected a JSON object"
    assert "bad price" in errors[6]
    assert "sku" in errors[7] and "128" in errors[7]  # the gateway's own metadata limits
    assert "attributes must be a JSON object" in errors[8]


def test_csv_attributes_column_holds_json(tmp_path: Path, images: Path) -> None:
    path = _write(
        tmp_path / "cat.csv",
        'sku,image,attributes,season\nS1,a.jpg,"{""fit"": ""slim""}",summer\nS2,a.jpg,{bad,\n',
    )
    catalog = read_catalog(path, images)
    assert catalog.rows[0].attributes == {"fit": "slim", "season": "summer"}
    assert [(e.line, e.message) for e in catalog.errors] == [(3, "attributes is not valid JSON")]


def test_images_default_to_the_catalogue_directory(tmp_path: Path, images: Path) -> None:
    path = _write(images / "cat.csv", "sku,image\nD1,a.jpg\n")
    catalog = read_catalog(path)
    assert catalog.images_dir == images and catalog.rows[0].image_path == images / "a.jpg"


def test_too_many_fields_is_a_row_error(tmp_path: Path, images: Path) -> None:
    path = _write(tmp_path / "cat.csv", "sku,image\nT1,a.jpg,extra\nT2,b.jpg\n")
    catalog = read_catalog(path, images)
    assert [r.sku for r in catalog.rows] == ["T2"]
    assert catalog.errors[0].line == 2 and "3 fields" in catalog.errors[0].message


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("cat.csv", "title,price\nx,1\n", r"lacks column\(s\) sku, image"),
        ("cat.csv", "", "empty file"),
        ("cat.xml", "<x/>", "unknown catalogue format"),
        ("cat.csv", b"sku,image\n\xff\xfe,a\n", "not UTF-8"),
    ],
)
def test_unusable_files_raise_catalog_error(
    tmp_path: Path, images: Path, name: str, content: str | bytes, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(CatalogError, match=message):
        read_catalog(path, images)


def test_missing_catalogue_or_images_dir(tmp_path: Path, images: Path) -> None:
    with pytest.raises(CatalogError, match="catalogue file not found"):
        read_catalog(tmp_path / "none.csv", images)
    path = _write(tmp_path / "cat.csv", "sku,image\n")
    with pytest.raises(CatalogError, match="images directory not found"):
        read_catalog(path, tmp_path / "missing")


def test_an_optional_group_column_names_the_variants_product(tmp_path: Path, images: Path) -> None:
    path = _write(
        tmp_path / "cat.csv",
        "sku,title,image,group,colour\n"
        "G1,Tee red,a.jpg,TEE-1,red\n"
        "G2,Tee blue,b.jpg, TEE-1 ,blue\n"
        "G3,Single,c.png,,green\n"
        f"G4,Too long,a.jpg,{'x' * 129},\n",
    )
    catalog = read_catalog(path, images)
    assert [(r.sku, r.group) for r in catalog.rows] == [
        ("G1", "TEE-1"),
        ("G2", "TEE-1"),
        ("G3", None),
    ]
    # The group is the item's own field, not an attribute; a row without one sends no key.
    assert catalog.rows[0].metadata()["group"] == "TEE-1"
    assert catalog.rows[0].attributes == {"colour": "red"}
    assert "group" not in catalog.rows[2].metadata()
    [error] = catalog.errors
    assert error.line == 5 and "group" in error.message

    jsonl = _write(
        tmp_path / "cat.jsonl",
        json.dumps({"sku": "J1", "image": "a.jpg", "group": "COAT-9"}) + "\n",
    )
    assert read_catalog(jsonl, images).rows[0].metadata()["group"] == "COAT-9"
