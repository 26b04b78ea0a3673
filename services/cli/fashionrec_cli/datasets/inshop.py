"""A synthetic DeepFashion *In-shop Clothes Retrieval* dataset, in the published layout.

The real benchmark (Liu et al., CVPR 2016) ships images as
`img/<MEN|WOMEN>/<Category>/id_XXXXXXXX/NN_V_view.jpg` and its protocol in
`Eval/list_eval_partition.txt`:

    52712
    image_name item_id evaluation_status
    img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train
    ...

(line 1: the number of rows, line 2: the header, then one row per image with status train,
query or gallery). `write_inshop` writes the same layout with synthetic garments, so the
evaluation code can be tested and dry-run without the 7 GB download: every view of an item is a
different "photo" (`synthetic.perturb` with its own seed) of one `synthetic.make_garment`
drawing. Train items are held out entirely; every other item has one query view and the rest in
the gallery, as in the benchmark where queries and gallery share item ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer

from fashionrec_cli.synthetic import GarmentSpec, generate_catalog, make_garment, perturb

PARTITION_FILE = Path("Eval") / "list_eval_partition.txt"
HEADER = "image_name item_id evaluation_status"
STATUSES = ("train", "query", "gallery")
JPEG_QUALITY = 92
# In-shop view slots (the V in NN_V_view.jpg); NN counts groups of these.
VIEWS = ((1, "front"), (2, "side"), (3, "back"), (4, "full"), (7, "additional"))
_WOMEN_ONLY = {"dress", "skirt"}
# synthetic category -> In-shop category folder per gender.
_CATEGORY_DIRS: dict[str, dict[str, str]] = {
    "t-shirt": {"MEN": "Tees_Tanks", "WOMEN": "Graphic_Tees"},
    "shirt": {"MEN": "Shirts_Polos", "WOMEN": "Blouses_Shirts"},
    "tank-top": {"MEN": "Tees_Tanks", "WOMEN": "Tees_Tanks"},
    "hoodie": {"MEN": "Sweatshirts_Hoodies", "WOMEN": "Sweatshirts_Hoodies"},
    "jacket": {"MEN": "Jackets_Vests", "WOMEN": "Jackets_Coats"},
    "coat": {"MEN": "Jackets_Vests", "WOMEN": "Jackets_Coats"},
    "dress": {"WOMEN": "Dresses"},
    "skirt": {"WOMEN": "Skirts"},
    "trousers": {"MEN": "Pants", "WOMEN": "Pants"},
    "shorts": {"MEN": "Shorts", "WOMEN": "Shorts"},
}


@dataclass(frozen=True)
class InShopRow:
    image_name: str  # relative to the dataset root, e.g. img/MEN/Pants/id_00000001/01_1_front.jpg
    item_id: str
    status: str  # train | query | gallery


def item_id(index: int) -> str:
    """In-shop item ids count from 1: id_00000001."""
    return f"id_{index + 1:08d}"


def view_name(view: int) -> str:
    """0-based view number -> In-shop file name: 01_1_front.jpg, 01_2_side.jpg, ..."""
    group, (slot, label) = view // len(VIEWS) + 1, VIEWS[view % len(VIEWS)]
    return f"{group:02d}_{slot}_{label}.jpg"


def _view_seed(spec: GarmentSpec, view: int) -> int:
    return (spec.seed * 1_000_003 + 7919 * (view + 1)) & 0xFFFFFFFF


def plan_inshop(
    n_items: int, views_per_item: int = 4, seed: int = 0, train_fraction: float = 0.2
) -> tuple[list[GarmentSpec], list[InShopRow]]:
    """The garments and partition rows of a dataset, without drawing any pixels."""
    if n_items < 1:
        raise ValueError("n_items must be >= 1")
    if views_per_item < 2:
        raise ValueError("views_per_item must be >= 2 (a query view and a gallery view)")
    if not 0.0 <= train_fraction < 1.0:
        raise ValueError("train_fraction must be in [0, 1)")
    specs = generate_catalog(n_items, seed=seed)
    rnd = random.Random(f"inshop:{seed}")
    n_train = min(round(n_items * train_fraction), n_items - 1)  # keep >= 1 test item
    train = set(rnd.sample(range(n_items), n_train))
    rows: list[InShopRow] = []
    for i, spec in enumerate(specs):
        genders = sorted(_CATEGORY_DIRS[spec.category])
        gender = "WOMEN" if spec.category in _WOMEN_ONLY else rnd.choice(genders)
        folder = f"img/{gender}/{_CATEGORY_DIRS[spec.category][gender]}/{item_id(i)}"
        query_view = rnd.randrange(views_per_item)
        for view in range(views_per_item):
            status = "train" if i in train else "query" if view == query_view else "gallery"
            rows.append(InShopRow(f"{folder}/{view_name(view)}", item_id(i), status))
    return specs, rows


def format_partition(rows: list[InShopRow]) -> str:
    lines = [str(len(rows)), HEADER]
    lines += [f"{row.image_name} {row.item_id} {row.status}" for row in rows]
    return "\n".join(lines) + "\n"


def write_inshop(
    out_dir: Path | str,
    n_items: int,
    views_per_item: int = 4,
    seed: int = 0,
    size: int = 256,
    train_fraction: float = 0.2,
) -> Path:
    """Write a synthetic In-shop dataset under `out_dir`; returns the partition file's path.

    Deterministic for (n_items, views_per_item, seed, size, train_fraction): the same arguments
    give the same files byte for byte. `size` is the side of the drawn garment (the real images
    are 256 px); each view is a crop of it (>= 80% per side) so views differ in framing.
    """
    root = Path(out_dir)
    specs, rows = plan_inshop(n_items, views_per_item, seed, train_fraction)
    for i, spec in enumerate(specs):
        garment = make_garment(replace(spec, size=size))
        item_rows = rows[i * views_per_item : (i + 1) * views_per_item]
        for view, row in enumerate(item_rows):
            path = root / row.image_name
            path.parent.mkdir(parents=True, exist_ok=True)
            photo = perturb(garment, seed=_view_seed(spec, view))
            photo.save(path, "JPEG", quality=JPEG_QUALITY)
    partition = root / PARTITION_FILE
    partition.parent.mkdir(parents=True, exist_ok=True)
    partition.write_text(format_partition(rows))
    return partition


def main(
    out_dir: Annotated[Path, typer.Argument(help="dataset root to create")],
    items: Annotated[int, typer.Option(min=1, help="number of garments")] = 60,
    views: Annotated[int, typer.Option(min=2, help="photos per garment")] = 4,
    seed: Annotated[int, typer.Option(help="dataset seed")] = 0,
    size: Annotated[int, typer.Option(min=32, help="drawing size in pixels")] = 256,
) -> None:
    """Write a synthetic DeepFashion In-shop dataset (python -m fashionrec_cli.datasets.inshop)."""
    partition = write_inshop(out_dir, items, views_per_item=views, seed=seed, size=size)
    typer.echo(f"wrote {partition}")


if __name__ == "__main__":
    typer.run(main)
