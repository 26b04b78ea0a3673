"""Catalogue files for `fashionrec ingest`: CSV or JSON Lines, one item per row.

Columns (CSV) or keys (JSONL): sku, title, category, price, image, and optionally group (the
product the item is a variant of: a colourway or size; results show one item per group). `image`
is a path relative to the images directory (default: the catalogue's directory); absolute paths
are used as they are.
Any other column goes into the item's attributes; an `attributes` column/key holding a JSON object
is merged in too. A bad row never stops the reading: it becomes a `RowError` with its line number,
and the good rows are still returned.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fashionrec_shared.schemas import ItemMetadata
from pydantic import ValidationError

CatalogFormat = Literal["csv", "jsonl"]
KNOWN_FIELDS = ("sku", "title", "category", "price", "image", "group")
_SUFFIX_FORMATS: dict[str, CatalogFormat] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


class CatalogError(Exception):
    """The file as a whole cannot be read (missing, unknown format, no sku/image column)."""


@dataclass(frozen=True)
class RowError:
    line: int
    message: str
    sku: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (sku {self.sku})" if self.sku else "")
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class CatalogRow:
    line: int
    sku: str
    title: str | None
    category: str | None
    price: float | None
    image_path: Path
    attributes: dict[str, Any] = field(default_factory=dict)
    group: str | None = None

    def metadata(self) -> dict[str, Any]:
        """The `metadata` JSON of `POST /v1/items` (`group` only when set: a gateway older than
        groups refuses the key)."""
        meta: dict[str, Any] = {
            "sku": self.sku,
            "title": self.title,
            "category": self.category,
            "price": self.price,
            "attributes": self.attributes,
        }
        if self.group is not None:
            meta["group"] = self.group
        return meta


@dataclass
class Catalog:
    path: Path
    images_dir: Path
    rows: list[CatalogRow] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.errors)


def detect_format(path: Path) -> CatalogFormat:
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CatalogError(f"{path}: unknown catalogue format (use .csv or .jsonl)")
    return fmt


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_price(value: Any) -> float | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"bad price {value!r}: not a number")
    try:
        price = float(str(value).strip()) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise ValueError(f"bad price {value!r}: not a number") from None
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"bad price {value!r}: must be a finite number >= 0")
    return price


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


class _RowBuilder:
    """Validates raw records into rows; remembers SKUs to report duplicates."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir
        self.seen: dict[str, int] = {}

    def build(self, line: int, record: dict[str, Any]) -> CatalogRow | RowError:
        raw_sku = record.get("sku")
        sku = str(raw_sku).strip() if not _blank(raw_sku) else None
        if sku is None:
            return RowError(line, "missing sku")
        if sku in self.seen:
            return RowError(line, f"duplicate sku (first on line {self.seen[sku]})", sku)
        try:
            price = _parse_price(record.get("price"))
        except ValueError as exc:
            return RowError(line, str(exc), sku)

        attributes: dict[str, Any] = {}
        extra = record.get("attributes")
        if isinstance(extra, str) and extra.strip():
            try:
                extra = json.loads(extra)
            except json.JSONDecodeError:
                return RowError(line, "attributes is not valid JSON", sku)
        if isinstance(extra, dict):
            attributes.update(extra)
        elif not _blank(extra):
            return RowError(line, "attributes must be a JSON object", sku)
        for key, value in record.items():
            if key in KNOWN_FIELDS or key == "attributes" or key is None or _blank(value):
                continue
            attributes[str(key)] = value.strip() if isinstance(value, str) else value

        def text(key: str) -> str | None:
            value = record.get(key)
            return None if _blank(value) else str(value).strip()

        try:
            meta = ItemMetadata(
                sku=sku,
                title=text("title"),
                category=text("category"),
                price=price,
                attributes=attributes,
                group=text("group"),
            )
        except ValidationError as exc:
            return RowError(line, _describe(exc), sku)

        image = text("image")
        if image is None:
            return RowError(line, "missing image", sku)
        image_path = Path(image).expanduser()
        if not image_path.is_absolute():
            image_path = self.images_dir / image_path
        if not image_path.is_file():
            return RowError(line, f"image file not found: {image_path}", sku)

        self.seen[sku] = line
        return CatalogRow(
            line=line,
            sku=meta.sku,
            title=meta.title,
            category=meta.category,
            price=meta.price,
            image_path=image_path,
            attributes=meta.attributes,
            group=meta.group,
        )


def _read_csv(path: Path, builder: _RowBuilder, catalog: Catalog) -> None:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise CatalogError(f"{path}: empty file (expected a header row)") from None
        columns = [h.strip().lower() for h in header]
        missing = [c for c in ("sku", "image") if c not in columns]
        if missing:
            raise CatalogError(f"{path}: header lacks column(s) {', '.join(missing)}")
        # A quoted field may span lines: a record starts on the line after the previous one ended.
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                catalog.errors.append(RowError(start, f"unreadable CSV: {exc}"))
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(columns):
                catalog.errors.append(
                    RowError(line, f"{len(values)} fields, header has {len(columns)}")
                )
                continue
            record = dict(zip(columns, values, strict=False))
            _add(catalog, builder.build(line, record))


def _read_jsonl(path: Path, builder: _RowBuilder, catalog: Catalog) -> None:
    with path.open(encoding="utf-8-sig") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                catalog.errors.append(RowError(line, f"invalid JSON: {exc.msg}"))
                continue
            if not isinstance(record, dict):
                catalog.errors.append(RowError(line, "expected a JSON object"))
                continue
            record = {str(k).strip().lower(): v for k, v in record.items()}
            _add(catalog, builder.build(line, record))


def _add(catalog: Catalog, result: CatalogRow | RowError) -> None:
    if isinstance(result, RowError):
        catalog.errors.append(result)
    else:
        catalog.rows.append(result)


def read_catalog(
    path: Path | str, images_dir: Path | str | None = None, *, fmt: CatalogFormat | None = None
) -> Catalog:
    """Read and validate a catalogue; bad rows land in `errors`, never raise.

    Raises CatalogError only when the file itself is unusable.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: catalogue file not found")
    fmt = fmt or detect_format(path)
    images = Path(images_dir) if images_dir is not None else path.parent
    if not images.is_dir():
        raise CatalogError(f"{images}: images directory not found")
    catalog = Catalog(path=path, images_dir=images)
    builder = _RowBuilder(images)
    try:
        if fmt == "csv":
            _read_csv(path, builder, catalog)
        else:
            _read_jsonl(path, builder, catalog)
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return catalog
