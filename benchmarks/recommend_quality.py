"""Does "more like these, not like that" beat a single-photo search? And do the reasons explain?

Through the real stack (`fashionrec up`, embedded services, temporary data dir): a generated
catalogue of `--stock` garments (seed 101) is ingested, then each of `--trials` trials takes new
garments (seed 202, never in stock), photographed (`perturb`):

- liked: two photos of one shape (category) and pattern, in different colours;
- disliked: one photo of another shape;

and compares the top 5 of
- `POST /v1/search` with each liked photo alone (the baseline, mean of the two), and
- `POST /v1/recommend` with both likes and the dislike, strategies `average` and `best_score`,

by the share of the top 5 with the liked shape, with the liked pattern, with both, and with the
disliked shape. With `--train-images N` it also fine-tunes a model (`fashionrec train` on a
generated DeepFashion-layout set, seed 7) and repeats the comparison served by that model, where
results carry predictions: the reasons rate is the share of results whose `reasons` name a
predicted category or attribute the result shares with its liked example.

    .venv/bin/python benchmarks/recommend_quality.py [--stock 300] [--trials 40]
        [--train-images 600] [--model DIR]

Prints a table and writes benchmarks/results/recommend_quality.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from _stack import ingest, jpeg_bytes, running_stack
from fashionrec_cli.datasets.deepfashion_attr import write_deepfashion_attributes
from fashionrec_cli.synthetic import (
    GarmentSpec,
    generate_catalog,
    make_garment,
    perturb,
    write_catalog,
)
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
STOCK_SEED, NEW_SEED, TRAIN_SEED = 101, 202, 7
K = 5
MODES = ("search", "average", "best_score")


def plan_trials(n: int, seed: int) -> list[tuple[GarmentSpec, GarmentSpec, GarmentSpec]]:
    """(liked a, liked b, disliked): a and b share category and pattern, not colour."""
    pool = generate_catalog(1260, seed=NEW_SEED)  # every (category, colour, pattern) once
    by_shape: dict[tuple[str, str], list[GarmentSpec]] = defaultdict(list)
    for spec in pool:
        by_shape[(spec.category, spec.pattern)].append(spec)
    rnd = random.Random(seed)
    keys = sorted(by_shape)
    rnd.shuffle(keys)
    trials = []
    for key in keys[:n]:
        a, b = rnd.sample(by_shape[key], 2)
        other = rnd.choice([s for s in pool if s.category != key[0]])
        trials.append((a, b, other))
    return trials


def photo(spec: GarmentSpec, seed: int) -> bytes:
    return jpeg_bytes(perturb(make_garment(spec), seed), quality=90)


def shares(results: list[dict[str, Any]], stock: dict[str, GarmentSpec], liked: GarmentSpec,
           disliked: GarmentSpec) -> dict[str, float]:  # fmt: skip
    specs = [stock[r["sku"]] for r in results]
    n = max(1, len(specs))
    return {
        "shape": sum(s.category == liked.category for s in specs) / n,
        "pattern": sum(s.pattern == liked.pattern for s in specs) / n,
        "shape+pattern": sum(
            s.category == liked.category and s.pattern == liked.pattern for s in specs
        ) / n,
        "disliked shape": sum(s.category == disliked.category for s in specs) / n,
    }  # fmt: skip


def explained(results: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(results, with a shared predicted category or attribute, with a shared colour)."""
    named = coloured = 0
    for r in results:
        reasons = r.get("reasons") or {}
        named += bool(reasons.get("category") or any(reasons.get("attributes", {}).values()))
        coloured += bool(reasons.get("colours"))
    return len(results), named, coloured


def run_trials(url: str, stock: dict[str, GarmentSpec], trials: list[Any]) -> dict[str, Any]:
    per_mode: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    counts = {m: [0, 0, 0] for m in MODES}
    wins = ties = 0
    latencies: dict[str, list[float]] = {m: [] for m in MODES}
    with httpx.Client(base_url=url, timeout=120) as client:
        for t, (a, b, other) in enumerate(trials):
            pa, pb, pd = photo(a, 10_000 + t), photo(b, 20_000 + t), photo(other, 30_000 + t)
            singles = []
            for data in (pa, pb):
                started = time.perf_counter()
                r = client.post("/v1/search", params={"k": K}, files={"image": ("q.jpg", data)})
                latencies["search"].append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
                found = r.json()["results"]
                singles.append(shares(found, stock, a, other))
                for i, v in enumerate(explained(found)):
                    counts["search"][i] += v
            per_mode["search"].append(
                {key: statistics.mean(s[key] for s in singles) for key in singles[0]}
            )
            for strategy in ("average", "best_score"):
                files = [("like", ("a.jpg", pa)), ("like", ("b.jpg", pb)),
                         ("dislike", ("d.jpg", pd))]  # fmt: skip
                started = time.perf_counter()
                r = client.post("/v1/recommend", params={"k": K, "strategy": strategy}, files=files)
                latencies[strategy].append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
                found = r.json()["results"]
                per_mode[strategy].append(shares(found, stock, a, other))
                for i, v in enumerate(explained(found)):
                    counts[strategy][i] += v
            gain = per_mode["average"][-1]["shape"] - per_mode["search"][-1]["shape"]
            wins += gain > 0
            ties += gain == 0
    out: dict[str, Any] = {"trials": len(trials), "average_beats_search": wins, "ties": ties}
    for mode in MODES:
        rows = per_mode[mode]
        n, named, coloured = counts[mode]
        out[mode] = {
            **{key: round(statistics.mean(r[key] for r in rows), 3) for key in rows[0]},
            "reasons_named": round(named / max(1, n), 3),
            "reasons_colour": round(coloured / max(1, n), 3),
            "p50_ms": round(statistics.median(latencies[mode]), 1),
        }
    return out


def fine_tune(work: Path, images: int) -> Path:
    root = work / "deepfashion"
    write_deepfashion_attributes(root, images, seed=TRAIN_SEED, size=256)
    out = work / "model-ft"
    subprocess.run(
        [sys.executable, "-m", "fashionrec_embedder", "train", str(root), "--out", str(out),
         "--freeze-epochs", "2", "--epochs", "1", "--image-size", "160",
         "--head-weight", "category=4"],
        check=True,
    )  # fmt: skip
    return out


def evaluate(weights: str, args: argparse.Namespace) -> dict[str, Any]:
    stock_specs = generate_catalog(args.stock, seed=STOCK_SEED)
    stock = {s.sku: s for s in stock_specs}
    trials = plan_trials(args.trials, args.seed)
    with running_stack(weights) as stack:
        catalog = write_catalog(stock_specs, stack.work / "catalog", fmt="csv")
        ingest(stack, catalog, stack.work / "catalog")
        return {"weights": weights, **run_trials(stack.url, stock, trials)}


def print_table(figures: list[dict[str, Any]]) -> None:
    table = Table(title=f"top-{K} shares over trials (2 likes of one shape+pattern, 1 dislike)")
    columns = ("model", "query", "liked shape", "liked pattern", "shape+pattern",
               "disliked shape", "reasons: category/attr", "reasons: colour", "p50 ms")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right" if column not in ("model", "query") else "left")
    for fig in figures:
        for mode in MODES:
            row = fig[mode]
            label = "search (1 liked photo)" if mode == "search" else f"recommend {mode}"
            table.add_row(
                fig["weights"] if mode == "search" else "", label,
                f"{row['shape']:.3f}", f"{row['pattern']:.3f}", f"{row['shape+pattern']:.3f}",
                f"{row['disliked shape']:.3f}", f"{row['reasons_named']:.3f}",
                f"{row['reasons_colour']:.3f}", f"{row['p50_ms']:.1f}",
            )  # fmt: skip
    Console(width=200).print(table)
    for fig in figures:
        print(
            f"{fig['weights']}: recommend average beats single-photo search on liked-shape share "
            f"in {fig['average_beats_search']}/{fig['trials']} trials ({fig['ties']} ties)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stock", type=int, default=300)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="imagenet", help="the plain model compared first")
    parser.add_argument("--train-images", type=int, default=0, help="fine-tune on N; 0: skip")
    parser.add_argument("--model", help="a model directory from `fashionrec train` to compare")
    args = parser.parse_args()

    figures = [evaluate(args.weights, args)]
    model = args.model
    if model is None and args.train_images:
        model = str(fine_tune(Path(tempfile.mkdtemp(prefix="fashionrec-ft-")), args.train_images))
    if model is not None:
        figures.append(evaluate(model, args))
    print_table(figures)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recommend_quality.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
