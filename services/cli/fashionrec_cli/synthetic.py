"""Synthetic garment catalogues drawn with Pillow and numpy, for `fashionrec demo` and e2e tests.

Every garment is a silhouette polygon (per category, with randomised proportions) filled with a
pattern texture in a named palette colour, on a lightly tinted background. Everything derives from
the catalogue seed, so the same seed always gives the same SKUs, metadata and pixels. Catalogue
entries differ in at least one of category, colour and pattern, which keeps items apart both to the
eye and to an image model; `perturb` makes the "photo of the same item" that search tests use.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

IMAGES_DIRNAME = "images"
JPEG_QUALITY = 92
CATALOG_COLUMNS = ("sku", "title", "category", "price", "image")

# Named palette (RGB). Spread over hue and lightness so colours stay apart after JPEG and resizing.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "white": (246, 246, 242),
    "grey": (128, 130, 134),
    "navy": (24, 38, 92),
    "royal blue": (40, 84, 200),
    "sky blue": (120, 184, 232),
    "teal": (0, 128, 128),
    "forest green": (34, 102, 52),
    "olive": (120, 128, 40),
    "mustard": (216, 170, 36),
    "orange": (236, 118, 28),
    "red": (204, 32, 40),
    "burgundy": (112, 24, 44),
    "pink": (240, 150, 190),
    "lavender": (172, 148, 214),
    "beige": (222, 200, 160),
    "brown": (112, 70, 40),
    "coral": (246, 120, 100),
}

PATTERNS = (
    "solid",
    "stripes-horizontal",
    "stripes-vertical",
    "stripes-diagonal",
    "polka-dots",
    "checks",
    "gradient",
)

# category -> (sleeve kind, base price); sleeves decide the silhouette's arms.
CATEGORIES: dict[str, tuple[str, float]] = {
    "t-shirt": ("short", 19.0),
    "shirt": ("long", 39.0),
    "tank-top": ("none", 15.0),
    "hoodie": ("long", 49.0),
    "jacket": ("long", 89.0),
    "coat": ("long", 149.0),
    "dress": ("short", 59.0),
    "skirt": ("n/a", 35.0),
    "trousers": ("n/a", 45.0),
    "shorts": ("n/a", 25.0),
}

# Surfaces `make_garment` can draw over the pattern (spec.fabric); "cotton" is plain.
FABRICS = ("cotton", "denim", "knit", "leather")

_PATTERN_WORDS = {
    "solid": "",
    "stripes-horizontal": "striped",
    "stripes-vertical": "pinstriped",
    "stripes-diagonal": "diagonal-stripe",
    "polka-dots": "polka-dot",
    "checks": "checked",
    "gradient": "ombre",
}

Point = tuple[float, float]


@dataclass(frozen=True)
class GarmentSpec:
    """One synthetic catalogue item: metadata plus everything needed to redraw its image."""

    sku: str
    title: str
    category: str
    colour: str
    pattern: str
    price: float
    seed: int = 0
    size: int = 256
    accent: str = "white"
    attributes: dict[str, str] = field(default_factory=dict)
    # Optional surface drawn over the pattern (one of FABRICS); None draws none, as before.
    fabric: str | None = None

    @property
    def image_name(self) -> str:
        return f"{self.sku}.jpg"


# ---- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """Silhouette in unit coordinates plus decorations drawn on top."""

    polygons: list[list[Point]]
    ellipses: list[tuple[float, float, float, float]] = field(default_factory=list)
    lines: list[tuple[Point, Point]] = field(default_factory=list)  # seams, plackets, waistbands
    buttons: list[Point] = field(default_factory=list)
    collar: list[list[Point]] = field(default_factory=list)  # drawn in the accent colour


def _mirror(points: list[Point]) -> list[Point]:
    return [(1.0 - x, y) for x, y in reversed(points)]


def _sleeve(
    shoulder: Point, armpit: Point, length: float, angle_deg: float, cuff: float
) -> list[Point]:
    """A sleeve leaving the left side of the body, `angle_deg` below horizontal."""
    a = math.radians(angle_deg)
    dx, dy = -math.cos(a), math.sin(a)
    # The cuff is perpendicular to the sleeve's direction, `cuff` wide.
    px, py = -dy, dx
    mid = ((shoulder[0] + armpit[0]) / 2 + dx * length, (shoulder[1] + armpit[1]) / 2 + dy * length)
    return [
        shoulder,
        (mid[0] - px * cuff / 2, mid[1] - py * cuff / 2),
        (mid[0] + px * cuff / 2, mid[1] + py * cuff / 2),
        armpit,
    ]


def _top_shape(category: str, rnd: random.Random) -> _Shape:
    long_garment = category == "coat"
    hw = rnd.uniform(0.15, 0.2) if category != "coat" else rnd.uniform(0.17, 0.21)
    y0 = rnd.uniform(0.12, 0.18)
    y1 = {
        "coat": rnd.uniform(0.84, 0.93),
        "jacket": rnd.uniform(0.66, 0.74),
        "hoodie": rnd.uniform(0.68, 0.76),
        "dress": rnd.uniform(0.82, 0.93),
    }.get(category, rnd.uniform(0.62, 0.74))
    neck_w = rnd.uniform(0.05, 0.08)
    neck_d = rnd.uniform(0.03, 0.08)
    hem_flare = rnd.uniform(0.0, 0.04) + (0.04 if long_garment else 0.0)
    armpit_y = y0 + rnd.uniform(0.17, 0.22)
    shoulder = (0.5 - hw - 0.02, y0 + 0.03)
    if category == "tank-top":
        neck_w = rnd.uniform(0.08, 0.11)
        shoulder = (0.5 - neck_w - 0.035, y0)
        armpit_y = y0 + rnd.uniform(0.2, 0.25)
    left: list[Point] = [(0.5 - neck_w, y0), shoulder, (0.5 - hw, armpit_y)]
    if category == "dress":
        waist_y = rnd.uniform(0.4, 0.46)
        left += [(0.5 - hw + 0.02, waist_y), (0.5 - rnd.uniform(0.3, 0.38), y1)]
    else:
        left += [(0.5 - hw - hem_flare, y1)]
    body = [*left, *_mirror(left), (0.5, y0 + neck_d)]
    shape = _Shape(polygons=[body])

    sleeve_kind = CATEGORIES[category][0]
    if sleeve_kind != "none":
        length = rnd.uniform(0.1, 0.14) if sleeve_kind == "short" else rnd.uniform(0.3, 0.38)
        angle = rnd.uniform(35, 55) if sleeve_kind == "short" else rnd.uniform(58, 72)
        cuff = rnd.uniform(0.14, 0.18) if sleeve_kind == "short" else rnd.uniform(0.08, 0.11)
        arm = (0.5 - hw, armpit_y)
        sleeve = _sleeve(shoulder, arm, length, angle, cuff)
        shape.polygons.extend([sleeve, _mirror(sleeve)])
        if sleeve_kind == "long":
            ends = sleeve[1:3]
            shape.lines.append((ends[0], ends[1]))
    if category == "hoodie":
        r = rnd.uniform(0.1, 0.13)
        shape.ellipses.append((0.5 - r, y0 - r * 0.9, 0.5 + r, y0 + r * 0.6))
        pocket_y = y1 - rnd.uniform(0.12, 0.16)
        shape.lines.append(((0.5 - hw * 0.6, pocket_y), (0.5 + hw * 0.6, pocket_y)))
        shape.lines.append(((0.5 - 0.02, y0 + neck_d), (0.5 - 0.03, y0 + neck_d + 0.12)))
        shape.lines.append(((0.5 + 0.02, y0 + neck_d), (0.5 + 0.03, y0 + neck_d + 0.12)))
    if category in ("shirt", "jacket", "coat"):
        lapel = rnd.uniform(0.08, 0.14) if category != "shirt" else 0.05
        collar_l = [
            (0.5 - neck_w, y0),
            (0.5 - neck_w - 0.03, y0 + lapel),
            (0.5, y0 + neck_d + 0.02),
        ]
        shape.collar.extend([collar_l, _mirror(collar_l)])
        shape.lines.append(((0.5, y0 + neck_d), (0.5, y1)))
        n_buttons = {"shirt": 6, "jacket": 3, "coat": 4}[category]
        top = y0 + neck_d + 0.05
        step = (y1 - top - 0.04) / max(n_buttons, 1)
        offset = 0.012 if category == "shirt" else 0.035
        shape.buttons.extend((0.5 + offset, top + i * step) for i in range(n_buttons))
        if category == "coat":
            shape.buttons.extend((0.5 - offset, top + i * step) for i in range(n_buttons))
    if category == "dress":
        waist_y = left[3][1]
        shape.lines.append(((0.5 - hw + 0.02, waist_y), (0.5 + hw - 0.02, waist_y)))
    return shape


def _bottom_shape(category: str, rnd: random.Random) -> _Shape:
    y0 = rnd.uniform(0.12, 0.2)
    waist = rnd.uniform(0.16, 0.21)
    band = rnd.uniform(0.03, 0.05)
    if category == "skirt":
        y1 = rnd.uniform(0.55, 0.86)
        hem = waist + rnd.uniform(0.06, 0.18)
        left: list[Point] = [(0.5 - waist, y0), (0.5 - hem, y1)]
        poly = [*left, *_mirror(left)]
        lines = [((0.5 - waist, y0 + band), (0.5 + waist, y0 + band))]
        return _Shape(polygons=[poly], lines=lines)
    y1 = rnd.uniform(0.84, 0.93) if category == "trousers" else rnd.uniform(0.45, 0.56)
    crotch = y0 + rnd.uniform(0.2, 0.26)
    hem_out = waist + rnd.uniform(-0.01, 0.05)
    gap = rnd.uniform(0.015, 0.04) if category == "trousers" else rnd.uniform(0.03, 0.06)
    left = [(0.5 - waist, y0), (0.5 - hem_out, y1), (0.5 - gap, y1)]
    poly = [*left, (0.5, crotch), *_mirror(left)]
    lines = [
        ((0.5 - waist, y0 + band), (0.5 + waist, y0 + band)),
        ((0.5, y0 + band), (0.5, crotch)),
    ]
    return _Shape(polygons=[poly], lines=lines, buttons=[(0.5, y0 + band / 2)])


def _shape_for(spec: GarmentSpec) -> _Shape:
    rnd = random.Random(spec.seed)
    if CATEGORIES.get(spec.category, ("n/a", 0.0))[0] == "n/a":
        return _bottom_shape(spec.category, rnd)
    return _top_shape(spec.category, rnd)


# ---- textures -------------------------------------------------------------------------------


def _texture(spec: GarmentSpec, size: int) -> np.ndarray:
    """H x W x 3 float array of the garment's pattern in its colour and accent."""
    rnd = random.Random(spec.seed ^ 0x5EED)
    base = np.array(PALETTE.get(spec.colour, PALETTE["grey"]), dtype=np.float32)
    accent = np.array(PALETTE.get(spec.accent, PALETTE["white"]), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    period = rnd.uniform(0.05, 0.12)
    phase = rnd.uniform(0.0, 1.0)
    duty = rnd.uniform(0.3, 0.55)
    pattern = spec.pattern
    if pattern == "stripes-horizontal":
        mask = ((yy / period + phase) % 1.0) < duty
    elif pattern == "stripes-vertical":
        mask = ((xx / (period * 0.7) + phase) % 1.0) < duty * 0.6
    elif pattern == "stripes-diagonal":
        sign = 1.0 if rnd.random() < 0.5 else -1.0
        mask = (((xx + sign * yy) / period + phase) % 1.0) < duty
    elif pattern == "polka-dots":
        p = period * 1.2
        cx = ((xx / p + phase) % 1.0) - 0.5
        cy = ((yy / p + phase * 0.7) % 1.0) - 0.5
        mask = (cx * cx + cy * cy) < (rnd.uniform(0.2, 0.32) ** 2)
    elif pattern == "checks":
        p = period * 1.6
        a = ((xx / p + phase) % 1.0) < 0.5
        b = ((yy / p + phase) % 1.0) < 0.5
        mask = a ^ b
    elif pattern == "gradient":
        t = np.clip((yy - 0.1) / 0.8, 0.0, 1.0)[..., None]
        return base * (1.0 - t) + accent * t
    else:
        mask = np.zeros((size, size), dtype=bool)
    out = np.broadcast_to(base, (size, size, 3)).copy()
    out[mask] = accent
    return out


def _fabric_surface(fabric: str, size: int) -> np.ndarray:
    """H x W x 1 brightness multiplier that draws the fabric's surface (weave, ribs, sheen)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(3.0, size / 24)  # a few pixels even on thumbnails
    if fabric == "denim":  # twill: fine diagonal ridges
        surface = 0.8 + 0.2 * (((xx + yy) / period) % 1.0 < 0.5)
    elif fabric == "knit":  # ribs: soft vertical columns
        surface = 0.78 + 0.22 * np.abs(np.sin(np.pi * xx / period))
    elif fabric == "leather":  # dark with a glossy highlight band
        u = xx / size
        surface = 0.7 + 0.6 * np.exp(-(((u - 0.35) / 0.08) ** 2))
    else:
        surface = np.ones((size, size), dtype=np.float32)
    return surface.astype(np.float32)[..., None]


@dataclass(frozen=True)
class DrawnDetails:
    """Facts about the drawing of a spec (for labels that must follow from the pixels)."""

    sleeve: str  # short | long | none | n/a (bottoms)
    hood: bool
    collar: bool
    buttons: bool
    waistband: bool
    bottom: float  # lowest point of the body, in image heights
    width: float  # widest span of the body polygon, in image widths


def drawn_details(spec: GarmentSpec) -> DrawnDetails:
    shape = _shape_for(spec)
    body = shape.polygons[0]
    xs, ys = [x for x, _ in body], [y for _, y in body]
    is_bottom = CATEGORIES.get(spec.category, ("n/a", 0.0))[0] == "n/a"
    return DrawnDetails(
        sleeve=CATEGORIES.get(spec.category, ("n/a", 0.0))[0],
        hood=bool(shape.ellipses),
        collar=bool(shape.collar),
        buttons=bool(shape.buttons),
        waistband=is_bottom,
        bottom=max(ys),
        width=max(xs) - min(xs),
    )


def _scale(points: list[Point], size: int) -> list[Point]:
    return [(x * size, y * size) for x, y in points]


def make_garment(spec: GarmentSpec) -> Image.Image:
    """Draw the garment of `spec` (RGB, spec.size square); the same spec gives the same pixels."""
    size = spec.size
    rnd = random.Random(spec.seed ^ 0xB6)
    shape = _shape_for(spec)

    # Light background tint, slightly graded, so two items never share a background exactly.
    tint = np.array([rnd.uniform(222, 252) for _ in range(3)], dtype=np.float32)
    tint2 = tint - np.array([rnd.uniform(0, 18) for _ in range(3)], dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) / size)[:, None, None]
    background = tint * (1.0 - t) + tint2 * t
    background = np.broadcast_to(background, (size, size, 3))

    # The mask is drawn at 2x and downsampled: cheap anti-aliasing.
    big = size * 2
    mask_img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask_img)
    for box in shape.ellipses:
        draw.ellipse([v * big for v in box], fill=255)
    for poly in shape.polygons:
        draw.polygon(_scale(poly, big), fill=255)
    mask_img = mask_img.resize((size, size), Image.Resampling.LANCZOS)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / 255.0

    # Soft shading across the body gives the flat drawing some volume.
    xs = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    shade = (0.82 + 0.18 * np.cos(xs * math.pi / 2))[None, :, None]
    texture = _texture(spec, size) * shade
    if spec.fabric:
        texture = texture * _fabric_surface(spec.fabric, size)
    pixels = background * (1.0 - mask) + texture * mask
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    # Decorations: outline, collar, seams, buttons.
    draw = ImageDraw.Draw(img)
    base = PALETTE.get(spec.colour, PALETTE["grey"])
    lum = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
    ink = tuple(int(c * 0.55) for c in base) if lum > 60 else (150, 150, 160)
    width = max(1, size // 128)
    accent = PALETTE.get(spec.accent, PALETTE["white"])
    for box in shape.ellipses:
        draw.ellipse([v * size for v in box], outline=ink, width=width)
    for poly in shape.polygons:
        draw.polygon(_scale(poly, size), outline=ink, width=width)
    for poly in shape.collar:
        draw.polygon(_scale(poly, size), fill=accent, outline=ink, width=width)
    for a, b in shape.lines:
        draw.line([(a[0] * size, a[1] * size), (b[0] * size, b[1] * size)], fill=ink, width=width)
    r = max(1.5, size / 110)
    for x, y in shape.buttons:
        draw.ellipse([x * size - r, y * size - r, x * size + r, y * size + r], fill=ink)
    return img.filter(ImageFilter.SMOOTH) if size >= 128 else img


# ---- catalogues -----------------------------------------------------------------------------


def _title(colour: str, pattern: str, category: str) -> str:
    words = [colour.capitalize(), _PATTERN_WORDS[pattern], category]
    return " ".join(w for w in words if w)


def _accent_for(colour: str, rnd: random.Random) -> str:
    """A pattern colour that contrasts with the garment colour (far in RGB)."""
    base = np.array(PALETTE[colour], dtype=np.float32)
    far = [
        name
        for name, rgb in PALETTE.items()
        if float(np.linalg.norm(np.array(rgb, dtype=np.float32) - base)) > 160
    ]
    return rnd.choice(sorted(far))


def generate_catalog(n: int, seed: int = 0, size: int = 256) -> list[GarmentSpec]:
    """`n` distinct garments, deterministic for `seed`.

    Combinations of (category, colour, pattern) are drawn without replacement, so two items
    differ in at least one of them until all combinations are used (1260 with this palette).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rnd = random.Random(seed)
    combos = list(itertools.product(CATEGORIES, PALETTE, PATTERNS))
    specs: list[GarmentSpec] = []
    pool: list[tuple[str, str, str]] = []
    for i in range(n):
        if not pool:
            pool = combos[:]
            rnd.shuffle(pool)
        category, colour, pattern = pool.pop()
        sleeve, base_price = CATEGORIES[category]
        price = round(base_price * rnd.uniform(0.7, 1.8)) - 0.01
        fit = rnd.choice(["slim", "regular", "relaxed"])
        accent = _accent_for(colour, rnd) if pattern != "solid" else colour
        attributes = {"colour": colour, "pattern": pattern, "sleeve": sleeve, "fit": fit}
        specs.append(
            GarmentSpec(
                sku=f"SYN{seed}-{i:05d}",
                title=_title(colour, pattern, category),
                category=category,
                colour=colour,
                pattern=pattern,
                price=float(max(price, 1.99)),
                seed=rnd.getrandbits(32),
                size=size,
                accent=accent,
                attributes=attributes,
            )
        )
    return specs


def write_catalog(
    specs: list[GarmentSpec], out_dir: Path | str, fmt: Literal["csv", "jsonl"] = "csv"
) -> Path:
    """Write images to `out_dir/images/<sku>.jpg` and `out_dir/catalog.<fmt>`; returns the latter.

    The catalogue has columns sku,title,category,price,image and the attribute columns, which
    `fashionrec ingest` turns into attributes. `image` is relative to `out_dir` (e.g.
    `images/SYN0-00000.jpg`), so `out_dir` is the directory to pass as `--images`.
    """
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"unknown catalogue format {fmt!r}; use csv or jsonl")
    out = Path(out_dir)
    images = out / IMAGES_DIRNAME
    images.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        make_garment(spec).save(images / spec.image_name, "JPEG", quality=JPEG_QUALITY)
    attribute_keys = sorted({k for spec in specs for k in spec.attributes})
    path = out / f"catalog.{fmt}"
    if fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([*CATALOG_COLUMNS, *attribute_keys])
            for spec in specs:
                image = f"{IMAGES_DIRNAME}/{spec.image_name}"
                row = [spec.sku, spec.title, spec.category, f"{spec.price:.2f}", image]
                writer.writerow(row + [spec.attributes.get(k, "") for k in attribute_keys])
    else:
        with path.open("w", encoding="utf-8") as fh:
            for spec in specs:
                record = {
                    "sku": spec.sku,
                    "title": spec.title,
                    "category": spec.category,
                    "price": spec.price,
                    "image": f"{IMAGES_DIRNAME}/{spec.image_name}",
                    "attributes": spec.attributes,
                }
                fh.write(json.dumps(record) + "\n")
    return path


def perturb(img: Image.Image, seed: int) -> Image.Image:
    """A "new photo" of the same garment: crop (>= 80% per side), maybe flip, brightness +-15%,
    JPEG re-encode at quality 75-90. Deterministic for `seed`."""
    rnd = random.Random(seed)
    img = img.convert("RGB")
    w, h = img.size
    cw, ch = round(w * rnd.uniform(0.8, 1.0)), round(h * rnd.uniform(0.8, 1.0))
    left, top = rnd.randint(0, w - cw), rnd.randint(0, h - ch)
    out = img.crop((left, top, left + cw, top + ch))
    if rnd.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Brightness(out).enhance(rnd.uniform(0.85, 1.15))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=rnd.randint(75, 90))
    buf.seek(0)
    result = Image.open(buf)
    result.load()
    return result.convert("RGB")
