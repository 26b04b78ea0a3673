"""The naive pipeline peers publish vs fashionrec, on the same catalogue, queries and weights.

Naive (what popular GitHub fashion recommenders do, in one process): torchvision ResNet50 in eager
torch with the default NCHW layout, torchvision transforms, ONE image at a time, pooled features
into scikit-learn `NearestNeighbors(algorithm="brute")` (euclidean, the peers' default), refit on
every change. Same network and weights as fashionrec's embedder (`--weights`).

fashionrec: the running stack (`fashionrec up`), the catalogue loaded with `fashionrec ingest`
(batched: POST /v1/items/batch) until every item is indexed, then one client sending the queries
to POST /v1/search.

Queries are modified photos (crop, flip, brightness, re-encoding) of catalogue garments; a hit is
the garment's own sku in the top 5. Agreement: the share of top-5 skus both pipelines return.

    .venv/bin/python benchmarks/naive_vs_fashionrec.py [--items 1000] [--queries 100]

Prints a table and writes benchmarks/results/naive_vs_fashionrec.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
from _stack import jpeg_bytes, percentile, running_stack
from fashionrec_cli.ingest import ingest
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb, write_catalog
from PIL import Image


def naive(weights: str, cache_dir: Path, files: list[Path], queries: list[bytes]) -> dict:
    import torch
    from fashionrec_embedder.weights import load_body, parse_weights
    from sklearn.neighbors import NearestNeighbors
    from torchvision import transforms

    # The peers' model: ResNet50 (a BACKBONE:WEIGHTS spec may name another one).
    model = load_body(parse_weights(weights, "resnet50"), cache_dir).eval()  # NCHW, eager, fp32
    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )

    def embed(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.no_grad():
            return model(transform(image).unsqueeze(0)).flatten().numpy()

    embed(files[0].read_bytes())  # warm-up, as any server would
    started = time.perf_counter()
    features = np.stack([embed(f.read_bytes()) for f in files])
    index = NearestNeighbors(n_neighbors=5, algorithm="brute").fit(features)
    ingest_s = time.perf_counter() - started

    latencies, answers = [], []
    for data in queries:
        t = time.perf_counter()
        _, found = index.kneighbors(embed(data)[None, :])
        latencies.append((time.perf_counter() - t) * 1000)
        answers.append([int(i) for i in found[0]])
    return {
        "ingest_s": ingest_s,
        "latencies": latencies,
        "answers": answers,  # row numbers into `files`
    }


def fashionrec(url: str, catalog: Path, folder: Path, items: int, queries: list[bytes]) -> dict:
    started = time.perf_counter()
    summary = ingest(catalog, folder, url, poll_interval_s=0.1, progress=False)
    ingest_s = time.perf_counter() - started
    if summary.done != items:
        raise SystemExit(f"fashionrec ingest did not index everything: {summary}")
    latencies, answers = [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/v1/search", files={"image": ("w.jpg", queries[0])}).raise_for_status()
        for data in queries:
            t = time.perf_counter()
            response = client.post(
                "/v1/search", params={"k": 5}, files={"image": ("q.jpg", data, "image/jpeg")}
            )
            latencies.append((time.perf_counter() - t) * 1000)
            response.raise_for_status()
            answers.append([r["sku"] for r in response.json()["results"]])
    return {"ingest_s": ingest_s, "latencies": latencies, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=512, help="catalogue photo side (px)")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    with running_stack(args.weights) as stack:
        folder = stack.work / "catalog"
        specs = generate_catalog(args.items, seed=args.seed, size=args.image_size)
        catalog = write_catalog(specs, folder, fmt="csv")
        files = [folder / "images" / spec.image_name for spec in specs]
        step = max(1, len(specs) // args.queries)
        targets = specs[::step][: args.queries]
        queries = [
            jpeg_bytes(perturb(make_garment(spec), seed=5000 + n)) for n, spec in enumerate(targets)
        ]
        # The naive pipeline runs first, while the stack idles (same machine, same cores).
        plain = naive(args.weights, stack.work / "data" / "models", files, queries)
        ours = fashionrec(stack.url, catalog, folder, len(specs), queries)

    skus = [spec.sku for spec in specs]
    plain_skus = [[skus[i] for i in answer] for answer in plain["answers"]]
    agreement = statistics.mean(
        len(set(a) & set(b)) / 5 for a, b in zip(plain_skus, ours["answers"], strict=True)
    )

    def hit_rate(answers: list[list[str]]) -> float:
        hits = sum(t.sku in a for t, a in zip(targets, answers, strict=True))
        return round(hits / len(targets), 3)

    def side(run: dict, answers: list[list[str]]) -> dict:
        return {
            "ingest_seconds": round(run["ingest_s"], 2),
            "ingest_items_per_s": round(len(specs) / run["ingest_s"], 2),
            "query_ms_median": round(statistics.median(run["latencies"]), 1),
            "query_ms_p95": round(percentile(run["latencies"], 0.95), 1),
            "queries_per_s": round(len(run["latencies"]) / (sum(run["latencies"]) / 1000), 2),
            "top5_hit_rate": hit_rate(answers),
        }

    naive_side, ours_side = side(plain, plain_skus), side(ours, ours["answers"])
    figures = {
        "weights": args.weights,
        "items": len(specs),
        "queries": len(queries),
        "image_size": args.image_size,
        "naive": naive_side,
        "fashionrec": ours_side,
        "ingest_speedup": round(naive_side["ingest_seconds"] / ours_side["ingest_seconds"], 2),
        "query_latency_speedup": round(
            naive_side["query_ms_median"] / ours_side["query_ms_median"], 2
        ),
        "top5_agreement": round(agreement, 3),
    }
    print(json.dumps(figures, indent=2))
    out = Path(__file__).parent / "results" / "naive_vs_fashionrec.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
