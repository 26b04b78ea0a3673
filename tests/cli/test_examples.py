"""`fashionrec recommend`'s examples: a file is a photo, anything else must be an item id."""

from __future__ import annotations

from pathlib import Path

import pytest
from fashionrec_cli.client import Upload
from fashionrec_cli.examples import (
    ExampleError,
    describe_reasons,
    liked_names,
    read_example,
    read_examples,
)
from fashionrec_shared.schemas import Reasons

ITEM = "0b7e3c1a-58a4-4c1e-9d55-8f2b0c7a9e11"


def test_an_existing_file_is_a_photo_and_an_id_is_normalised(tmp_path: Path) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"\xff\xd8 jpeg bytes")
    photo_example, item = read_examples([str(photo), ITEM.upper()], "--like")
    assert isinstance(photo_example, Upload)
    assert (photo_example.name, photo_example.data) == ("a.jpg", b"\xff\xd8 jpeg bytes")
    assert photo_example.content_type == "image/jpeg"
    assert item == ITEM


def test_a_missing_path_that_is_no_id_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExampleError, match="no such file and not an item id") as caught:
        read_example(str(tmp_path / "nope.jpg"), "--dislike")
    assert str(caught.value).startswith("--dislike ")


def test_excluded_items_are_ids_only(tmp_path: Path) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"x")
    with pytest.raises(ExampleError, match=r"--exclude .*: not an item id"):
        read_example(str(photo), "--exclude", photos=False)


def test_reasons_in_a_few_words() -> None:
    reasons = Reasons(
        score=0.9,
        like=1,
        category="dress",
        attributes={"pattern": ["striped"], "fabric": []},
        colours=["red", "navy"],
    )
    assert describe_reasons(reasons, ["a.jpg", "item 0b7e3c1a"]) == (
        "category dress; pattern: striped; colours red, navy; closest to item 0b7e3c1a"
    )
    assert describe_reasons(reasons).endswith("; closest to like #1")
    assert describe_reasons(None) == ""
    assert describe_reasons(Reasons(score=0.5)) == ""


def test_liked_names_follow_the_order_reasons_count_in(tmp_path: Path) -> None:
    """Photos first, then ids: what the client sends and reasons.like numbers."""
    photo = tmp_path / "b.jpg"
    photo.write_bytes(b"x")
    values = [ITEM, str(photo)]
    assert liked_names(values, read_examples(values, "--like")) == ["b.jpg", f"item {ITEM[:8]}"]
