"""Batch ingestion end to end vs the raw model rate, measured in the same run.

1. Raw model rate: the embedder's own `Embedder` (same weights and settings as the stack) on
   preprocessed images at its batch size (16): inference only, the bar ingestion is held to.
2. Starts `fashionrec up` (embedded services), writes a synthetic catalogue of N photos and runs
   `fashionrec ingest` (its `ingest()` function, batched: POST /v1/items/batch) until the job has
   every item indexed, i.e. image files → gateway → blob store → indexer → EMBED_ITEMS → vectors
   in Postgres → searchable. Then, for comparison, a smaller catalogue one item per request.

    .venv/bin/python benchmarks/ingest.py [--items 320] [--batch-size 32] [--single-items 64]

Prints a table and writes benchmarks/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
from _stack import running_stack
from fashionrec_cli.ingest import ingest
from fashionrec_cli.synthetic import generate_catalog, write_catalog


def raw_model_rate(
    weights: str, image_dir: Path, cache_dir: Path, n: int = 64, rounds: int = 3
) -> dict:
    """Images/s of Embedder.embed_tensors on preprocessed images, at the embedder's batch size."""
    from fashionrec_embedder.model import Embedder
    from fashionrec_embedder.preprocess import preprocess
    from fashionrec_embedder.settings import EmbedderSettings

    settings = EmbedderSettings(weights=weights, cache_dir=cache_dir)
    embedder = Embedder(settings)
    embedder.load()
    files = sorted(image_dir.glob("images/*.jpg"))[:n]
    tensors = [preprocess(f.read_bytes(), embedder.image_size, norm=embedder.norm) for f in files]
    embedder.embed_tensors(tensors[: settings.batch_size])  # warm
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        embedder.embed_tensors(tensors)
        rates.append(len(tensors) / (time.perf_counter() - started))
    rates.sort()
    return {
        "runtime": getattr(embedder, "runtime", "torch"),
        "batch_size": settings.batch_size,
        "images_per_s": round(rates[len(rates) // 2], 2),
    }


def run_ingest(url: str, folder: Path, items: int, seed: int, batch_size: int, size: int) -> dict:
    specs = generate_catalog(items, seed=seed, size=size)
    catalog = write_catalog(specs, folder, fmt="csv")
    started = time.perf_counter()
    summary = ingest(
        catalog, folder, url, batch_size=batch_size, poll_interval_s=0.1, progress=False
    )
    elapsed = time.perf_counter() - started
    if not summary.ok or summary.done != items:
        raise SystemExit(f"ingest failed: {summary}")
    return {
        "items": items,
        "batch_size": batch_size,
        "seconds": round(elapsed, 2),
        "items_per_s": round(items / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--single-items", type=int, default=64, help="0 skips the comparison")
    parser.add_argument("--image-size", type=int, default=512, help="catalogue photo side (px)")
    parser.add_argument("--weights", default="random:0")
    args = parser.parse_args()

    with running_stack(args.weights) as stack:
        # The raw rate is measured while the stack idles, on images like the catalogue's.
        sample = stack.work / "sample"
        write_catalog(generate_catalog(64, seed=99, size=args.image_size), sample, fmt="csv")
        raw = raw_model_rate(args.weights, sample, stack.work / "data" / "models")
        httpx.get(f"{stack.url}/readyz", timeout=10).raise_for_status()
        batched = run_ingest(
            stack.url, stack.work / "batched", args.items, 1, args.batch_size, args.image_size
        )
        single = None
        if args.single_items:
            single = run_ingest(
                stack.url, stack.work / "single", args.single_items, 2, 1, args.image_size
            )
    figures = {
        "weights": args.weights,
        "image_size": args.image_size,
        "raw_model": raw,
        "batched_ingest": batched,
        "single_ingest": single,
        "batched_vs_raw_model": round(batched["items_per_s"] / raw["images_per_s"], 3),
        "single_vs_raw_model": (
            round(single["items_per_s"] / raw["images_per_s"], 3) if single else None
        ),
    }
    print(json.dumps(figures, indent=2))
    out = Path(__file__).parent / "results" / "ingest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
