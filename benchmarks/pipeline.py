"""End-to-end figures of the one-machine stack: time to ready, top-5 hit rate, search latency.

Starts `fashionrec up` with nothing configured (embedded Postgres, Redis, blob directory) in a
temporary data directory, loads a synthetic catalogue with `fashionrec ingest`, then searches
with a modified photo (crop, flip, brightness, re-encoding) of every garment, one at a time.

    .venv/bin/python benchmarks/pipeline.py [--items 60] [--queries 50] [--weights random:0]

Prints a table and writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fashionrec_cli.infra import free_port
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb, write_catalog


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--weights", default="random:0")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fashionrec-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHIONREC_")}
    for key in ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT"):
        env.pop(key, None)
    log = open(work / "up.log", "wb")  # noqa: SIM115
    started = time.monotonic()
    up = subprocess.Popen(
        [sys.executable, "-m", "fashionrec_cli", "up", "--port", str(port),
         "--data-dir", str(work / "data"), "--weights", args.weights],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while True:
            if up.poll() is not None:
                sys.exit(f"fashionrec up exited; see {work / 'up.log'}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        ready_s = time.monotonic() - started

        specs = generate_catalog(args.items, seed=args.seed)
        catalog = write_catalog(specs, work / "catalog", fmt="csv")
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "fashionrec_cli", "ingest", str(catalog),
             "--images", str(work / "catalog"), "--gateway", url],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        ingest_s = time.monotonic() - t0

        latencies, hits = [], 0
        queries = specs[: args.queries]
        with httpx.Client(base_url=url, timeout=60) as client:
            for n, spec in enumerate(queries):
                buf = io.BytesIO()
                perturb(make_garment(spec), seed=1000 + n).convert("RGB").save(
                    buf, "JPEG", quality=85
                )
                t = time.perf_counter()
                response = client.post(
                    "/v1/search", params={"k": 5}, files={"image": ("q.jpg", buf.getvalue())}
                )
                latencies.append((time.perf_counter() - t) * 1000)
                response.raise_for_status()
                hits += any(r["sku"] == spec.sku for r in response.json()["results"])
        figures = {
            "weights": args.weights,
            "items": len(specs),
            "queries": len(queries),
            "seconds_to_ready": round(ready_s, 2),
            "ingest_seconds": round(ingest_s, 2),
            "ingest_items_per_s": round(len(specs) / ingest_s, 2),
            "top5_hit_rate": round(hits / len(queries), 3),
            "search_ms_median": round(statistics.median(latencies), 1),
            "search_ms_p95": round(percentile(latencies, 0.95), 1),
            "search_ms_min": round(min(latencies), 1),
        }
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    out = Path(__file__).parent / "results" / "pipeline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
