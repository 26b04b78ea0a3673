"""Dominant colours of a garment photo, computed at embed time from the decoded image.

On a 64 x 64 copy (the cost does not grow with the photo): pixels go to CIELAB (Pillow's
littlecms transform), the background is estimated from the image border — product photos have
a plain, usually light one — and the pixels close to it are dropped (all are kept when the
border is not plain, or when that would leave almost nothing: a white shirt on white). Each
remaining pixel is named by the nearest reference colour of a small palette in Lab, except
near-neutral ones (low chroma), which are black, grey or white by lightness; the names are
precomputed for a 32^3 RGB grid, so naming is a table lookup (`name_table`, built once per
process, ~50 ms). The whole costs about 0.5 ms per image on one core. A colour's hex is
the mean RGB of its pixels and its share is its fraction of the garment pixels; the colours with
at least `MIN_SHARE` are returned, largest first, at most `MAX_COLOURS`.
"""

from __future__ import annotations

import functools

import numpy as np
from fashionrec_shared.tasks import Colour
from PIL import Image, ImageCms

SIDE = 64  # the working copy's side
MIN_SHARE = 0.1
MAX_COLOURS = 3

# Reference colours (sRGB) per name; several per name cover its light and dark shades. The
# neutrals are here too, so a slightly tinted light pixel can still be white.
PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((20, 20, 22), (40, 40, 44)),
    "grey": ((90, 90, 92), (128, 130, 134), (170, 170, 172)),
    "white": ((250, 250, 250), (232, 232, 228)),
    "beige": ((222, 200, 160), (235, 220, 190), (200, 178, 140)),
    "brown": ((112, 70, 40), (150, 100, 60), (75, 48, 30), (170, 120, 80)),
    "burgundy": ((112, 24, 44), (128, 0, 32), (80, 20, 35)),
    "red": ((204, 32, 40), (230, 40, 40), (160, 20, 30)),
    "orange": ((236, 118, 28), (255, 150, 40), (246, 120, 100)),
    "yellow": ((216, 170, 36), (250, 220, 60), (240, 230, 140)),
    "olive": ((120, 128, 40), (95, 105, 45), (150, 150, 80)),
    "green": ((34, 102, 52), (60, 160, 80), (20, 70, 40), (140, 200, 140)),
    "teal": ((0, 128, 128), (0, 95, 105), (70, 180, 170)),
    "blue": ((40, 84, 200), (120, 184, 232), (70, 130, 180), (30, 60, 160), (170, 205, 240)),
    "navy": ((24, 38, 92), (18, 28, 60), (40, 50, 110)),
    "purple": ((172, 148, 214), (110, 50, 150), (75, 40, 100), (200, 170, 225)),
    "pink": ((240, 150, 190), (255, 192, 203), (220, 60, 140), (200, 120, 150)),
}
NAMES: tuple[str, ...] = tuple(PALETTE)

# Below this chroma (Lab units) a pixel is neutral: named by lightness alone (L* thresholds).
NEUTRAL_CHROMA = 8.0
BLACK_BELOW_L = 28.0
WHITE_ABOVE_L = 74.0
# Background: the border is plain when this share of its pixels is within BG_PLAIN of its
# median colour; pixels within the tolerance (derived from the border's spread: a graded
# backdrop) are background.
BORDER = 2
BG_PLAIN = 12.0
PLAIN_SHARE = 0.6
BG_TOL_MIN, BG_TOL_MAX = 8.0, 20.0
# Fewer garment pixels than this share means the garment is the background's colour.
MIN_GARMENT = 0.04
# Naming looks up RGB quantised to LUT_BITS per channel (each cell named by its centre).
LUT_BITS = 5


@functools.cache
def _to_lab() -> ImageCms.ImageCmsTransform:
    srgb = ImageCms.createProfile("sRGB")
    return ImageCms.buildTransformFromOpenProfiles(
        srgb, ImageCms.createProfile("LAB"), "RGB", "LAB"
    )


def to_lab(img: Image.Image) -> np.ndarray:
    """RGB image → (H, W, 3) float32 CIELAB (L* 0..100, a* and b* signed)."""
    raw = np.asarray(ImageCms.applyTransform(img, _to_lab()))
    lab = raw.view(np.int8).astype(np.float32)  # a*, b* are signed bytes
    lab[..., 0] = raw[..., 0] * (100.0 / 255.0)
    return lab


@functools.cache
def _references() -> tuple[np.ndarray, np.ndarray]:
    """Lab of every reference colour (R, 3) and the index of its name (R,)."""
    rgb = [c for shades in PALETTE.values() for c in shades]
    names = [i for i, shades in enumerate(PALETTE.values()) for _ in shades]
    strip = Image.fromarray(np.array([rgb], dtype=np.uint8), "RGB")
    return to_lab(strip)[0], np.array(names, dtype=np.intp)


def garment_mask(lab: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels that are not the plain background seen on the image border."""
    height, width = lab.shape[:2]
    keep_all = np.ones((height, width), dtype=bool)
    if min(height, width) <= 4 * BORDER:
        return keep_all
    ring = keep_all.copy()
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    border = lab[ring]
    background = np.median(border, axis=0)
    spread = np.linalg.norm(border - background, axis=1)
    near = spread < BG_PLAIN
    if near.mean() < PLAIN_SHARE:  # a busy border (a scene, a cropped garment): no background
        return keep_all
    tol = float(np.clip(np.quantile(spread[near], 0.95) + 4.0, BG_TOL_MIN, BG_TOL_MAX))
    mask = np.linalg.norm(lab - background, axis=2) > tol
    return mask if mask.mean() >= MIN_GARMENT else keep_all


def name_pixels(lab: np.ndarray) -> np.ndarray:
    """(N, 3) Lab pixels → (N,) palette name indices."""
    refs, ref_names = _references()
    distances = ((lab[:, None, :] - refs[None, :, :]) ** 2).sum(axis=2)
    names = ref_names[np.argmin(distances, axis=1)]
    lightness, chroma = lab[:, 0], np.hypot(lab[:, 1], lab[:, 2])
    neutral = chroma < NEUTRAL_CHROMA
    by_lightness = np.where(
        lightness < BLACK_BELOW_L,
        NAMES.index("black"),
        np.where(lightness > WHITE_ABOVE_L, NAMES.index("white"), NAMES.index("grey")),
    )
    return np.where(neutral, by_lightness, names)


@functools.cache
def name_table() -> np.ndarray:
    """(2 ** (3 * LUT_BITS),) palette name index of each quantised RGB cell; call it once at
    start-up so the first image does not pay for it."""
    levels = 1 << LUT_BITS
    step = 256 // levels
    centres = np.arange(levels, dtype=np.uint8) * step + step // 2
    r, g, b = np.meshgrid(centres, centres, centres, indexing="ij")
    cells = np.stack([r, g, b], axis=-1).reshape(levels * levels, levels, 3)
    lab = to_lab(Image.fromarray(cells, "RGB")).reshape(-1, 3)
    return np.concatenate([name_pixels(chunk) for chunk in np.array_split(lab, levels)])


def name_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB pixels → (N,) palette name indices (via the lookup table)."""
    q = (rgb >> (8 - LUT_BITS)).astype(np.intp)
    return name_table()[(q[:, 0] << (2 * LUT_BITS)) | (q[:, 1] << LUT_BITS) | q[:, 2]]


def dominant_colours(
    img: Image.Image, *, min_share: float = MIN_SHARE, limit: int = MAX_COLOURS
) -> list[Colour]:
    """The garment's dominant colours in `img` (RGB), largest share first."""
    # reducing_gap: Pillow first shrinks by an integer factor (cheap), then resamples.
    if img.mode != "RGB":
        img = img.convert("RGB")
    small = img.resize((SIDE, SIDE), Image.Resampling.BOX, reducing_gap=2.0)
    lab = to_lab(small)
    pixels = np.asarray(small)[garment_mask(lab)]
    names = name_rgb(pixels)
    rgb = pixels.astype(np.float64)
    counts = np.bincount(names, minlength=len(NAMES))
    sums = np.stack([np.bincount(names, rgb[:, c], minlength=len(NAMES)) for c in range(3)], 1)
    total = int(counts.sum())
    colours: list[Colour] = []
    for index in np.argsort(-counts, kind="stable")[:limit]:
        share = counts[index] / total if total else 0.0
        if share < min_share:
            break
        mean = np.clip(np.rint(sums[index] / counts[index]), 0, 255).astype(int)
        colours.append(
            Colour(
                name=NAMES[index],
                hex="#" + "".join(f"{int(v):02x}" for v in mean),
                share=round(float(share), 3),
            )
        )
    return colours
