"""Dominant colours (fashionrec_embedder.colours) on generated images with known colours: solid
shapes on light backgrounds, two-colour garments, garments the colour of their background, busy
borders, and the synthetic catalogue garments (fashionrec_cli.synthetic) after a JPEG round trip."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from fashionrec_cli.synthetic import generate_catalog, make_garment
from fashionrec_embedder.colours import MAX_COLOURS, NAMES, dominant_colours
from fashionrec_embedder.preprocess import decode_image
from PIL import Image, ImageDraw

from .conftest import encode

# Synthetic palette names (fashionrec_cli.synthetic.PALETTE) that this palette names otherwise.
SYNTHETIC_NAMES: dict[str, set[str]] = {
    "royal blue": {"blue"},
    "sky blue": {"blue"},
    "forest green": {"green"},
    "mustard": {"yellow"},
    "lavender": {"purple"},
    "coral": {"orange", "pink", "red"},  # between the three
}


def garment_on(
    fill: tuple[int, int, int],
    background: tuple[int, int, int] = (245, 245, 243),
    size: tuple[int, int] = (200, 240),
    graded: int = 0,
) -> Image.Image:
    """A T-shirt-ish polygon in `fill` over a plain (optionally top-to-bottom graded) background."""
    width, height = size
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    bg = np.asarray(background, np.float32) - graded * t
    img = Image.fromarray(np.broadcast_to(bg, (height, width, 3)).astype(np.uint8), "RGB")
    w, h = width / 100, height / 100
    body = [(30, 15), (45, 10), (55, 10), (70, 15), (88, 30), (78, 40), (70, 35), (70, 90)]
    body += [(30, 90), (30, 35), (22, 40), (12, 30)]
    ImageDraw.Draw(img).polygon([(x * w, y * h) for x, y in body], fill=fill)
    return img


def shares(colours: list) -> dict[str, float]:
    return {c.name: c.share for c in colours}


@pytest.mark.parametrize(
    ("fill", "name"),
    [
        ((200, 30, 40), "red"),
        ((25, 35, 90), "navy"),
        ((40, 90, 200), "blue"),
        ((30, 110, 60), "green"),
        ((0, 125, 125), "teal"),
        ((240, 200, 40), "yellow"),
        ((240, 120, 30), "orange"),
        ((240, 150, 190), "pink"),
        ((110, 50, 150), "purple"),
        ((110, 70, 40), "brown"),
        ((110, 25, 45), "burgundy"),
        ((120, 128, 40), "olive"),
        ((220, 198, 158), "beige"),
        ((25, 25, 28), "black"),
        ((128, 128, 130), "grey"),
    ],
)
def test_a_solid_garment_on_a_light_background_is_its_colour(
    fill: tuple[int, int, int], name: str
) -> None:
    colours = dominant_colours(garment_on(fill, graded=12))
    assert colours[0].name == name, colours
    # The background is not counted: the garment is (nearly) all of its pixels.
    assert colours[0].share > 0.85
    mean = np.array([int(colours[0].hex[i : i + 2], 16) for i in (1, 3, 5)])
    assert np.abs(mean - np.array(fill)).max() <= 12


def test_two_colours_are_both_found_largest_first() -> None:
    img = garment_on((200, 30, 40))
    pixels = np.asarray(img).copy()
    red = np.all(pixels == (200, 30, 40), axis=-1)
    rows = np.nonzero(red.any(axis=1))[0]
    cut = rows[0] + int(0.65 * (rows[-1] - rows[0]))
    pixels[cut:][red[cut:]] = (25, 35, 90)  # the lower part navy
    colours = dominant_colours(Image.fromarray(pixels))
    assert [c.name for c in colours] == ["red", "navy"]
    assert colours[0].share > colours[1].share > 0.2
    assert sum(c.share for c in colours) > 0.85  # the rest: edge pixels, mixed by the downscale


def test_a_garment_the_colour_of_its_background_keeps_every_pixel() -> None:
    # A white shirt on white: dropping the background would drop it too.
    assert [c.name for c in dominant_colours(garment_on((250, 250, 250)))] == ["white"]
    # No background at all: the whole image is the garment.
    whole = dominant_colours(Image.new("RGB", (50, 80), (200, 30, 40)))
    assert [(c.name, c.share, c.hex) for c in whole] == [("red", 1.0, "#c81e28")]


def test_a_busy_border_is_not_taken_for_a_background() -> None:
    # A scene, not a backdrop: left half green, right half blue, border included.
    img = Image.new("RGB", (120, 120), (40, 90, 200))
    img.paste((30, 110, 60), (0, 0, 60, 120))
    assert shares(dominant_colours(img)) == {"green": 0.5, "blue": 0.5}


def test_neutrals_are_named_by_lightness_and_other_modes_are_read() -> None:
    for grey, name in ((15, "black"), (120, "grey"), (235, "white")):
        img = Image.new("L", (40, 40), grey)
        assert [c.name for c in dominant_colours(img)] == [name]
    rgba = Image.new("RGBA", (40, 40), (200, 30, 40, 255))
    assert dominant_colours(rgba)[0].name == "red"


def test_at_most_three_colours_each_with_a_tenth_of_the_pixels() -> None:
    def stripes(hues: int) -> Image.Image:
        rgb = [colorsys.hsv_to_rgb(i / hues, 0.9, 0.8) for i in range(hues)]
        row = np.repeat(np.array(rgb) * 255, 64 // hues + 1, axis=0)[:64]
        return Image.fromarray(np.broadcast_to(row, (64, 64, 3)).astype(np.uint8))

    five = dominant_colours(stripes(5))
    assert len(five) == MAX_COLOURS and all(c.share >= 0.1 for c in five)
    assert [c.share for c in five] == sorted((c.share for c in five), reverse=True)
    assert all(c.name in NAMES for c in five)
    assert dominant_colours(stripes(5), min_share=0.5) == []


def test_the_synthetic_garments_colour_is_found() -> None:
    """The catalogue colour of `make_garment` garments (after JPEG, as the worker decodes them):
    the top colour of every solid one and of most patterned ones (a pattern's accent may cover
    half the garment: checks, gradients), and among the colours of nearly all of them."""
    specs = generate_catalog(300, seed=3)
    top = {"solid": 0, "pattern": 0}
    found = {"solid": 0, "pattern": 0}
    count = {"solid": 0, "pattern": 0}
    for spec in specs:
        data = encode(make_garment(spec), "JPEG", quality=92)
        colours = dominant_colours(decode_image(data, draft_size=224))
        wanted = SYNTHETIC_NAMES.get(spec.colour, {spec.colour})
        kind = "solid" if spec.pattern == "solid" else "pattern"
        count[kind] += 1
        top[kind] += bool(colours) and colours[0].name in wanted
        found[kind] += any(c.name in wanted for c in colours)
    total = len(specs)
    assert top["solid"] == count["solid"] > 20
    assert (top["solid"] + top["pattern"]) / total >= 0.7
    assert (found["solid"] + found["pattern"]) / total >= 0.95
