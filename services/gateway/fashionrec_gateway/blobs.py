"""Putting validated images into object storage under their content key."""

from __future__ import annotations

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.storage import BlobStore, StorageFull, StorageUnavailable, content_key
from fashionrec_shared.tasks import ImageRef

from fashionrec_gateway.validation import ValidatedImage


def store_image(store: BlobStore, prefix: str, image: ValidatedImage) -> ImageRef:
    """Idempotent: the same bytes always land on the same key."""
    key, sha = content_key(prefix, image.data, image.ext)
    try:
        store.put(key, image.data)
    except StorageFull as exc:
        # Not an outage a client can wait out: an operator has to free space. Nothing of the
        # write is kept (the store writes a temporary file and renames it only when complete).
        raise ProblemError(507, "Insufficient Storage", f"object storage is full ({exc})") from exc
    except StorageUnavailable as exc:
        raise ProblemError(
            503, "Service Unavailable", f"object storage is unavailable ({exc})"
        ) from exc
    return ImageRef(key=key, sha256=sha)
