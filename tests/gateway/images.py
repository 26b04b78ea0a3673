"""Test images built in memory: good ones of every format, and the usual bad ones."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image


def encode(
    fmt: str, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> bytes:
    return encode("JPEG", size, color)


def png_announcing(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose IHDR claims width x height (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = jpeg(size=(256, 256))
    return data[: len(data) // 2]


TEXT = b"this is not an image at all\n" * 10


def noisy_png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    """Random pixels: a PNG about 3 bytes per pixel, for size limits."""
    rng = random.Random(seed)
    pixels = bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(out, "PNG")
    return out.getvalue()
