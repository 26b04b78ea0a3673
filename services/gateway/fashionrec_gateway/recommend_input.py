"""The examples of `POST /v1/recommend`, read from a form (photos and ids) or a JSON body (ids).

Forms: `like` / `dislike` file parts (photos), `like_item` / `dislike_item` / `exclude` text
parts (item ids), each repeatable; multipart, or urlencoded when there are no photos. JSON:
`{"like_items": [...], "dislike_items": [...], "exclude": [...]}`, for a frontend that builds a
feed from item ids alone. Everything here is checked before a photo is read or stored.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import MAX_EXCLUDE, MAX_RECOMMEND_EXAMPLES, MAX_RECOMMEND_PHOTOS
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

PHOTO_PARTS = ("like", "dislike")
ID_PARTS = ("like_item", "dislike_item", "exclude")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_TYPE = "application/json"
# Parts a form may hold before the parser refuses it (a 400): room for every limit above, so
# our own checks answer first with what is wrong.
MAX_FORM_FILES = MAX_RECOMMEND_EXAMPLES
MAX_FORM_FIELDS = MAX_EXCLUDE + 2 * MAX_RECOMMEND_EXAMPLES

_IDS_HELP = "item ids (UUIDs, as in results' `item_id`)"


class RecommendIds(BaseModel):
    """The JSON body: examples by item id only."""

    model_config = ConfigDict(extra="forbid")

    like_items: list[str] = Field(default_factory=list, description=f"liked {_IDS_HELP}")
    dislike_items: list[str] = Field(default_factory=list, description=f"disliked {_IDS_HELP}")
    exclude: list[str] = Field(
        default_factory=list,
        description=f"{_IDS_HELP} never to answer (already shown or bought), at most {MAX_EXCLUDE}",
    )


MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "like": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "liked photos (one part each)",
        },
        "dislike": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "disliked photos (one part each)",
        },
        "like_item": {
            "type": "array",
            "items": {"type": "string", "format": "uuid"},
            "description": f"liked {_IDS_HELP}, one part each",
        },
        "dislike_item": {
            "type": "array",
            "items": {"type": "string", "format": "uuid"},
            "description": f"disliked {_IDS_HELP}, one part each",
        },
        "exclude": {
            "type": "array",
            "items": {"type": "string", "format": "uuid"},
            "description": f"{_IDS_HELP} never to answer, one part each",
        },
    },
}

REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": MULTIPART_SCHEMA},
        JSON_TYPE: {"schema": RecommendIds.model_json_schema()},
    },
}


@dataclass
class Examples:
    """A request's examples, ids normalised and de-duplicated, counts within the limits."""

    liked_photos: list[BinaryIO] = field(default_factory=list)
    disliked_photos: list[BinaryIO] = field(default_factory=list)
    liked_items: list[str] = field(default_factory=list)
    disliked_items: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    @property
    def photos(self) -> int:
        return len(self.liked_photos) + len(self.disliked_photos)


def _unprocessable(detail: str) -> ProblemError:
    return ProblemError(422, "Unprocessable Content", detail)


def item_ids(values: Iterable[str], what: str) -> list[str]:
    """Canonical UUID strings, first occurrence kept; 422 naming the first malformed one."""
    out: dict[str, None] = {}
    for n, value in enumerate(values):
        try:
            out[str(uuid.UUID(value.strip()))] = None
        except (ValueError, AttributeError):
            raise _unprocessable(
                f"{what}[{n}]: {str(value)[:80]!r} is not an item id (a UUID)"
            ) from None
    return list(out)


def check_examples(examples: Examples) -> Examples:
    """The limits and contradictions of a request's examples, as 422 problems."""
    if not examples.liked_photos and not examples.liked_items:
        raise _unprocessable(
            "no liked example: send at least one liked photo (`like`) or item id "
            "(`like_item`, JSON `like_items`)"
        )
    if examples.photos > MAX_RECOMMEND_PHOTOS:
        raise _unprocessable(
            f"{examples.photos} photos in one request; at most {MAX_RECOMMEND_PHOTOS} are allowed"
        )
    total = examples.photos + len(examples.liked_items) + len(examples.disliked_items)
    if total > MAX_RECOMMEND_EXAMPLES:
        raise _unprocessable(
            f"{total} examples (photos and item ids) in one request; at most "
            f"{MAX_RECOMMEND_EXAMPLES} are allowed"
        )
    if len(examples.exclude) > MAX_EXCLUDE:
        raise _unprocessable(
            f"{len(examples.exclude)} items to exclude; at most {MAX_EXCLUDE} are allowed"
        )
    both = set(examples.liked_items) & set(examples.disliked_items)
    if both:
        raise _unprocessable(f"items both liked and disliked: {', '.join(sorted(both))}")
    return examples


def _from_json(raw: bytes) -> Examples:
    try:
        ids = RecommendIds.model_validate_json(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "json_invalid":
                parts.append("the body is not valid JSON")
            elif err["type"] == "model_type":
                parts.append('the body must be a JSON object: {"like_items": [...], ...}')
            else:
                parts.append(f"{where}: {err['msg']}" if where else err["msg"])
        raise _unprocessable("; ".join(parts)) from exc
    return Examples(
        liked_items=item_ids(ids.like_items, "like_items"),
        disliked_items=item_ids(ids.dislike_items, "dislike_items"),
        exclude=item_ids(ids.exclude, "exclude"),
    )


def _from_form(items: Iterable[tuple[str, str | UploadFile]]) -> Examples:
    photos: dict[str, list[BinaryIO]] = {name: [] for name in PHOTO_PARTS}
    ids: dict[str, list[str]] = {name: [] for name in ID_PARTS}
    for name, value in items:
        if name in photos:
            if not isinstance(value, UploadFile):
                raise _unprocessable(
                    f"`{name}` parts must be photo files; send item ids as `{name}_item`"
                )
            photos[name].append(value.file)
        elif name in ids:
            if isinstance(value, UploadFile):
                raise _unprocessable(f"`{name}` parts must be item ids, not files")
            ids[name].append(value)
        else:
            known = ", ".join(f"`{n}`" for n in (*PHOTO_PARTS, *ID_PARTS))
            raise _unprocessable(f"unknown part `{name[:40]}`; the parts are {known}")
    return Examples(
        liked_photos=photos["like"],
        disliked_photos=photos["dislike"],
        liked_items=item_ids(ids["like_item"], "like_item"),
        disliked_items=item_ids(ids["dislike_item"], "dislike_item"),
        exclude=item_ids(ids["exclude"], "exclude"),
    )


async def read_examples(request: Request) -> AsyncIterator[Examples]:
    """A dependency: the checked examples of the body, by its content type; the form's
    spooled files are closed after the answer."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == JSON_TYPE:
        yield check_examples(_from_json(await request.body()))
        return
    if media_type not in FORM_TYPES:
        raise ProblemError(
            415,
            "Unsupported Media Type",
            f"send the examples as multipart/form-data (photos and ids) or {JSON_TYPE} "
            f"(ids), not {media_type or 'no content type'}",
        )
    form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    try:
        yield check_examples(_from_form(form.multi_items()))
    finally:
        await form.close()
