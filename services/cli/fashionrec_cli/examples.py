"""`fashionrec recommend`'s examples: photo files or item ids; reasons in a few words."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from fashionrec_shared.schemas import Reasons

from fashionrec_cli.client import Upload


class ExampleError(ValueError):
    """An argument that is neither a readable photo nor an item id."""


def read_example(value: str, option: str, *, photos: bool = True) -> Upload | str:
    """An existing file is a photo (`Upload`), else the value must be an item id (a UUID)."""
    path = Path(value).expanduser()
    if photos and path.is_file():
        try:
            return Upload.from_path(path)
        except OSError as exc:
            raise ExampleError(f"{option} {value}: cannot read the photo ({exc})") from None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        what = "no such file and not an item id" if photos else "not an item id"
        raise ExampleError(
            f"{option} {value}: {what} (item ids are UUIDs, as in results' item_id)"
        ) from None


def read_examples(values: Iterable[str], option: str, *, photos: bool = True) -> list[Upload | str]:
    return [read_example(value, option, photos=photos) for value in values]


def liked_names(values: Sequence[str], examples: Sequence[Upload | str]) -> list[str]:
    """The --like arguments in the order `reasons.like` counts them: photos, then item ids (the
    order the client sends them in); photos by file name, ids by their first 8 characters."""
    pairs = list(zip(values, examples, strict=True))
    photos = [Path(value).name for value, example in pairs if isinstance(example, Upload)]
    return photos + [f"item {example[:8]}" for _, example in pairs if isinstance(example, str)]


def describe_reasons(reasons: Reasons | None, likes: Sequence[str] = ()) -> str:
    """`category dress; pattern: striped; colours red, navy; closest to a.jpg` (empty without
    reasons); `likes`: the liked examples' names, as `liked_names` orders them."""
    if reasons is None:
        return ""
    parts = []
    if reasons.category:
        parts.append(f"category {reasons.category}")
    for kind, labels in reasons.attributes.items():
        if labels:
            parts.append(f"{kind}: {', '.join(labels)}")
    if reasons.colours:
        parts.append(f"colours {', '.join(reasons.colours)}")
    if reasons.like is not None:
        known = 0 <= reasons.like < len(likes)
        parts.append(f"closest to {likes[reasons.like] if known else f'like #{reasons.like}'}")
    return "; ".join(parts)
