"""Dynamic batching in the embedder: the real worker, Redis and the Celery client path, batching
off vs on, against the raw model rates measured around each measurement.

For each workload, each mode (FASHIONREC_EMBEDDER_BATCHING=false: prefork, one task at a time,
prefetch 1; true: threads pool + batcher) in turn, repeated (`--repeat`), it starts
`fashionrec-embedder worker` (the real CLI) on a private Redis and a blob folder, waits for its
heartbeat, warms it up and measures from client threads that send tasks by name as the gateway
and indexer do (`fashionrec_shared.celery_app.send`, then `AsyncResult.get`):

- one client: sequential EMBED_QUERY of distinct 800x800 JPEGs, latency p50/p95;
- 8 clients: each sends a query and waits for its vector, then the next, for `--seconds`;
- single-item writes from 4 clients: each sends EMBED_ITEMS of one item (512 px JPEGs) as fast
  as POST /v1/items answers 202 (it does not wait for the embedding), until every task has
  finished: items/s from the first send to the last result.

The bars: the embedder's own `Embedder` (same backbone, pooling, runtime, threads) in this
process, inference only on preprocessed images at batch 1, 8 and 16, measured right before and
after each workload while the worker idles (the machine's load drifts; the phase is compared
with the mean of the two). Also reported: CPU ms per image of the worker and of the clients,
and the batch sizes the worker logs when it stops (`batching: {...}`).

    .venv/bin/python benchmarks/batching.py [--backbone efficientnet-lite0] [--pooling global]
        [--runtime R] [--image-size PX] [--weights W] [--seconds 15] [--items 320]
        [--queries 60] [--repeat 2] [--modes off,on] [--out FILE]

`--modes` takes off / on, optionally `@N` (FASHIONREC_EMBEDDER_BATCH_SIZE=N) and `:tN`
(FASHIONREC_EMBEDDER_THREADS=N), e.g. `off,on,on@8:t1`. Prints a table and writes
benchmarks/results/batching.json (or `--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis
from _stack import jpeg_bytes, percentile
from fashionrec_cli.infra import EmbeddedRedis
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb
from fashionrec_shared.celery_app import make_celery, send
from fashionrec_shared.keys import embedder_alive_pattern
from fashionrec_shared.settings import BrokerSettings
from fashionrec_shared.storage import LocalBlobStore, content_key
from fashionrec_shared.tasks import EmbedItem, EmbedItems, EmbedQuery, ImageRef, TaskName


def photos(n: int, seed: int, size: int) -> list[bytes]:
    specs = generate_catalog(max(8, n // 4), seed=seed, size=size)
    out = []
    for i in range(n):
        img = perturb(make_garment(specs[i % len(specs)]), seed=seed * 1000 + i).resize(
            (size, size)
        )
        out.append(jpeg_bytes(img, quality=90))
    return out


def store_all(store: LocalBlobStore, blobs: list[bytes], prefix: str) -> list[ImageRef]:
    refs = []
    for data in blobs:
        key, digest = content_key(prefix, data, "jpg")
        store.put(key, data)
        refs.append(ImageRef(key=key, sha256=digest))
    return refs


class RawModel:
    """The embedder's own `Embedder` (same settings as the worker) in this process: the bars."""

    def __init__(self, env: dict[str, str], blobs: list[bytes]) -> None:
        from fashionrec_embedder.model import Embedder
        from fashionrec_embedder.preprocess import decode_image, image_to_array
        from fashionrec_embedder.settings import EmbedderSettings

        keys = ("BACKBONE", "POOLING", "WEIGHTS", "RUNTIME", "CACHE_DIR", "IMAGE_SIZE", "DEVICE")
        prefix = "FASHIONREC_EMBEDDER_"
        settings = EmbedderSettings(
            **{k.lower(): env[prefix + k] for k in keys if prefix + k in env}
        )
        self.model = Embedder(settings)
        self.model.load()
        self.blobs = blobs
        size = self.model.image_size
        self.arrays = [
            image_to_array(decode_image(b, draft_size=size), size, norm=self.model.norm)
            for b in blobs
        ]
        for n in (1, 8, 16):
            self.model._run(np.stack(self.arrays[:n]))  # warm each shape

    def rates(self, rounds: int = 3) -> dict[str, float]:
        """Images/s of inference alone on preprocessed images at batch 1, 8, 16 (median)."""
        rates: dict[str, float] = {}
        for size in (1, 8, 16):
            batches = [
                np.stack(self.arrays[i : i + size])
                for i in range(0, len(self.arrays) - size + 1, size)
            ]
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                for batch in batches:
                    self.model._run(batch)
                samples.append(len(batches) * size / (time.perf_counter() - started))
            rates[f"batch_{size}"] = round(statistics.median(samples), 1)
        # The model's own pipeline from the JPEG bytes (decode on its decode thread), no Celery.
        started = time.perf_counter()
        self.model.embed_bytes(self.blobs)
        rates["batch_16_with_decode"] = round(len(self.blobs) / (time.perf_counter() - started), 1)
        # Core-ms per image of inference alone at batch 16.
        batch = np.stack(self.arrays[:16])
        cpu = time.process_time()
        for _ in range(rounds):
            self.model._run(batch)
        rates["inference_cpu_ms_per_image"] = round(
            (time.process_time() - cpu) * 1000 / (16 * rounds), 2
        )
        return rates


class Worker:
    """`fashionrec-embedder worker` as a child process, with its log."""

    def __init__(self, env: dict[str, str], log: Path, broker: str) -> None:
        self.log_path = log
        self.broker = broker
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fashionrec_embedder", "worker"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 300) -> None:
        client = redis.Redis.from_url(self.broker)
        deadline = time.monotonic() + timeout
        while not any(True for _ in client.scan_iter(match=embedder_alive_pattern("*"))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"embedder worker did not start; see {self.log_path}")
            time.sleep(0.2)
        client.close()

    def cpu_s(self) -> float:
        """CPU seconds of the worker's processes (a prefork worker's children too)."""
        main = psutil.Process(self.process.pid)
        total = 0.0
        for proc in [main, *main.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> dict[str, Any] | None:
        """Warm shutdown; the batch sizes it logged (None with batching off)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()
        found = re.findall(r"batching: (\{.*\})", self.log_path.read_text(errors="replace"))
        return json.loads(found[-1]) if found else None


def one_client(app: Any, refs: list[ImageRef], n: int) -> dict[str, Any]:
    latencies = []
    for i in range(n):
        started = time.perf_counter()
        result = send(app, TaskName.EMBED_QUERY, EmbedQuery(image=refs[i % len(refs)]))
        result.get(timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
        result.forget()
    return {
        "requests": n,
        "ms_p50": round(statistics.median(latencies), 1),
        "ms_p95": round(percentile(latencies, 0.95), 1),
    }


def many_clients(app: Any, refs: list[ImageRef], clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                ref = refs[next(counter) % len(refs)]
            started = time.perf_counter()
            result = send(app, TaskName.EMBED_QUERY, EmbedQuery(image=ref))
            result.get(timeout=60)
            ms = (time.perf_counter() - started) * 1000
            result.forget()
            with lock:
                latencies.append(ms)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "ms_p50": round(statistics.median(latencies), 1),
        "ms_p95": round(percentile(latencies, 0.95), 1),
    }


def single_item_writes(app: Any, refs: list[ImageRef], clients: int) -> dict[str, Any]:
    results: list[Any] = []
    lock = threading.Lock()
    shares = [refs[i::clients] for i in range(clients)]

    def client(k: int) -> None:
        for n, ref in enumerate(shares[k]):
            payload = EmbedItems(items=[EmbedItem(item_id=f"c{k}-{n}", image=ref)])
            result = send(app, TaskName.EMBED_ITEMS, payload)
            with lock:
                results.append(result)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    embedded = sum(r.get(timeout=300)["embedded"] for r in results)
    elapsed = time.perf_counter() - started
    if embedded != len(refs):
        raise SystemExit(f"only {embedded} of {len(refs)} items embedded")
    return {
        "clients": clients,
        "items": len(refs),
        "seconds": round(elapsed, 2),
        "items_per_s": round(len(refs) / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--pooling", default="global")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--seconds", type=float, default=20, help="8-client phase length")
    parser.add_argument("--queries", type=int, default=60, help="one-client requests")
    parser.add_argument("--items", type=int, default=320, help="single-item writes")
    parser.add_argument("--clients", type=int, default=8, help="search clients")
    parser.add_argument("--writers", type=int, default=4, help="single-item write clients")
    parser.add_argument(
        "--cache-dir", default=str(Path(tempfile.gettempdir()) / "fashionrec-bench-cache")
    )
    parser.add_argument(
        "--modes", default="off,on", help="batching modes in order; on@N: with batch size N"
    )
    parser.add_argument("--workloads", default="one_client,many_clients,single_item_writes")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every mode x workload")
    parser.add_argument("--runtime", default=None, help="FASHIONREC_EMBEDDER_RUNTIME (auto)")
    parser.add_argument("--image-size", type=int, default=None, help="model input side")
    parser.add_argument("--raw-images", type=int, default=64, help="images of the raw rates")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "batching.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fashionrec-batching-"))
    server = EmbeddedRedis(work / "redis")
    broker = server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHIONREC_")}
    env.update(
        FASHIONREC_EMBEDDER_BACKBONE=args.backbone,
        FASHIONREC_EMBEDDER_POOLING=args.pooling,
        FASHIONREC_EMBEDDER_WEIGHTS=args.weights,
        FASHIONREC_EMBEDDER_CACHE_DIR=args.cache_dir,
        FASHIONREC_BROKER_URL=broker,
        FASHIONREC_STORAGE_BACKEND="local",
        FASHIONREC_STORAGE_LOCAL_DIR=str(work / "blobs"),
    )
    if args.runtime:
        env["FASHIONREC_EMBEDDER_RUNTIME"] = args.runtime
    if args.image_size:
        env["FASHIONREC_EMBEDDER_IMAGE_SIZE"] = str(args.image_size)
    store = LocalBlobStore(work / "blobs")
    print("drawing photos ...", flush=True)
    query_blobs = photos(64, seed=1, size=800)
    item_blobs = photos(args.items, seed=2, size=512)
    query_refs = store_all(store, query_blobs, "uploads")
    item_refs = store_all(store, item_blobs, "inventory")
    print("loading the model here for the raw rates ...", flush=True)
    raw_model = RawModel(env, item_blobs[: args.raw_images])
    app = make_celery("batching-bench", BrokerSettings(url=broker))
    phases: list[dict[str, Any]] = []
    bars = {"one_client": None, "many_clients": "batch_8", "single_item_writes": "batch_16"}
    try:
        # Modes side by side per workload, repeated: the machine's load drifts, so each phase is
        # compared with the raw rate measured right before and after it.
        for repeat in range(args.repeat):
            for workload in args.workloads.split(","):
                for mode in args.modes.split(","):
                    print(
                        f"[{repeat + 1}/{args.repeat}] batching {mode}: {workload} ...", flush=True
                    )
                    phase = run_phase(args, env, work, broker, app, raw_model, mode, workload,
                                      query_refs, item_refs)  # fmt: skip
                    bar = bars[workload]
                    if bar:
                        phase["vs_raw"] = round(phase["throughput"] / phase["raw"][bar], 3)
                    phases.append(phase)
                    redis.Redis.from_url(broker).delete("index")  # nobody consumes STORE_EMBEDDINGS
    finally:
        server.stop()

    summary: dict[str, Any] = {}
    for mode in args.modes.split(","):
        for workload in args.workloads.split(","):
            mine = [p for p in phases if p["mode"] == mode and p["workload"] == workload]
            if not mine:
                continue
            row: dict[str, Any] = {"runs": len(mine)}
            for key in ("throughput", "vs_raw", "ms_p50", "ms_p95"):
                values = [p[key] for p in mine if key in p]
                if values:
                    row[key] = round(statistics.median(values), 3)
            row["mean_batch"] = [p["batches"]["mean_size"] for p in mine if p.get("batches")]
            summary.setdefault(mode, {})[workload] = row
    figures: dict[str, Any] = {
        "backbone": args.backbone,
        "pooling": args.pooling,
        "weights": args.weights,
        "model_version": raw_model.model.model_version,
        "runtime": raw_model.model.runtime,
        "summary": summary,
        "phases": phases,
    }
    if "on" in summary and "off" in summary and "one_client" in summary["on"]:
        figures["one_client_p50_change_ms"] = round(
            summary["on"]["one_client"]["ms_p50"] - summary["off"]["one_client"]["ms_p50"], 1
        )
    print(json.dumps(figures, indent=2))
    units = {"one_client": "req/s", "many_clients": "req/s", "single_item_writes": "items/s"}
    bar_names = {"many_clients": "x raw b8", "single_item_writes": "x raw b16"}
    for mode, rows in summary.items():
        for workload, row in rows.items():
            ratio = f" = {row['vs_raw']} {bar_names[workload]}" if "vs_raw" in row else ""
            print(
                f"{mode:>6} | {workload:<18} | {row['throughput']} {units[workload]}{ratio}, "
                f"p50 {row.get('ms_p50', '-')} ms, p95 {row.get('ms_p95', '-')} ms, "
                f"mean batch {row['mean_batch']}"
            )
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


def run_phase(
    args: argparse.Namespace,
    env: dict[str, str],
    work: Path,
    broker: str,
    app: Any,
    raw_model: RawModel,
    mode: str,
    workload: str,
    query_refs: list[ImageRef],
    item_refs: list[ImageRef],
) -> dict[str, Any]:
    """One worker start, one workload; with the raw rates around it (the worker idle)."""
    # "on@4": batching on with FASHIONREC_EMBEDDER_BATCH_SIZE=4; "...:t1" with THREADS=1
    mode_spec, _, threads = mode.partition(":t")
    switch, _, batch_size = mode_spec.partition("@")
    env_mode = {**env, "FASHIONREC_EMBEDDER_BATCHING": str(switch == "on").lower()}
    if batch_size:
        env_mode["FASHIONREC_EMBEDDER_BATCH_SIZE"] = batch_size
    if threads:
        env_mode["FASHIONREC_EMBEDDER_THREADS"] = threads
    worker = Worker(env_mode, work / f"worker-{mode}-{workload}-{time.time():.0f}.log", broker)
    try:
        worker.wait_ready()
        one_client(app, query_refs, 5)  # warm up
        before = raw_model.rates()
        worker_cpu, client_cpu = worker.cpu_s(), time.process_time()
        if workload == "one_client":
            measured = one_client(app, query_refs, args.queries)
        elif workload == "many_clients":
            measured = many_clients(app, query_refs, args.clients, args.seconds)
        else:
            measured = single_item_writes(app, item_refs, args.writers)
        done = measured.get("items") or measured["requests"]
        # Where the cores go: core-ms per image in the worker and in the client threads.
        measured["worker_cpu_ms_per_image"] = round((worker.cpu_s() - worker_cpu) * 1000 / done, 2)
        measured["client_cpu_ms_per_image"] = round(
            (time.process_time() - client_cpu) * 1000 / done, 2
        )
        after = raw_model.rates()
    finally:
        batches = worker.stop()
    measured["throughput"] = measured.get("items_per_s") or measured.get("requests_per_s")
    if measured["throughput"] is None:  # one client: requests/s from the median latency
        measured["throughput"] = round(1000 / measured["ms_p50"], 2)
    return {
        "mode": mode,
        "workload": workload,
        **measured,
        "raw": {k: round((before[k] + after[k]) / 2, 2) for k in before},
        "batches": batches,
    }


if __name__ == "__main__":
    main()
