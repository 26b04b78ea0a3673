"""Search request latency and throughput against the running stack, at 1 and 8 clients.

Starts `fashionrec up` (embedded services) on loopback, loads a small synthetic catalogue, then
sends 800x800 JPEG photos to POST /v1/search: first one client, then 8 concurrent clients. Every
request carries a distinct photo, so the query-vector cache never answers. Bounded in count and
time. Stage timings come from the gateway's Server-Timing header: upload (body received and
parsed), validate, store, embed (the whole embedder round trip) split into queue (send, wait for
a free worker, result delivery), fetch, decode, infer (the worker's own timings), then search (the
indexer call) with the indexer's index-delta, index-ann, index-metadata, and respond. The baseline
is the raw model rate at batch 1 (the embedder's own `Embedder.embed`, same weights and runtime,
decode included) measured in this script.

    .venv/bin/python benchmarks/request_path.py [--requests 60] [--clients 8] [--embedders 1]

Prints a table and writes benchmarks/results/request_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import httpx
from _stack import ingest, jpeg_bytes, percentile, running_stack
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb, write_catalog


def photos(n: int, seed: int) -> list[bytes]:
    specs = generate_catalog(max(8, n // 4), seed=seed, size=800)
    out = []
    for i in range(n):
        img = perturb(make_garment(specs[i % len(specs)]), seed=seed * 1000 + i).resize((800, 800))
        out.append(jpeg_bytes(img, quality=90))
    return out


def parse_timing(header: str) -> dict[str, float]:
    stages = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            stages[name] = float(dur)
    return stages


async def run_clients(url: str, bodies: list[bytes], clients: int, max_s: float) -> dict:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    errors = 0
    deadline = time.monotonic() + max_s

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while not queue.empty() and time.monotonic() < deadline:
                body = queue.get_nowait()
                t = time.perf_counter()
                response = await http.post(
                    "/v1/search", params={"k": 5}, files={"image": ("q.jpg", body, "image/jpeg")}
                )
                latencies.append((time.perf_counter() - t) * 1000)
                if response.status_code != 200:
                    errors += 1
                for name, ms in parse_timing(response.headers.get("server-timing", "")).items():
                    stages[name].append(ms)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "ms_median": round(statistics.median(latencies), 1),
        "ms_p95": round(percentile(latencies, 0.95), 1),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "stage_ms_median": {k: round(statistics.median(v), 1) for k, v in stages.items()},
    }


def model_batch1_rate(weights: str, n: int = 30) -> float:
    """Images/s of the embedder's own model at batch 1, decode and preprocess included."""
    from fashionrec_embedder.model import Embedder
    from fashionrec_embedder.preprocess import decode_image
    from fashionrec_embedder.settings import EmbedderSettings

    os.environ.setdefault("FASHIONREC_EMBEDDER_THREADS", str(os.cpu_count() or 1))
    embedder = Embedder(EmbedderSettings(weights=weights))
    embedder.load()
    bodies = photos(n, seed=99)
    embedder.embed([decode_image(bodies[0])])
    started = time.perf_counter()
    for body in bodies:
        embedder.embed([decode_image(body, draft_size=embedder.settings.image_size)])
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=120, help="time bound per phase")
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--embedders", type=int, default=1, help="embedder worker processes")
    args = parser.parse_args()

    baseline = model_batch1_rate(args.weights)
    with running_stack(args.weights, embedders=args.embedders) as stack:
        specs = generate_catalog(40, seed=3)
        catalog = write_catalog(specs, stack.work / "catalog", fmt="csv")
        ingest(stack, catalog, stack.work / "catalog")
        warm = photos(5, seed=5)
        with httpx.Client(base_url=stack.url, timeout=60) as client:
            for body in warm:
                client.post("/v1/search", files={"image": ("w.jpg", body)}).raise_for_status()
        one = asyncio.run(run_clients(stack.url, photos(args.requests, 1), 1, args.max_seconds))
        many = asyncio.run(
            run_clients(stack.url, photos(args.requests, 2), args.clients, args.max_seconds)
        )
    figures = {
        "weights": args.weights,
        "embedders": args.embedders,
        "model_batch1_images_per_s": round(baseline, 2),
        "one_client": one,
        f"{args.clients}_clients": many,
        "throughput_vs_model_batch1": round(many["requests_per_s"] / baseline, 2),
        "one_client_vs_model_batch1": round(one["requests_per_s"] / baseline, 2),
    }
    print(json.dumps(figures, indent=2))
    out = Path(__file__).parent / "results" / "request_path.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
