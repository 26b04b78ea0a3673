"""End-to-end figures of the one-machine stack: time to ready, top-5 hit rate, search latency.

Starts `fashionrec up` with nothing configured (embedded Postgres, Redis, blob directory) in a
temporary data directory, loads a synthetic catalogue with `fashionrec ingest`, then searches
with a modified photo (crop, flip, brightness, re-encoding) of every garment, one at a time.

    .venv/bin/python benchmarks/pipeline.py [--items 60] [--queries 50] [--weights random:0]

Prints a table and writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
from _stack import ingest, jpeg_bytes, percentile, running_stack
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb, write_catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    with running_stack(args.weights) as stack:
        specs = generate_catalog(args.items, seed=args.seed)
        catalog = write_catalog(specs, stack.work / "catalog", fmt="csv")
        t0 = time.monotonic()
        ingest(stack, catalog, stack.work / "catalog")
        ingest_s = time.monotonic() - t0

        latencies, hits = [], 0
        queries = specs[: args.queries]
        with httpx.Client(base_url=stack.url, timeout=60) as client:
            for n, spec in enumerate(queries):
                data = jpeg_bytes(perturb(make_garment(spec), seed=1000 + n))
                t = time.perf_counter()
                response = client.post(
                    "/v1/search", params={"k": 5}, files={"image": ("q.jpg", data)}
                )
                latencies.append((time.perf_counter() - t) * 1000)
                response.raise_for_status()
                hits += any(r["sku"] == spec.sku for r in response.json()["results"])
        figures = {
            "weights": args.weights,
            "items": len(specs),
            "queries": len(queries),
            "seconds_to_ready": round(stack.seconds_to_ready, 2),
            "ingest_seconds": round(ingest_s, 2),
            "ingest_items_per_s": round(len(specs) / ingest_s, 2),
            "top5_hit_rate": round(hits / len(queries), 3),
            "search_ms_median": round(statistics.median(latencies), 1),
            "search_ms_p95": round(percentile(latencies, 0.95), 1),
            "search_ms_min": round(min(latencies), 1),
        }
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    out = Path(__file__).parent / "results" / "pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
