"""A synthetic DeepFashion *Category and Attribute Prediction* dataset, in the published layout.

The real benchmark (Liu et al., CVPR 2016) ships (all list files: line 1 the row count, line 2 a
header, then rows whose columns are separated by runs of spaces):

    Anno_coarse/list_category_cloth.txt  category_name  category_type   (1 upper, 2 lower, 3 full)
    Anno_coarse/list_category_img.txt    image_name  category_label     (1-based, file order)
    Anno_coarse/list_attr_cloth.txt      attribute_name  attribute_type (names may hold spaces;
                                         the type is the last token: 1 texture, 2 fabric,
                                         3 shape, 4 part, 5 style)
    Anno_coarse/list_attr_img.txt        image_name  attribute_labels   (one 1/-1 per attribute)
    Eval/list_eval_partition.txt         image_name  evaluation_status  (train | val | test)
    img/<Product_Title>/img_00000001.jpg

`write_deepfashion_attributes` writes the same layout with `synthetic.make_garment` drawings, and
every label follows from how the garment was drawn, so a model can learn them from the pixels:
category = the drawn silhouette; texture = the drawn pattern; fabric = the surface drawn over it
(`GarmentSpec.fabric`: twill, ribs, sheen or plain); shape = the silhouette's length and width;
part = sleeves and the drawn hood, collar, buttons, waistband; style = the colour family.
(The catalogue's `fit` attribute is not drawn, so it is not used.)

`write_training_csv` writes the simpler CSV layout `fashionrec-embedder train` also reads:

    labels.csv   image,category,attributes,split
                 images/SYN0-00000.jpg,t-shirt,texture:striped part:short_sleeve ...,train

`attributes` is space-separated `type:name` tokens (or plain `name` tokens, which all go to one
head named `attributes`); spaces inside names are written as `_`. `split` (train | val | test) is
optional: without it the trainer holds out a random validation share.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer

from fashionrec_cli.synthetic import (
    FABRICS,
    GarmentSpec,
    drawn_details,
    generate_catalog,
    make_garment,
)

ANNO_DIR = Path("Anno_coarse")
CATEGORY_CLOTH = ANNO_DIR / "list_category_cloth.txt"
CATEGORY_IMG = ANNO_DIR / "list_category_img.txt"
ATTR_CLOTH = ANNO_DIR / "list_attr_cloth.txt"
ATTR_IMG = ANNO_DIR / "list_attr_img.txt"
PARTITION_FILE = Path("Eval") / "list_eval_partition.txt"
CSV_NAME = "labels.csv"
JPEG_QUALITY = 92

ATTRIBUTE_TYPES = {1: "texture", 2: "fabric", 3: "shape", 4: "part", 5: "style"}
_TYPE_IDS = {name: i for i, name in ATTRIBUTE_TYPES.items()}

# synthetic category -> (DeepFashion category name, category type)
CATEGORY_NAMES: dict[str, tuple[str, int]] = {
    "t-shirt": ("Tee", 1),
    "shirt": ("Button-Down", 1),
    "tank-top": ("Tank", 1),
    "hoodie": ("Hoodie", 1),
    "jacket": ("Jacket", 1),
    "coat": ("Coat", 3),
    "dress": ("Dress", 3),
    "skirt": ("Skirt", 2),
    "trousers": ("Chinos", 2),
    "shorts": ("Shorts", 2),
}
_TEXTURES: dict[str, tuple[str, ...]] = {
    "solid": ("solid",),
    "stripes-horizontal": ("striped", "horizontal stripe"),
    "stripes-vertical": ("striped", "pinstripe"),
    "stripes-diagonal": ("striped", "diagonal stripe"),
    "polka-dots": ("polka dot",),
    "checks": ("checked",),
    "gradient": ("ombre",),
}
_STYLES: dict[str, tuple[str, ...]] = {
    "minimalist": ("black", "white", "grey", "beige"),
    "classic": ("navy", "burgundy"),
    "earthy": ("brown", "olive", "forest green"),
    "bold": ("royal blue", "red", "orange", "mustard", "coral", "teal"),
    "romantic": ("sky blue", "pink", "lavender"),
}
_STYLE_OF = {colour: style for style, colours in _STYLES.items() for colour in colours}
_SLEEVES = {"short": ("short sleeve",), "long": ("long sleeve",), "none": ("sleeveless",)}
_SHAPES = ("maxi", "midi", "mini", "a-line", "straight")
_PARTS = ("long sleeve", "short sleeve", "sleeveless", "hood", "collar", "buttons", "waistband")


def attribute_vocabulary() -> dict[str, tuple[str, ...]]:
    """Attribute type -> every attribute name of that type."""
    textures = tuple(dict.fromkeys(n for names in _TEXTURES.values() for n in names))
    return {
        "texture": textures,
        "fabric": FABRICS,
        "shape": _SHAPES,
        "part": _PARTS,
        "style": tuple(_STYLES),
    }


def garment_attributes(spec: GarmentSpec) -> dict[str, list[str]]:
    """Attribute type -> the attributes that the drawing of `spec` shows."""
    details = drawn_details(spec)
    length = "maxi" if details.bottom >= 0.8 else "mini" if details.bottom < 0.6 else "midi"
    parts = list(_SLEEVES.get(details.sleeve, ()))
    parts += [
        name
        for name, shown in (
            ("hood", details.hood),
            ("collar", details.collar),
            ("buttons", details.buttons),
            ("waistband", details.waistband),
        )
        if shown
    ]
    return {
        "texture": list(_TEXTURES[spec.pattern]),
        "fabric": [spec.fabric or "cotton"],
        "shape": [length, "a-line" if details.width >= 0.5 else "straight"],
        "part": parts,
        "style": [_STYLE_OF.get(spec.colour, "classic")],
    }


@dataclass(frozen=True)
class Garment:
    image_name: str  # relative to the dataset root
    spec: GarmentSpec
    status: str  # train | val | test
    attributes: dict[str, list[str]]


def plan_garments(
    n_images: int, seed: int = 0, size: int = 256, val_fraction: float = 0.15
) -> list[Garment]:
    """The garments, their labels and their split, without drawing any pixels."""
    if n_images < 3:
        raise ValueError("n_images must be >= 3 (one per split at least)")
    rnd = random.Random(f"deepfashion-attr:{seed}")
    specs = [
        replace(spec, size=size, fabric=rnd.choice(FABRICS))
        for spec in generate_catalog(n_images, seed=seed, size=size)
    ]
    order = list(range(n_images))
    rnd.shuffle(order)
    n_held = max(1, round(n_images * val_fraction))
    status = {i: "train" for i in order}
    status.update({i: "val" for i in order[:n_held]})
    status.update({i: "test" for i in order[n_held : 2 * n_held]})
    per_folder: dict[str, int] = {}
    garments = []
    for i, spec in enumerate(specs):
        # DeepFashion folders are product titles; several images may share one.
        folder = spec.title.replace(" ", "_")
        per_folder[folder] = per_folder.get(folder, 0) + 1
        name = f"img/{folder}/img_{per_folder[folder]:08d}.jpg"
        garments.append(Garment(name, spec, status[i], garment_attributes(spec)))
    return garments


def _table(header: str, rows: list[tuple[str, str]], width: int) -> str:
    lines = [str(len(rows)), header]
    lines += [f"{left.ljust(width)} {right}" for left, right in rows]
    return "\n".join(lines) + "\n"


def _write_images(root: Path, garments: list[Garment]) -> None:
    for garment in garments:
        path = root / garment.image_name
        path.parent.mkdir(parents=True, exist_ok=True)
        make_garment(garment.spec).save(path, "JPEG", quality=JPEG_QUALITY)


def write_deepfashion_attributes(
    out_dir: Path | str, n_images: int, seed: int = 0, size: int = 256
) -> Path:
    """Write the dataset under `out_dir` (deterministic per arguments); returns `out_dir`."""
    root = Path(out_dir)
    garments = plan_garments(n_images, seed=seed, size=size)
    categories = list(CATEGORY_NAMES)
    vocab = attribute_vocabulary()
    # Like the real file: attributes sorted by name, each with its type id.
    attributes = sorted((name, _TYPE_IDS[kind]) for kind, names in vocab.items() for name in names)
    (root / ANNO_DIR).mkdir(parents=True, exist_ok=True)
    (root / PARTITION_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / CATEGORY_CLOTH).write_text(
        _table(
            "category_name  category_type",
            [(CATEGORY_NAMES[c][0], str(CATEGORY_NAMES[c][1])) for c in categories],
            28,
        )
    )
    (root / ATTR_CLOTH).write_text(
        _table("attribute_name  attribute_type", [(n, str(t)) for n, t in attributes], 28)
    )
    width = max(len(g.image_name) for g in garments) + 8
    cat_rows, attr_rows, part_rows = [], [], []
    for g in garments:
        shown = {name for names in g.attributes.values() for name in names}
        cat_rows.append((g.image_name, str(categories.index(g.spec.category) + 1)))
        labels = " ".join("1" if name in shown else "-1" for name, _ in attributes)
        attr_rows.append((g.image_name, labels))
        part_rows.append((g.image_name, g.status))
    (root / CATEGORY_IMG).write_text(_table("image_name  category_label", cat_rows, width))
    (root / ATTR_IMG).write_text(_table("image_name  attribute_labels", attr_rows, width))
    (root / PARTITION_FILE).write_text(_table("image_name  evaluation_status", part_rows, width))
    _write_images(root, garments)
    return root


def write_training_csv(out_dir: Path | str, n_images: int, seed: int = 0, size: int = 256) -> Path:
    """Write images/<sku>.jpg and labels.csv (the simple layout); returns the CSV's path."""
    root = Path(out_dir)
    garments = plan_garments(n_images, seed=seed, size=size)
    garments = [replace(g, image_name=f"images/{g.spec.image_name}") for g in garments]
    path = root / CSV_NAME
    root.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "category", "attributes", "split"])
        for g in garments:
            tokens = [
                f"{kind}:{name.replace(' ', '_')}"
                for kind, names in g.attributes.items()
                for name in names
            ]
            writer.writerow([g.image_name, g.spec.category, " ".join(tokens), g.status])
    _write_images(root, garments)
    return path


def main(
    out_dir: Annotated[Path, typer.Argument(help="dataset root to create")],
    images: Annotated[int, typer.Option(min=3, help="number of garments")] = 200,
    seed: Annotated[int, typer.Option(help="dataset seed")] = 0,
    size: Annotated[int, typer.Option(min=32, help="image size in pixels")] = 256,
    csv_layout: Annotated[bool, typer.Option("--csv", help="write labels.csv instead")] = False,
) -> None:
    """Write a synthetic DeepFashion attribute dataset
    (python -m fashionrec_cli.datasets.deepfashion_attr)."""
    if csv_layout:
        typer.echo(f"wrote {write_training_csv(out_dir, images, seed=seed, size=size)}")
    else:
        typer.echo(f"wrote {write_deepfashion_attributes(out_dir, images, seed=seed, size=size)}")


if __name__ == "__main__":
    typer.run(main)
