"""The DeepFashion In-shop retrieval protocol file: Eval/list_eval_partition.txt.

Published format (Liu et al., CVPR 2016): line 1 is the number of rows, line 2 the header
`image_name item_id evaluation_status`, then one whitespace-separated row per image with status
train, query or gallery. Image names are relative to the dataset root (`img/WOMEN/...jpg`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PARTITION_FILE = Path("Eval") / "list_eval_partition.txt"
HEADER = ("image_name", "item_id", "evaluation_status")
STATUSES = ("train", "query", "gallery")


class EvaluationError(RuntimeError):
    """The dataset cannot be evaluated (missing or malformed files, nothing to rank)."""


@dataclass(frozen=True)
class InShopPartition:
    root: Path
    query_images: list[str]
    query_items: list[str]
    gallery_images: list[str]
    gallery_items: list[str]
    train_images: int


def read_partition(root: Path | str) -> InShopPartition:
    """Parse and check `root/Eval/list_eval_partition.txt`; raises EvaluationError."""
    root = Path(root)
    path = root / PARTITION_FILE
    if not path.is_file():
        raise EvaluationError(
            f"{path} not found: expected the DeepFashion In-shop layout "
            f"(DIR/{PARTITION_FILE} and DIR/img/...)"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise EvaluationError(f"{path}: expected a row count and a header line")
    try:
        declared = int(lines[0])
    except ValueError:
        raise EvaluationError(
            f"{path}: line 1 must be the number of rows, got {lines[0][:40]!r}"
        ) from None
    if tuple(lines[1].split()) != HEADER:
        raise EvaluationError(f"{path}: line 2 must be the header {' '.join(HEADER)!r}")
    rows = lines[2:]
    if declared != len(rows):
        raise EvaluationError(f"{path}: line 1 announces {declared} rows, the file has {len(rows)}")
    queries: list[tuple[str, str]] = []
    gallery: list[tuple[str, str]] = []
    train = 0
    for number, line in enumerate(rows, start=3):
        fields = line.split()
        if len(fields) != 3:
            raise EvaluationError(f"{path}:{number}: expected 3 fields, got {len(fields)}")
        image, item, status = fields
        if status not in STATUSES:
            raise EvaluationError(
                f"{path}:{number}: unknown evaluation_status {status!r} "
                f"(expected one of {', '.join(STATUSES)})"
            )
        if Path(image).is_absolute():
            raise EvaluationError(f"{path}:{number}: image_name must be relative to the root")
        if status == "query":
            queries.append((image, item))
        elif status == "gallery":
            gallery.append((image, item))
        else:
            train += 1
    if not queries or not gallery:
        raise EvaluationError(f"{path}: needs at least one query and one gallery image")
    return InShopPartition(
        root=root,
        query_images=[image for image, _ in queries],
        query_items=[item for _, item in queries],
        gallery_images=[image for image, _ in gallery],
        gallery_items=[item for _, item in gallery],
        train_images=train,
    )


def check_images(partition: InShopPartition) -> None:
    """Fail before loading a model when listed query/gallery images are missing."""
    names = partition.query_images + partition.gallery_images
    missing = [name for name in names if not (partition.root / name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise EvaluationError(
            f"{len(missing)} of {len(names)} query/gallery images are missing under "
            f"{partition.root}: {shown}"
        )
