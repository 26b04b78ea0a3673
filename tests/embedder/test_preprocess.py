from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from fashionrec_embedder.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    ImageTooLarge,
    decode_image,
    image_to_tensor,
    preprocess,
)
from PIL import Image

from .conftest import encode, pattern_image

S = 64
WHITE = torch.from_numpy((1.0 - IMAGENET_MEAN) / IMAGENET_STD)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height, with a tiny (invalid) pixel stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_tensor_shape_dtype_and_normalisation() -> None:
    tensor = preprocess(encode(pattern_image(120, 90)), S)
    assert tensor.shape == (3, S, S) and tensor.dtype == torch.float32
    white = image_to_tensor(Image.new("RGB", (50, 30), "white"), S)
    torch.testing.assert_close(white[:, 10, 10], WHITE)


def test_same_function_for_bytes_and_decoded_images() -> None:
    data = encode(pattern_image(), "JPEG", quality=95)
    expected = image_to_tensor(decode_image(data, draft_size=S), S)
    assert torch.equal(preprocess(data, S), expected)


def test_exif_rotated_jpeg_equals_the_upright_image() -> None:
    # Blocks aligned to the JPEG 16 px grid, so rotation is (almost) lossless.
    arr = np.zeros((96, 128, 3), dtype=np.uint8)
    arr[:48, :64] = (220, 30, 30)
    arr[:48, 64:] = (30, 200, 40)
    arr[48:, :64] = (40, 60, 210)
    arr[48:, 64:] = (240, 240, 30)
    upright = Image.fromarray(arr)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated_bytes = encode(stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    upright_bytes = encode(upright, "JPEG", quality=100, subsampling=0)

    assert decode_image(rotated_bytes).size == upright.size
    a, b = preprocess(rotated_bytes, S), preprocess(upright_bytes, S)
    assert (a - b).abs().max() < 0.1
    # Without honouring EXIF the tensors would be far apart.
    ignored = image_to_tensor(Image.open(__import__("io").BytesIO(rotated_bytes)).convert("RGB"), S)
    assert (ignored - b).abs().max() > 1.0


def _three_channel(img: Image.Image, fmt: str = "PNG", **params: object) -> torch.Tensor:
    decoded = decode_image(encode(img, fmt, **params))
    assert decoded.mode == "RGB"
    tensor = image_to_tensor(decoded, S)
    assert tensor.shape == (3, S, S)
    return tensor


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    torch.testing.assert_close(_three_channel(rgba)[:, 5, 5], WHITE)
    la = Image.new("LA", (40, 40), (0, 0))
    torch.testing.assert_close(_three_channel(la)[:, 5, 5], WHITE)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    torch.testing.assert_close(_three_channel(palette)[:, 5, 5], WHITE)
    pa = Image.new("PA", (40, 40), (1, 0))
    pa.putpalette([0, 0, 0, 255, 0, 0])
    torch.testing.assert_close(image_to_tensor(pa, S)[:, 5, 5], WHITE)


@pytest.mark.parametrize(
    ("img", "fmt"),
    [
        (Image.new("L", (40, 30), 128), "PNG"),
        (Image.new("1", (40, 30), 1), "PNG"),
        (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        (Image.new("P", (40, 30), 3), "GIF"),
        (pattern_image().convert("RGBA"), "WEBP"),
        (pattern_image(), "BMP"),
        (pattern_image(), "TIFF"),
    ],
)
def test_any_mode_becomes_three_channels(img: Image.Image, fmt: str) -> None:
    _three_channel(img, fmt)


def test_cmyk_red_stays_red() -> None:
    tensor = _three_channel(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "TIFF")
    pixel = tensor[:, 5, 5] * torch.from_numpy(IMAGENET_STD) + torch.from_numpy(IMAGENET_MEAN)
    torch.testing.assert_close(pixel, torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    arr = np.full((30, 40), 32768, dtype=np.uint16)
    arr[:, 20:] = 65535
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    decoded = decode_image(encode(img))
    pixels = np.asarray(decoded)
    assert pixels.shape == (30, 40, 3)
    assert abs(int(pixels[5, 5, 0]) - 128) <= 1
    assert pixels[5, 30, 0] == 255
    # 32-bit integer mode too
    decoded_i = decode_image(encode(img.convert("I"), "TIFF"))
    assert abs(int(np.asarray(decoded_i)[5, 5, 0]) - 128) <= 1


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        encode(pattern_image(), "JPEG")[:200],  # truncated
        encode(pattern_image(), "PNG")[:-40],
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
    ],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png", "bad-png"],
)
def test_undecodable_bytes_raise_image_decode_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        preprocess(data, S)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    with pytest.raises(ImageTooLarge, match="refusing"):
        decode_image(_png_header_only(100_000, 100_000))
    # Below Pillow's own threshold, the service limit (40 M pixels by default) still applies.
    with pytest.raises(ImageTooLarge, match="more than the limit"):
        decode_image(_png_header_only(7000, 7000))
    with pytest.raises(ImageTooLarge):
        decode_image(encode(pattern_image(50, 50)), max_pixels=2000)
    assert isinstance(ImageTooLarge("x"), ImageDecodeError)


def test_jpeg_draft_mode_decodes_large_images_smaller_but_not_below_size() -> None:
    data = encode(pattern_image(1024, 768), "JPEG", quality=90)
    assert decode_image(data).size == (1024, 768)
    assert decode_image(data, draft_size=S).size == (128, 96)
    assert min(decode_image(data, draft_size=224).size) >= 224


def test_shorter_side_resize_then_centre_crop() -> None:
    arr = np.zeros((60, 180, 3), dtype=np.uint8)
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:120] = (0, 255, 0)
    arr[:, 120:] = (0, 0, 255)
    tensor = image_to_tensor(Image.fromarray(arr), S)
    pixels = tensor * torch.from_numpy(IMAGENET_STD)[:, None, None]
    pixels = pixels + torch.from_numpy(IMAGENET_MEAN)[:, None, None]
    # Only the green centre square survives the crop.
    torch.testing.assert_close(
        pixels[:, 2:-2, 2:-2].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0])
    )
