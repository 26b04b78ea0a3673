"""Image bytes → normalised model input. The SAME code path serves inventory and query images,
so a photo of an item and the item's catalogue image are embedded identically.

Steps: decode with a pixel limit (decompression bombs are refused from the header, before any
pixel buffer exists), JPEG draft mode (the decoder downscales by 1/2..1/8 for free), EXIF
orientation, any mode → RGB (transparency composited on white), one resize of the centred square
to image_size x image_size (= shorter side to image_size, then centre crop), then the backbone's
normalisation (ImageNet mean/std for torchvision models, (x - 127) / 128 for TF-trained ones).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from fashionrec_shared.limits import MAX_IMAGE_PIXELS
from PIL import Image, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class Normalisation:
    """Per-channel (pixel / 255 - mean) / std, with mean and std in [0, 1] pixel units."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def scale(self) -> np.ndarray:
        return (1.0 / (255.0 * np.asarray(self.std, dtype=np.float64))).astype(np.float32)

    @property
    def offset(self) -> np.ndarray:
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        return (-mean / std).astype(np.float32)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": [round(v, 6) for v in self.mean], "std": [round(v, 6) for v in self.std]}


IMAGENET = Normalisation(
    tuple(float(v) for v in IMAGENET_MEAN),  # type: ignore[arg-type]
    tuple(float(v) for v in IMAGENET_STD),  # type: ignore[arg-type]
)
# TensorFlow's EfficientNet-Lite checkpoints: (x - 127) / 128.
TF_LITE = Normalisation((127 / 255,) * 3, (128 / 255,) * 3)  # type: ignore[arg-type]
DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS  # the gateway's limit too
_WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """The bytes are not an image we can decode (corrupt, truncated, unsupported)."""


class ImageTooLarge(ImageDecodeError):
    """The image announces more pixels than allowed (possible decompression bomb)."""


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels} pixels; refusing to decode it"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("PA", "RGBa", "La") or (mode in ("P", "L") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: Pillow's convert() clips at 255 (all white); scale the range instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        grey = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
        return grey.convert("RGB")
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode `data` into an upright RGB image; raises ImageDecodeError for anything unusable.

    `draft_size` lets JPEGs decode at a reduced scale whose sides stay ≥ draft_size.
    """
    if not data:
        raise ImageDecodeError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        _check_pixels(img.size, max_pixels)
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"refusing to decode: {exc}") from exc
    except Exception as exc:  # Pillow's plugins raise many types (OSError, SyntaxError, …)
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def center_square_resize(img: Image.Image, size: int) -> Image.Image:
    """Shorter side → size and centre crop, done as ONE antialiased resize of the centre square."""
    width, height = img.size
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return img.resize(
        (size, size),
        Image.Resampling.BILINEAR,
        box=(left, top, left + side, top + side),
        reducing_gap=None,
    )


def image_to_array(
    img: Image.Image,
    size: int,
    out: np.ndarray | None = None,
    norm: Normalisation = IMAGENET,
) -> np.ndarray:
    """RGB PIL image → float32 array (3, size, size), normalised (into `out` if given)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    pixels = np.asarray(center_square_resize(img, size))  # (S, S, 3) uint8
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    scale, offset = norm.scale, norm.offset
    # (x / 255 - mean) / std as one multiply-add per pixel, one channel-planar pass per channel:
    # no (S, S, 3) float temporary.
    for c in range(3):
        np.multiply(pixels[:, :, c], scale[c], out=out[c], dtype=np.float32)
        out[c] += offset[c]
    return out


def image_to_tensor(img: Image.Image, size: int, norm: Normalisation = IMAGENET) -> torch.Tensor:
    """RGB PIL image → float32 tensor (3, size, size), normalised."""
    return torch.from_numpy(image_to_array(img, size, norm=norm))


def preprocess(
    data: bytes,
    size: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    norm: Normalisation = IMAGENET,
) -> torch.Tensor:
    """Bytes → model input tensor, for inventory and query images alike."""
    img = decode_image(data, max_pixels=max_pixels, draft_size=size)
    return image_to_tensor(img, size, norm)
