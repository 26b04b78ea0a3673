"""Training data readers: DeepFashion *Category and Attribute Prediction* and a simple CSV.

DeepFashion (a directory): `Anno_coarse/` (or the older release's `Anno/`) with
list_category_cloth.txt, list_category_img.txt, list_attr_cloth.txt, list_attr_img.txt (labels
1/-1, or 1/0), and `Eval/list_eval_partition.txt` (train | val | test). Every list file starts
with a count line and a header line. Attribute types become heads: 1 texture, 2 fabric, 3 shape,
4 part, 5 style. Images are `<root>/<image_name>`.

CSV (a .csv file, or a directory holding labels.csv): header `image,category[,attributes][,split]`.
`image` is relative to the CSV's directory; `attributes` is space-separated tokens `type:name`
(head `type`) or plain `name` (head `attributes`), with `_` standing for a space inside a name;
`split` is train | val | test. Without splits, a seeded random 20% of the rows validate.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

from fashionrec_embedder.network import HeadSpec

ATTRIBUTE_TYPES = {1: "texture", 2: "fabric", 3: "shape", 4: "part", 5: "style"}
ANNO_DIRS = ("Anno_coarse", "Anno")
PARTITION = Path("Eval") / "list_eval_partition.txt"
CSV_NAME = "labels.csv"
PLAIN_HEAD = "attributes"
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class DataError(ValueError):
    """The training data is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Sample:
    image: Path
    category: str
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # head -> names
    split: str = "train"


@dataclass
class TrainingData:
    root: Path
    layout: str  # deepfashion | csv
    categories: list[str]
    attribute_heads: dict[str, list[str]]  # head name -> classes, in head order
    samples: list[Sample]

    def heads(self) -> list[HeadSpec]:
        heads = [HeadSpec("category", "single_label", tuple(self.categories))]
        heads += [
            HeadSpec(name, "multi_label", tuple(classes))
            for name, classes in self.attribute_heads.items()
            if classes
        ]
        return heads

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]


def _rows(path: Path) -> list[str]:
    """The data rows of a DeepFashion list file (after the count and header lines)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{path}: expected a count line and a header line first")
    rows = [line for line in lines[2:] if line.strip()]
    if int(lines[0]) != len(rows):
        raise DataError(f"{path}: the count line says {lines[0].strip()}, found {len(rows)} rows")
    return rows


def _name_and_type(path: Path, row: str) -> tuple[str, int]:
    # Names may contain spaces; the type is the last token.
    parts = row.rsplit(None, 1)
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise DataError(f"{path}: bad row {row!r} (expected `name type`)")
    return parts[0].strip(), int(parts[1])


def _split_of(status: str, where: str) -> str:
    split = _SPLITS.get(status.strip().lower())
    if split is None:
        raise DataError(f"{where}: unknown split {status!r} (use train, val or test)")
    return split


def _random_validation(samples: list[Sample], seed: int, fraction: float = 0.2) -> list[Sample]:
    if any(s.split == "val" for s in samples):
        return samples
    train = [i for i, s in enumerate(samples) if s.split == "train"]
    rnd = random.Random(seed)
    held = set(rnd.sample(train, max(1, round(len(train) * fraction)))) if len(train) > 1 else set()
    return [
        Sample(s.image, s.category, s.attributes, "val") if i in held else s
        for i, s in enumerate(samples)
    ]


def read_deepfashion(root: Path, seed: int = 0) -> TrainingData:
    anno = next(
        (root / d for d in ANNO_DIRS if (root / d / "list_category_img.txt").is_file()), None
    )
    if anno is None:
        raise DataError(f"{root}: no Anno_coarse/ or Anno/ with list_category_img.txt")
    cloth = anno / "list_category_cloth.txt"
    categories = [_name_and_type(cloth, row)[0] for row in _rows(cloth)]
    labels: dict[str, str] = {}
    cat_img = anno / "list_category_img.txt"
    for row in _rows(cat_img):
        parts = row.split()
        if len(parts) != 2 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(categories):
            raise DataError(f"{cat_img}: bad row {row!r} (expected `image_name 1..N`)")
        labels[parts[0]] = categories[int(parts[1]) - 1]

    heads: dict[str, list[str]] = {}
    attr_heads: list[tuple[str, str]] = []  # (head, name) per column
    attr_cloth, attr_img = anno / "list_attr_cloth.txt", anno / "list_attr_img.txt"
    if attr_cloth.is_file() and attr_img.is_file():
        for row in _rows(attr_cloth):
            name, kind = _name_and_type(attr_cloth, row)
            attr_heads.append((ATTRIBUTE_TYPES.get(kind, f"type{kind}"), name))
        for head, name in attr_heads:
            heads.setdefault(head, []).append(name)
        # Heads in type order (texture, fabric, shape, part, style), unknown types after.
        rank = {name: kind for kind, name in ATTRIBUTE_TYPES.items()}
        heads = dict(sorted(heads.items(), key=lambda item: rank.get(item[0], 99)))
    attributes: dict[str, dict[str, tuple[str, ...]]] = {}
    if attr_heads:
        for row in _rows(attr_img):
            parts = row.split()
            values = parts[1:]
            if len(values) != len(attr_heads) or not set(values) <= {"1", "-1", "0"}:
                raise DataError(
                    f"{attr_img}: row for {parts[0] if parts else '?'} needs "
                    f"{len(attr_heads)} values of 1/-1 (or 1/0)"
                )
            shown: dict[str, list[str]] = {}
            for (head, name), value in zip(attr_heads, values, strict=True):
                if value == "1":
                    shown.setdefault(head, []).append(name)
            attributes[parts[0]] = {h: tuple(v) for h, v in shown.items()}

    partition: dict[str, str] = {}
    if (root / PARTITION).is_file():
        for row in _rows(root / PARTITION):
            parts = row.split()
            if len(parts) != 2:
                raise DataError(f"{root / PARTITION}: bad row {row!r}")
            partition[parts[0]] = _split_of(parts[1], str(root / PARTITION))
    samples = [
        Sample(root / name, category, attributes.get(name, {}), partition.get(name, "train"))
        for name, category in labels.items()
    ]
    return TrainingData(root, "deepfashion", categories, heads, _random_validation(samples, seed))


def read_csv(path: Path, seed: int = 0) -> TrainingData:
    root = path.parent
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
            fields = set(rows[0]) if rows else set()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not rows or not {"image", "category"} <= fields:
        raise DataError(f"{path}: needs a header with columns image,category[,attributes][,split]")
    samples: list[Sample] = []
    heads: dict[str, set[str]] = {}
    for line, row in enumerate(rows, start=2):
        image, category = (row.get("image") or "").strip(), (row.get("category") or "").strip()
        if not image or not category:
            raise DataError(f"{path}:{line}: image and category must not be empty")
        shown: dict[str, list[str]] = {}
        for token in (row.get("attributes") or "").split():
            head, _, name = token.rpartition(":")
            head, name = head or PLAIN_HEAD, name.replace("_", " ")
            if head == "category":
                raise DataError(f"{path}:{line}: 'category' is not an attribute type")
            shown.setdefault(head, []).append(name)
            heads.setdefault(head, set()).add(name)
        split = _split_of(row.get("split") or "train", f"{path}:{line}")
        attrs = {h: tuple(dict.fromkeys(v)) for h, v in shown.items()}
        samples.append(Sample(root / image, category, attrs, split))
    categories = sorted({s.category for s in samples})
    attribute_heads = {h: sorted(names) for h, names in sorted(heads.items())}
    return TrainingData(root, "csv", categories, attribute_heads, _random_validation(samples, seed))


def read_training_data(path: Path | str, seed: int = 0, check_images: bool = True) -> TrainingData:
    """Read either layout (chosen from what `path` holds)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        data = read_csv(path, seed)
    elif path.is_dir() and any((path / d / "list_category_img.txt").is_file() for d in ANNO_DIRS):
        data = read_deepfashion(path, seed)
    elif path.is_dir() and (path / CSV_NAME).is_file():
        data = read_csv(path / CSV_NAME, seed)
    else:
        raise DataError(
            f"{path}: not training data; pass a DeepFashion Category and Attribute Prediction "
            f"directory (Anno_coarse/ or Anno/, Eval/, img/), a .csv file, or a directory with "
            f"{CSV_NAME}"
        )
    if not data.split("train"):
        raise DataError(f"{path}: no training images")
    if not data.split("val"):
        raise DataError(f"{path}: no validation images (split `val`)")
    if check_images:
        missing = [s.image for s in data.samples if s.split != "test" and not s.image.is_file()]
        if missing:
            raise DataError(f"{len(missing)} images are missing, e.g. {missing[0]}")
    return data
