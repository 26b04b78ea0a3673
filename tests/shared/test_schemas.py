"""The payload schemas refuse values Postgres cannot store, naming where they are."""

from __future__ import annotations

import math
from typing import Any

import pytest
from fashionrec_shared.schemas import (
    UNSTORABLE,
    ItemMetadata,
    SearchFilters,
    UpsertItem,
    check_storable_json,
)
from pydantic import ValidationError

IMAGE = {"key": "inventory/" + "a" * 64 + ".jpg", "sha256": "a" * 64}


def only_error(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, Any]:
    [error] = exc.value.errors()
    return error


@pytest.mark.parametrize("field", ["title", "category"])
def test_text_fields(field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ItemMetadata.model_validate({"sku": "X", field: "a\x00b"})
    error = only_error(exc)
    assert error["loc"] == (field,)
    assert error["type"] == UNSTORABLE and "NUL character" in error["msg"]
    # A lone surrogate pydantic refuses in any str field itself.
    with pytest.raises(ValidationError) as exc:
        ItemMetadata.model_validate({"sku": "X", field: "a\ud800b"})
    assert only_error(exc)["loc"] == (field,)


def test_sku_with_a_nul() -> None:
    with pytest.raises(ValidationError) as exc:
        ItemMetadata.model_validate_json(r'{"sku": "X\u0000"}')
    assert only_error(exc)["loc"] == ("sku",)


@pytest.mark.parametrize(
    ("attributes", "path", "reason"),
    [
        ({"colour": "re\x00d"}, "attributes.colour", "NUL"),
        ({"col\x00our": "red"}, 'attributes["col\\u0000our"]', "key contains a NUL"),
        ({"a b": {"c": ["ok", "\x00"]}}, 'attributes["a b"].c[1]', "NUL"),
        ({"sizes": [{"eu": [38, "4\ud83d"]}]}, "attributes.sizes[0].eu[1]", "surrogate"),
        ({"weight": math.nan}, "attributes.weight", "finite"),
        ({"weight": [math.inf]}, "attributes.weight[0]", "finite"),
    ],
)
def test_attributes_at_any_depth(attributes: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ItemMetadata.model_validate({"sku": "X", "attributes": attributes})
    error = only_error(exc)
    assert error["loc"] == ("attributes",)
    assert error["ctx"] == {"path": path}
    assert reason in error["msg"]


def test_nan_from_json() -> None:
    with pytest.raises(ValidationError) as exc:
        ItemMetadata.model_validate_json('{"sku": "X", "attributes": {"w": NaN}}')
    assert only_error(exc)["ctx"] == {"path": "attributes.w"}


def test_storable_values_pass() -> None:
    attributes = {"colour": "rot", "sizes": [36, 38.5, None, True], "ü": {"nested": "日本"}}
    meta = ItemMetadata.model_validate(
        {"sku": "X-1", "title": " Kleid\tblau ", "category": "dress", "attributes": attributes}
    )
    assert meta.title == "Kleid\tblau"  # control characters other than NUL are storable
    assert meta.attributes == attributes
    check_storable_json(attributes, "attributes")


def test_the_indexer_payload_checks_the_same() -> None:
    with pytest.raises(ValidationError) as exc:
        UpsertItem.model_validate({"metadata": {"sku": "X", "title": "\x00"}, "image": IMAGE})
    assert only_error(exc)["loc"] == ("metadata", "title")


@pytest.mark.parametrize("field", ["category", "predicted_category"])
def test_filters(field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        SearchFilters.model_validate({field: "dr\x00ess"})
    assert only_error(exc)["loc"] == (field,)
    assert SearchFilters.model_validate({field: "dress"}).any_set()
