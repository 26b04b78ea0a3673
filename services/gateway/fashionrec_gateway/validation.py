"""Upload validation: size limit, real image format, decompression bombs, truncated files.

Nothing from the client is trusted: the format comes from the decoded bytes, never from the file
name or content type, and only images that decode completely reach storage.
"""

from __future__ import annotations

import io
from typing import BinaryIO, NamedTuple

from fashionrec_shared.problems import ProblemError
from PIL import Image, ImageFile, UnidentifiedImageError

# Pillow format name -> extension used in object keys (the storage contract's list).
FORMATS: dict[str, str] = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}
MIN_SIDE = 8
_CHUNK = 64 * 1024


class ValidatedImage(NamedTuple):
    data: bytes
    ext: str
    width: int
    height: int


def read_limited(stream: BinaryIO, max_bytes: int) -> bytes:
    """Read at most `max_bytes` from `stream`; one byte more is a 413, not a silent truncation."""
    buf = bytearray()
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise ProblemError(
                413,
                "Content Too Large",
                f"the image is larger than the limit of {max_bytes} bytes",
            )


def validate_image_bytes(data: bytes, max_pixels: int) -> ValidatedImage:
    """Check that `data` is one whole image of a supported format and a sane size."""
    if not data:
        raise ProblemError(422, "Unprocessable Content", "the image file is empty")
    # Decoding a truncated file must fail; another module flipping this global would let
    # half-images into the inventory.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    try:
        # Image.open reads the header only (Pillow itself refuses > 2x its own pixel limit).
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as exc:
        raise ProblemError(
            413, "Content Too Large", f"the image has too many pixels: {exc}"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ProblemError(
            415,
            "Unsupported Media Type",
            "the file is not an image in a supported format "
            f"({', '.join(sorted(FORMATS.values()))})",
        ) from exc
    with image:
        ext = FORMATS.get(image.format or "")
        if ext is None:  # pragma: no cover - Image.open(formats=...) already refuses others
            raise ProblemError(415, "Unsupported Media Type", f"unsupported format {image.format}")
        width, height = image.size
        # Header only so far: refuse a decompression bomb before a single pixel is decoded.
        if width * height > max_pixels:
            raise ProblemError(
                413,
                "Content Too Large",
                f"the image is {width}x{height} = {width * height} pixels; "
                f"the limit is {max_pixels}",
            )
        if width < MIN_SIDE or height < MIN_SIDE:
            raise ProblemError(
                422,
                "Unprocessable Content",
                f"the image is {width}x{height}; both sides must be at least {MIN_SIDE} pixels",
            )
        if image.format == "JPEG":
            # Decode at 1/8 scale: the decoder still reads every entropy-coded segment, so
            # truncated or corrupt files fail the same way, at a fraction of the IDCT work.
            image.draft(None, (max(1, width // 8), max(1, height // 8)))
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise ProblemError(
                422,
                "Unprocessable Content",
                f"the {ext} image cannot be decoded (truncated or corrupt): {exc}",
            ) from exc
    return ValidatedImage(data, ext, width, height)


def validate_upload(stream: BinaryIO, max_bytes: int, max_pixels: int) -> ValidatedImage:
    """Blocking: read with the byte limit, then validate. Call from a threadpool."""
    return validate_image_bytes(read_limited(stream, max_bytes), max_pixels)
