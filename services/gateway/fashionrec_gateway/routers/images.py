"""Stored inventory images, served from object storage with immutable cache headers."""

from __future__ import annotations

import re

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.storage import BlobNotFound, StorageUnavailable, content_type_for
from fastapi import APIRouter, Request, Response

from fashionrec_gateway.deps import BlobStoreDep
from fashionrec_gateway.responses import problems
from fashionrec_gateway.validation import FORMATS

router = APIRouter(prefix="/v1/images", tags=["images"])

# Only content-addressed inventory names; query uploads (uploads/) are never served.
_NAME_RE = re.compile(r"^([0-9a-f]{64})\.(" + "|".join(FORMATS.values()) + r")$")
# The key is the content hash, so the bytes behind a URL never change.
CACHE_CONTROL = "public, max-age=31536000, immutable"


@router.head("/inventory/{name}", include_in_schema=False)
@router.get(
    "/inventory/{name}",
    response_class=Response,
    summary="An inventory image",
    responses={
        200: {"content": {f"image/{t}": {} for t in ("jpeg", "png", "webp", "gif")}},
        304: {"description": "not modified (If-None-Match)"},
        **problems(404, 503),
    },
)
def get_inventory_image(name: str, request: Request, store: BlobStoreDep) -> Response:
    match = _NAME_RE.match(name)
    if match is None:
        raise ProblemError(404, "Not Found", f"no image named {name!r}")
    etag = f'"{match.group(1)}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    key = f"inventory/{name}"
    try:
        data = store.get(key)
    except BlobNotFound as exc:
        raise ProblemError(404, "Not Found", f"no image named {name!r}") from exc
    except StorageUnavailable as exc:
        raise ProblemError(
            503, "Service Unavailable", f"object storage is unavailable ({exc})"
        ) from exc
    return Response(content=data, media_type=content_type_for(key), headers=headers)
