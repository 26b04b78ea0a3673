"""Retrieval quality and speed of the embedder's backbones on generated garments, in one run.

Models: random ResNet50 (`random:0`, no ImageNet weights can be downloaded here), the packaged
ImageNet EfficientNet-Lite0/1/2 with global and with regional pooling (`--poolings`), and a model
fine-tuned here (`training.run.train`) from packaged
Lite weights on a generated DeepFashion-layout set. Every model is served by the real
`Embedder` (JPEG bytes → `embed_bytes`); quality figures use OpenVINO fp32 (what `runtime=auto`
picks on a CPU) and are repeated for OpenVINO int8.

Data (deterministic, disjoint seeds; no garment of one set is a copy of another):

- stock: `--stock` garments (plan_garments seed 101: category, colour, pattern, fabric), their
  clean catalogue JPEGs;
- new garments: `--queries` OTHER garments (seed 202), each as a photo (`perturb`);
- stocked photos: `--queries` perturbed photos of stocked garments (every stock/queries-th);
- fine-tune set: `--train-images` garments in the DeepFashion layout (seed 7);
- In-shop split: `--inshop-items` garments x `--views` photos (seed 303).

Metrics:

1. shape precision@5 of new garments: mean over queries of the share of the 5 nearest stock
   garments (cosine) with the query's category; pattern precision@5 the same with the pattern.
   Chance: the expected share for a random top 5 (mean over queries of the stock share of the
   query's category / pattern).
2. stocked hit@5: share of stocked photos whose own garment is in the top 5.
3. In-shop Recall@1/5/10 (evaluation.evaluate_inshop, whole gallery, cosine).
4. images/s at batch 16 (`Embedder.embed_tensors` on 16 preprocessed garments: inference only;
   median of `--reps` calls after a warm-up) for torch, ONNX Runtime and OpenVINO fp32 and
   ONNX Runtime / OpenVINO int8; the min cosine of each runtime's vectors vs torch fp32 on
   `--cosine-sample` images; for int8 the top-5 agreement with the same engine in fp32,
   mean |top5_int8 ∩ top5_fp32| / 5 over all queries (new garments and stocked photos).

    .venv/bin/python benchmarks/quality.py [--stock 300] [--queries 100] [--epochs 2] [--quick]

Default fine-tune: Lite0 from ImageNet, 1200 generated images (840 train / 180 val) at 224 px,
3 frozen + 1 unfrozen epochs, lr 2e-3, `heads` embedding with the category head weighted 4
(`--head-weight category=4`): about 8 min on 2 quiet cores. The recipe and the weight were
chosen on a separate set of 300 new garments (seed 909), not on the reported queries; 2400
images gave the same validation accuracy.

Prints tables and writes benchmarks/results/quality.json (quality-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fashionrec_cli.datasets.deepfashion_attr import (
    garment_attributes,
    plan_garments,
    write_deepfashion_attributes,
)
from fashionrec_cli.datasets.inshop import plan_inshop, write_inshop
from fashionrec_cli.synthetic import GarmentSpec, generate_catalog, make_garment, perturb
from fashionrec_embedder.backbones import BACKBONES
from fashionrec_embedder.evaluation import evaluate_inshop, rank_gallery
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.preprocess import decode_image, image_to_array
from fashionrec_embedder.runtimes import cpu_cores
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.training.run import TrainOptions, train

RESULTS = Path(__file__).parent / "results"
STOCK_SEED, QUERY_SEED, TRAIN_SEED, INSHOP_SEED = 101, 202, 7, 303
PHOTO_SEED = 50_000  # perturb seeds of the query photos (offset per set)
DRAW_SIZE = 256  # side of the drawn garments (DeepFashion's images are about this size)
K = 5
# (runtime, precision) in the order measured; torch fp32 is the reference for the cosines.
RUNTIMES: tuple[tuple[str, str], ...] = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "int8"),
)
QUALITY_RUNTIME = ("openvino", "fp32")  # what runtime=auto serves on a CPU


def jpeg(img: Any, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ---- data ------------------------------------------------------------------------------------


@dataclass
class Data:
    stock: list[GarmentSpec]
    stock_jpegs: list[bytes]
    new: list[GarmentSpec]  # garments not in stock
    new_jpegs: list[bytes]  # one photo of each
    stocked_idx: list[int]  # stock rows photographed again
    stocked_jpegs: list[bytes]
    inshop_root: Path
    train_root: Path | None


def specs_of(n: int, seed: int, fabrics: bool = False) -> list[GarmentSpec]:
    """`n` catalogue garments (`generate_catalog`, as `fashionrec demo` draws them) at
    `DRAW_SIZE` px; with `fabrics`, as the DeepFashion generator draws them (same garments with
    a fabric surface: twill, ribs, sheen or plain)."""
    if fabrics:
        return [g.spec for g in plan_garments(max(n, 3), seed=seed, size=DRAW_SIZE)][:n]
    return generate_catalog(n, seed=seed, size=DRAW_SIZE)


def make_data(args: argparse.Namespace, work: Path) -> Data:
    stock = specs_of(args.stock, STOCK_SEED, args.fabrics)
    new = specs_of(args.queries, QUERY_SEED, args.fabrics)
    stock_jpegs = [jpeg(make_garment(s)) for s in stock]
    new_jpegs = [jpeg(perturb(make_garment(s), PHOTO_SEED + i)) for i, s in enumerate(new)]
    step = max(1, len(stock) // args.queries)
    stocked_idx = list(range(0, len(stock), step))[: args.queries]
    stocked_jpegs = [jpeg(perturb(make_garment(stock[i]), 2 * PHOTO_SEED + i)) for i in stocked_idx]
    inshop_root = work / "inshop"
    if not (inshop_root / "Eval" / "list_eval_partition.txt").is_file():
        write_inshop(inshop_root, args.inshop_items, views_per_item=args.views, seed=INSHOP_SEED)
    train_root = None
    seeds = {"stock": {s.seed for s in stock}, "new": {s.seed for s in new}}
    seeds["inshop"] = {s.seed for s in plan_inshop(args.inshop_items, args.views, INSHOP_SEED)[0]}
    if not args.skip_train:
        train_root = work / f"deepfashion-{args.train_images}"
        if not (train_root / "Eval" / "list_eval_partition.txt").is_file():
            write_deepfashion_attributes(
                train_root, args.train_images, seed=TRAIN_SEED, size=DRAW_SIZE
            )
        seeds["train"] = {s.seed for s in specs_of(args.train_images, TRAIN_SEED)}
    names = list(seeds)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = seeds[a] & seeds[b]
            if shared:
                raise SystemExit(f"generated sets {a} and {b} share {len(shared)} garments")
    return Data(
        stock, stock_jpegs, new, new_jpegs, stocked_idx, stocked_jpegs, inshop_root, train_root
    )


def combo(spec: GarmentSpec) -> tuple[str, str, str]:
    return spec.category, spec.colour, spec.pattern


# ---- metrics ---------------------------------------------------------------------------------


def top_k(queries: np.ndarray, stock: np.ndarray, k: int = K) -> np.ndarray:
    return rank_gallery(queries, stock, k)


def precision_at_k(top: np.ndarray, query_labels: Sequence[str], stock_labels: Sequence[str]):
    stock_arr = np.asarray(stock_labels, dtype=object)
    query_arr = np.asarray(query_labels, dtype=object)
    return float((stock_arr[top] == query_arr[:, None]).mean())


def chance_at_k(query_labels: Sequence[str], stock_labels: Sequence[str]) -> float:
    """Expected precision@k of a random ranking: the stock share of each query's label."""
    n = len(stock_labels)
    return float(np.mean([sum(s == q for s in stock_labels) / n for q in query_labels]))


def agreement(top_a: np.ndarray, top_b: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(top_a, top_b, strict=True)]))


def labels(spec: GarmentSpec) -> dict[str, str]:
    """What a neighbour should share with a new garment's photo: its category ("shape"), its
    pattern, its colour, and the DeepFashion-style shape attributes of its drawing (length and
    width)."""
    return {
        "shape": spec.category,
        "pattern": spec.pattern,
        "colour": spec.colour,
        "silhouette": " ".join(garment_attributes(spec)["shape"]),
    }


def quality(vectors: dict[str, np.ndarray], data: Data) -> dict[str, float]:
    top_new = top_k(vectors["new"], vectors["stock"])
    top_stocked = top_k(vectors["stocked"], vectors["stock"])
    hits = [i in row for i, row in zip(data.stocked_idx, top_stocked, strict=True)]
    new, stock = [labels(s) for s in data.new], [labels(s) for s in data.stock]
    out = {
        f"{key}_p@5": precision_at_k(top_new, [q[key] for q in new], [s[key] for s in stock])
        for key in new[0]
    }
    out["stocked_hit@5"] = float(np.mean(hits))
    return out


def chance(data: Data) -> dict[str, float]:
    new, stock = [labels(s) for s in data.new], [labels(s) for s in data.stock]
    out = {
        f"{key}_p@5": chance_at_k([q[key] for q in new], [s[key] for s in stock]) for key in new[0]
    }
    out["stocked_hit@5"] = K / len(stock)
    return out


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


# ---- one model on every runtime --------------------------------------------------------------


def vectors_of(rows: list[Any]) -> np.ndarray:
    bad = [r for r in rows if not isinstance(r, np.ndarray)]
    if bad:
        raise SystemExit(f"embedding failed: {bad[0]!r}")
    return np.stack(rows).astype(np.float32)


def images_per_s(model: Embedder, blobs: list[bytes], reps: int) -> float:
    """Median images/s of one batch of 16 preprocessed images through the model."""
    size = model.image_size
    tensors = [
        torch.from_numpy(image_to_array(decode_image(b, draft_size=size), size, norm=model.norm))
        for b in blobs[:16]
    ]
    model.embed_tensors(tensors)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        model.embed_tensors(tensors)
        times.append(time.perf_counter() - t)
    return len(tensors) / statistics.median(times)


def measure_model(
    label: str, base: dict[str, Any], data: Data, args: argparse.Namespace
) -> dict[str, Any]:
    """Speed per runtime, quality (OpenVINO fp32 and int8), In-shop recall (OpenVINO fp32)."""
    n = args.cosine_sample
    sample = data.stock_jpegs[:n] + data.new_jpegs[:n] + data.stocked_jpegs[:n]
    speed_blobs = (data.stock_jpegs * 16)[:16]
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    reference: np.ndarray | None = None
    inshop: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for runtime, precision in args.runtimes:
        settings = EmbedderSettings(**base, runtime=runtime, precision=precision)
        t = time.perf_counter()
        model = Embedder(settings)
        model.load()
        load_s = time.perf_counter() - t
        info = {"model_version": model.fp32_version, "dim": model.dim}
        info |= {"image_size": model.image_size, "backbone": model.backbone.name}
        ips = images_per_s(model, speed_blobs, args.reps)
        run: dict[str, Any] = {"load_s": round(load_s, 1), "images_per_s_b16": round(ips, 1)}
        run["sample"] = vectors_of(model.embed_bytes(sample))
        if runtime == "torch":
            reference = run["sample"]
        else:
            # torch eager is too slow on 2 cores to embed every set; the others embed all.
            t = time.perf_counter()
            vecs = {"stock": vectors_of(model.embed_bytes(data.stock_jpegs))}
            run["embed_bytes_images_per_s"] = round(
                len(data.stock_jpegs) / (time.perf_counter() - t), 1
            )
            vecs["new"] = vectors_of(model.embed_bytes(data.new_jpegs))
            vecs["stocked"] = vectors_of(model.embed_bytes(data.stocked_jpegs))
            run["vectors"] = vecs
            run["quality"] = quality(vecs, data)
            if (runtime, precision) == QUALITY_RUNTIME and not args.skip_inshop:
                result = evaluate_inshop(data.inshop_root, model, batch_size=16, progress=False)
                inshop = {k: result[k] for k in ("recall@1", "recall@5", "recall@10", "map@10")}
                inshop |= {"queries": result["queries"], "gallery": result["gallery"]}
        runs[(runtime, precision)] = run
        print(
            f"  {label:<38} {runtime:<12} {precision}: {ips:7.1f} img/s (load {load_s:.1f}s)"
            + (f"  shape p@5 {run['quality']['shape_p@5']:.3f}" if "quality" in run else ""),
            flush=True,
        )
        del model
        gc.collect()

    rows = []
    for (runtime, precision), run in runs.items():
        row: dict[str, Any] = {"runtime": runtime, "precision": precision}
        row |= {
            k: run[k]
            for k in ("load_s", "images_per_s_b16", "embed_bytes_images_per_s")
            if k in run
        }
        if reference is not None:
            row["min_cosine_vs_torch"] = round(min_cosine(run["sample"], reference), 5)
        if "quality" in run:
            row |= {k: round(v, 4) for k, v in run["quality"].items()}
        fp32 = runs.get((runtime, "fp32"))
        if precision == "int8" and fp32 is not None and "vectors" in fp32:
            mine, theirs = run["vectors"], fp32["vectors"]
            tops = [
                (top_k(mine[q], mine["stock"]), top_k(theirs[q], theirs["stock"]))
                for q in ("new", "stocked")
            ]
            row["top5_agreement_vs_fp32"] = round(
                agreement(
                    np.concatenate([a for a, _ in tops]), np.concatenate([b for _, b in tops])
                ),
                4,
            )
            row["top5_agreement_new"] = round(agreement(*tops[0]), 4)
            row["top5_agreement_stocked"] = round(agreement(*tops[1]), 4)
        rows.append(row)
    served = next((r for r in rows if (r["runtime"], r["precision"]) == QUALITY_RUNTIME), None)
    return {"model": label, **info, "quality": served, "inshop": inshop, "runtimes": rows}


# ---- fine-tuning -----------------------------------------------------------------------------


def fine_tune(args: argparse.Namespace, data: Data, work: Path, cache: Path) -> dict[str, Any]:
    assert data.train_root is not None
    out = work / "model-ft"
    if out.exists():
        shutil.rmtree(out)
    options = TrainOptions(
        backbone=args.train_backbone,
        weights="imagenet",
        epochs=args.epochs,
        freeze_epochs=args.freeze_epochs,
        image_size=args.train_image_size,
        batch_size=args.train_batch_size,
        embedding=args.embedding,
        head_weights=args.head_weights,
        lr=args.lr,
        seed=0,
        device="cpu",
        cache_dir=cache,
    )
    t = time.perf_counter()
    result = train(data.train_root, out, options, echo=lambda line: print("   ", line, flush=True))
    seconds = time.perf_counter() - t
    # config.json as written (the stable file format), not the in-memory config object.
    config = json.loads((out / "config.json").read_text())
    training = config.get("training", {})
    return {
        "dir": out,
        "model_version": config.get("model_version"),
        "seconds": round(seconds, 1),
        "options": {
            "backbone": args.train_backbone,
            "train_images": args.train_images,
            "image_size": options.image_size,
            "freeze_epochs": args.freeze_epochs,
            "epochs": args.epochs,
            "batch_size": args.train_batch_size,
            "lr": args.lr,
            "embedding": args.embedding,
            "head_weights": args.head_weights,
        },
        "exported_epoch": training.get("exported_epoch"),
        "metrics": training.get("metrics"),
        "history": training.get("history"),
        "seconds_per_epoch": [round(s, 1) for s in getattr(result, "seconds_per_epoch", [])],
    }


# ---- output ----------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or value == "":
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def print_tables(figures: dict[str, Any]) -> None:
    chance = figures["chance"]
    print(
        f"\nQuality (OpenVINO fp32 = served on CPU; OpenVINO int8 in brackets): {figures['stock']}"
        f" stock, {figures['queries']} new garments, {figures['queries']} stocked photos"
        + (", fabric surfaces" if figures["fabrics"] else "")
    )
    keys = ("shape_p@5", "pattern_p@5", "colour_p@5", "silhouette_p@5", "stocked_hit@5")
    header = f"{'model':<40}{'dim':>5}{'px':>5}" + "".join(f"{k:>16}" for k in keys)
    print(header + f"{'R@1':>7}{'R@5':>7}{'R@10':>7}")
    for m in figures["models"]:
        q = m["quality"] or {}
        i8 = next((r for r in m["runtimes"] if r["precision"] == "int8" and "shape_p@5" in r), {})
        cells = "".join(f"{fmt(q.get(k))} ({fmt(i8.get(k))})".rjust(16) for k in keys)
        ins = m["inshop"]
        print(
            f"{m['model']:<40}{m['dim']:>5}{m['image_size']:>5}{cells}"
            f"{fmt(ins.get('recall@1')):>7}{fmt(ins.get('recall@5')):>7}"
            f"{fmt(ins.get('recall@10')):>7}"
        )
    print(f"{'chance':<50}" + "".join(f"{chance[k]:>16.3f}" for k in keys))
    print(f"\nSpeed, batch 16 (images/s, inference only; median of {figures['reps']} calls)")
    print(
        f"{'model':<40}{'runtime':<13}{'prec':<6}{'img/s':>8}{'jpeg/s':>8}{'load s':>8}"
        f"{'min cos':>9}{'top5 agr':>10}"
    )
    for m in figures["models"]:
        for r in m["runtimes"]:
            print(
                f"{m['model']:<40}{r['runtime']:<13}{r['precision']:<6}"
                f"{r['images_per_s_b16']:>8.1f}{fmt(r.get('embed_bytes_images_per_s'), '.1f'):>8}"
                f"{r['load_s']:>8.1f}{fmt(r.get('min_cosine_vs_torch'), '.4f'):>9}"
                f"{fmt(r.get('top5_agreement_vs_fp32')):>10}"
            )
    ft = figures.get("fine_tune")
    if ft:
        o = ft["options"]
        print(
            f"\nfine-tune: {o['backbone']} imagenet, {o['train_images']} images at "
            f"{o['image_size']} px, {o['freeze_epochs']} frozen + {o['epochs']} unfrozen epochs, "
            f"lr {o['lr']}, batch {o['batch_size']}, embedding {o['embedding']} "
            f"{o.get('head_weights') or ''}: "
            f"{ft['seconds']}s, exported epoch {ft['exported_epoch']}, metrics "
            + ", ".join(
                f"{k} {v:.3f}" for k, v in (ft["metrics"] or {}).items() if isinstance(v, float)
            )
        )


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, help="keep generated data and models here")
    parser.add_argument("--stock", type=int, default=300)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--inshop-items", type=int, default=100)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument(
        "--backbones",
        default="resnet50,efficientnet-lite0,efficientnet-lite1,efficientnet-lite2",
        help="comma-separated; resnet50 uses random:0, the others imagenet ('' for none)",
    )
    parser.add_argument(
        "--poolings",
        default="global,regional",
        help="comma-separated poolings of the plain backbones (regional: Lite only)",
    )
    parser.add_argument(
        "--runtimes",
        default=",".join(f"{r}:{p}" for r, p in RUNTIMES),
        help="comma-separated runtime:precision (torch:fp32 is the cosine reference)",
    )
    parser.add_argument("--reps", type=int, default=5, help="timed calls per speed figure")
    parser.add_argument("--cosine-sample", type=int, default=16, help="images per set vs torch")
    parser.add_argument(
        "--fabrics",
        action="store_true",
        help="draw stock and queries with fabric surfaces, as the DeepFashion generator does",
    )
    parser.add_argument("--skip-inshop", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--train-backbone",
        default="efficientnet-lite0",
        choices=list(BACKBONES),
        help="fine-tuned from its packaged ImageNet weights (lite0: ~3x faster to train than "
        "lite2, same retrieval after fine-tuning in our runs)",
    )
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--train-image-size", type=int, default=224)
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--freeze-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="unfrozen epochs")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--embedding", choices=["heads", "pooled"], default="heads")
    parser.add_argument(
        "--head-weight",
        action="append",
        default=None,
        metavar="NAME=WEIGHT",
        help="weight of a head in the heads embedding (repeatable; default category=4: "
        "chosen on a separate validation set of garments, seed 909)",
    )
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, help="JSON path (default results/quality.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.stock, args.queries, args.inshop_items, args.views = 40, 12, 15, 3
        args.train_images, args.train_image_size, args.train_batch_size = 48, 128, 16
        args.freeze_epochs, args.epochs, args.reps = 1, 1, 2
        args.cosine_sample, args.calibration_images = 8, 16
        if args.backbones == parser.get_default("backbones"):
            args.backbones = "efficientnet-lite0"
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    for name in args.backbones:
        if name not in BACKBONES:
            parser.error(f"unknown backbone {name!r}; use {', '.join(BACKBONES)}")
    args.runtimes = [tuple(r.strip().split(":")) for r in args.runtimes.split(",") if r.strip()]
    args.poolings = [p.strip() for p in args.poolings.split(",") if p.strip()]
    args.head_weights = {
        name.strip(): float(value)
        for name, _, value in (w.partition("=") for w in (args.head_weight or ["category=4"]))
    }
    args.out = args.out or RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fashionrec.embedder.weights").setLevel(logging.ERROR)  # random:0 warning
    threads = cpu_cores()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fashionrec-quality-")
        work = Path(tmp.name)
    else:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    try:
        t = time.perf_counter()
        data = make_data(args, work)
        data_s = time.perf_counter() - t
        print(f"data generated in {data_s:.1f}s under {work}", flush=True)
        new_combos = {combo(s) for s in data.stock}
        shared_combos = sum(combo(s) in new_combos for s in data.new)
        base: dict[str, Any] = {"device": "cpu", "cache_dir": cache, "threads": threads}
        base |= {"batch_size": 16, "calibration_images": args.calibration_images}
        models = []
        for name in args.backbones:
            weights = "random:0" if name == "resnet50" else "imagenet"
            for pooling in (p for p in args.poolings if p in BACKBONES[name].poolings):
                label = f"{name} {weights}" + (" regional" if pooling == "regional" else "")
                values = {"backbone": name, "weights": weights, "pooling": pooling}
                models.append(measure_model(label, base | values, data, args))
        fine = None
        if not args.skip_train:
            print(f"fine-tuning {args.train_backbone} on {data.train_root}", flush=True)
            fine = fine_tune(args, data, work, cache)
            label = f"{args.train_backbone} fine-tuned"
            ft_base = base | {"backbone": args.train_backbone, "weights": str(fine["dir"])}
            models.append(measure_model(label, ft_base, data, args))
            fine["dir"] = str(fine["dir"])
    finally:
        if tmp is not None:
            tmp.cleanup()

    figures: dict[str, Any] = {
        "stock": args.stock,
        "queries": args.queries,
        "inshop_items": args.inshop_items,
        "views": args.views,
        "reps": args.reps,
        "threads": threads,
        "fabrics": args.fabrics,
        "seeds": {
            "stock": STOCK_SEED,
            "new": QUERY_SEED,
            "train": TRAIN_SEED,
            "inshop": INSHOP_SEED,
        },
        "new_sharing_category_colour_pattern_with_stock": shared_combos,
        "chance": {k: round(v, 4) for k, v in chance(data).items()},
        "models": models,
        "fine_tune": fine,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print_tables(figures)
    print(f"\ntotal {figures['seconds']}s; wrote {args.out}")


if __name__ == "__main__":
    main()
