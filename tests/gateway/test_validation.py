"""Upload validation: format from the bytes, byte and pixel limits, truncated files."""

from __future__ import annotations

import io

import pytest
from fashionrec_gateway.validation import read_limited, validate_image_bytes, validate_upload
from fashionrec_shared.problems import ProblemError
from PIL import ImageFile

from tests.gateway.images import TEXT, encode, jpeg, png_announcing, truncated_jpeg

LIMIT = 40_000_000


def refused(data: bytes, max_pixels: int = LIMIT) -> ProblemError:
    with pytest.raises(ProblemError) as info:
        validate_image_bytes(data, max_pixels)
    assert info.value.detail
    return info.value


@pytest.mark.parametrize(
    ("fmt", "ext"),
    [
        ("JPEG", "jpg"),
        ("PNG", "png"),
        ("GIF", "gif"),
        ("WEBP", "webp"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
    ],
)
def test_supported_formats_get_their_extension(fmt: str, ext: str) -> None:
    data = encode(fmt, size=(40, 30))
    checked = validate_image_bytes(data, LIMIT)
    assert checked == (data, ext, 40, 30)


def test_format_comes_from_bytes_not_from_the_client() -> None:
    # A PNG uploaded as "photo.jpg"/image/jpeg is still a png.
    stream = io.BytesIO(encode("PNG"))
    assert validate_upload(stream, 1 << 20, LIMIT).ext == "png"


def test_text_file_is_unsupported_media_type() -> None:
    problem = refused(TEXT)
    assert problem.status == 415
    assert "not an image" in problem.detail


def test_unsupported_image_format_is_refused() -> None:
    problem = refused(encode("PPM"))
    assert problem.status == 415


def test_empty_file() -> None:
    problem = refused(b"")
    assert problem.status == 422
    assert "empty" in problem.detail


def test_truncated_jpeg_is_refused() -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    problem = refused(truncated_jpeg())
    assert problem.status == 422
    assert "truncated" in problem.detail


def test_decompression_bomb_refused_from_the_header() -> None:
    problem = refused(png_announcing(100_000, 100_000))
    assert problem.status == 413
    assert "pixels" in problem.detail


def test_pixel_limit_is_ours_not_pillows() -> None:
    # 7000 x 7000 is below Pillow's own limit but above the configured one.
    problem = refused(png_announcing(7000, 7000))
    assert problem.status == 413
    assert "7000x7000" in problem.detail
    assert "40000000" in problem.detail
    assert refused(png_announcing(100, 100), max_pixels=5000).status == 413


def test_too_small_image() -> None:
    problem = refused(encode("PNG", size=(4, 64)))
    assert problem.status == 422
    assert "at least 8" in problem.detail


def test_upload_over_the_byte_limit() -> None:
    data = jpeg(size=(128, 128))
    assert read_limited(io.BytesIO(data), len(data)) == data
    with pytest.raises(ProblemError) as info:
        validate_upload(io.BytesIO(data), len(data) - 1, LIMIT)
    assert info.value.status == 413
    assert str(len(data) - 1) in info.value.detail


def test_truncated_loading_must_stay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        validate_image_bytes(jpeg(), LIMIT)
