"""The indexer at 1k … 1M items: build time and memory, swap time, query latency and recall.

Everything runs through the real code: a fresh database migrated by `fashionrec-indexer
migrate`, vectors written in bulk the way a re-embed leaves them (binary COPY into `embeddings`
with the served model version, the items `indexed`, `updated_at` = now), the index built by
`fashionrec-indexer rebuild` (a child process: its peak RSS is read from the kernel), served by
`fashionrec-indexer serve` (uvicorn, a child process) and queried over loopback HTTP: POST
/search with a vector and GET /items/{id}/similar, one request at a time. Each response's
Server-Timing gives the indexer's stage times.

Data: unit vectors drawn around N / `--per-cluster` random unit centres (Gaussian noise of norm
`--sigma`, a Gaussian mixture, the same as benchmarks/ann.py), generated chunk by chunk from
seeds so that nothing holds all of them; queries come from the same mixture but are not in the
index. Ground truth: exact top-5 by cosine over the float32 vectors (chunked matmuls).
recall@5 = mean |served top 5 ∩ exact top 5| / 5.

Swap time: a second build (`rebuild --force`) is made while the server serves the first one
and queries run; swap = the build's finished_at (when it became ready) → the first response
with its index_version.

    .venv/bin/python benchmarks/scale.py --items 1000,10000,100000 --dims 1280,4160
    .venv/bin/python benchmarks/scale.py --items 1000000 --dims 1280 --dtypes float16

Prints a table and writes benchmarks/results/scale.json (merged with earlier runs).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg2
from rich.console import Console
from rich.table import Table

K = 5
MODEL = "scale-bench-v1"
CATEGORIES = [f"cat{i:02d}" for i in range(20)]  # fixed width: one COPY row layout
PG_EPOCH_US = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
CHUNK = 20_000


# ---- data -------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Mixture:
    """A Gaussian mixture of unit vectors; chunk `c` of the items is drawn from seed (seed, c).

    `latent` 0: isotropic (centres and within-cluster noise span every dimension). `latent` L:
    centres and within-cluster variation live in a random L-dimensional subspace, plus
    full-dimensional noise of norm `noise` -- the low intrinsic dimension of CNN embeddings.
    """

    def __init__(
        self,
        n: int,
        dim: int,
        clusters: int,
        sigma: float,
        seed: int = 0,
        latent: int = 0,
        noise: float = 0.0,
    ) -> None:
        self.n, self.dim, self.sigma, self.seed = n, dim, sigma, seed
        self.latent, self.noise = latent, noise
        rng = np.random.default_rng([seed, 0xC3])
        space = latent or dim
        self.centres = unit(rng.standard_normal((clusters, space), dtype=np.float32))
        self.basis = None
        if latent:
            basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
            self.basis = np.ascontiguousarray(basis.T, dtype=np.float32)  # (latent, dim)

    def _draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        labels = rng.integers(0, len(self.centres), m)
        space = self.centres.shape[1]
        spread = rng.standard_normal((m, space), dtype=np.float32)
        spread *= self.sigma / np.sqrt(space)
        spread += self.centres[labels]
        if self.basis is None:
            return unit(spread)
        out = spread @ self.basis
        out += rng.standard_normal((m, self.dim), dtype=np.float32) * (
            self.noise / np.sqrt(self.dim)
        )
        return unit(out)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for c, start in enumerate(range(0, self.n, CHUNK)):
            m = min(CHUNK, self.n - start)
            yield start, self._draw(np.random.default_rng([self.seed, 1, c]), m)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The vectors of some item positions (regenerates their chunks)."""
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        for c in np.unique(positions // CHUNK):
            start = int(c) * CHUNK
            block = self._draw(
                np.random.default_rng([self.seed, 1, int(c)]), min(CHUNK, self.n - start)
            )
            here = np.flatnonzero(positions // CHUNK == c)
            out[here] = block[positions[here] - start]
        return out

    def queries(self, m: int) -> np.ndarray:
        return self._draw(np.random.default_rng([self.seed, 2]), m)


def exact_top(mixture: Mixture, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """(positions, scores) of the exact top-k of every query over all items (chunked)."""
    best_pos = np.full((len(queries), k), -1, dtype=np.int64)
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start, block in mixture.chunks():
        scores = queries @ block.T
        if exclude is not None:
            hit = (exclude >= start) & (exclude < start + len(block))
            scores[np.flatnonzero(hit), exclude[hit] - start] = -np.inf
        pos = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        all_scores = np.concatenate([best, scores], axis=1)
        all_pos = np.concatenate([best_pos, pos], axis=1)
        top = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        best = np.take_along_axis(all_scores, top, axis=1)
        best_pos = np.take_along_axis(all_pos, top, axis=1)
    return best_pos, best


# ---- bulk load --------------------------------------------------------------------------------


def item_ids(n: int) -> np.ndarray:
    """(n, 16) bytes: deterministic random-looking UUIDs (version 4 bits set)."""
    raw = np.random.default_rng([7, n]).integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    return raw


def shas(start: int, m: int) -> np.ndarray:
    return np.array(
        [hashlib.sha256(f"scale-image-{i}".encode()).hexdigest() for i in range(start, start + m)],
        dtype="S64",
    )


def _copy_header() -> bytes:
    return b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")


def _fields(spec: list[tuple[str, Any]]) -> np.dtype:
    """A packed COPY BINARY tuple: a field count, then (length, value) per field."""
    layout: list[tuple[str, Any]] = [("nf", ">i2")]
    for name, kind in spec:
        layout += [(f"{name}_len", ">i4"), (name, kind)]
    return np.dtype(layout)


def bulk_load(url: str, mixture: Mixture, model: str, log: Console) -> dict[str, float]:
    """COPY items (indexed) and their embeddings of `model`; returns timings."""
    n, dim = mixture.n, mixture.dim
    ids = item_ids(n)
    sku_len = len(f"sku-{n:09d}")
    item_row = _fields(
        [
            ("id", "V16"),
            ("sku", f"S{sku_len}"),
            ("title", f"S{sku_len + 6}"),
            ("category", "S5"),
            ("price", ">f8"),
            ("image_key", "S78"),
            ("image_sha256", "S64"),
            ("status", "S7"),
            ("created_at", ">i8"),
            ("updated_at", ">i8"),
        ]
    )
    emb_row = _fields(
        [
            ("image_sha256", "S64"),
            ("model_version", f"S{len(model)}"),
            ("dim", ">i4"),
            ("vector", ("<f4", (dim,))),
            ("created_at", ">i8"),
        ]
    )
    started = time.perf_counter()
    conn = psycopg2.connect(url)
    conn.autocommit = False
    now_us = int(time.time() * 1_000_000) - PG_EPOCH_US
    prices = np.random.default_rng([3, n]).uniform(5, 500, n).round(2)
    cats = np.array(CATEGORIES, dtype="S5")[np.random.default_rng([4, n]).integers(0, 20, n)]
    t_items = t_emb = 0.0
    with conn.cursor() as cur:
        for start, block in mixture.chunks():
            m = len(block)
            sha = shas(start, m)
            rows = np.zeros(m, dtype=item_row)
            rows["nf"] = 10
            for name in item_row.names[1:]:
                if name.endswith("_len"):
                    rows[name] = item_row[name[:-4]].itemsize
            rows["id"] = ids[start : start + m].view("V16").ravel()
            rows["sku"] = [f"sku-{i:09d}".encode() for i in range(start, start + m)]
            rows["title"] = [f"title sku-{i:09d}".encode() for i in range(start, start + m)]
            rows["category"] = cats[start : start + m]
            rows["price"] = prices[start : start + m]
            rows["image_key"] = np.char.add(np.char.add(b"inventory/", sha), b".jpg")
            rows["image_sha256"] = sha
            rows["status"] = b"indexed"
            rows["created_at"] = now_us
            rows["updated_at"] = now_us
            t0 = time.perf_counter()
            cur.copy_expert(
                "COPY items (id, sku, title, category, price, image_key, image_sha256, status,"
                " created_at, updated_at) FROM STDIN WITH (FORMAT binary)",
                _Stream(_copy_header() + rows.tobytes() + b"\xff\xff"),
            )
            t_items += time.perf_counter() - t0
            emb = np.zeros(m, dtype=emb_row)
            emb["nf"] = 5
            for name in emb_row.names[1:]:
                if name.endswith("_len"):
                    emb[name] = emb_row[name[:-4]].itemsize
            emb["image_sha256"] = sha
            emb["model_version"] = model.encode()
            emb["dim"] = dim
            emb["vector"] = block
            emb["created_at"] = now_us
            t0 = time.perf_counter()
            cur.copy_expert(
                "COPY embeddings (image_sha256, model_version, dim, vector, created_at)"
                " FROM STDIN WITH (FORMAT binary)",
                _Stream(_copy_header() + emb.tobytes() + b"\xff\xff"),
            )
            t_emb += time.perf_counter() - t0
            if start // CHUNK % 10 == 0:
                log.print(f"  loaded {start + m:,}/{n:,}")
        conn.commit()
    conn.close()
    return {"load_s": time.perf_counter() - started, "copy_items_s": t_items, "copy_emb_s": t_emb}


class _Stream:
    """A file-like object over bytes for copy_expert (read in 8 MB pieces)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        size = len(self._view) - self._at if size < 0 else size
        piece = self._view[self._at : self._at + size]
        self._at += len(piece)
        return piece.tobytes()

    def readline(self, size: int = -1) -> bytes:  # psycopg2 asks for it on text COPY only
        return self.read(size)


# ---- processes --------------------------------------------------------------------------------

ADMIN_URL = os.environ.get(
    "FASHIONREC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
INDEXER = [sys.executable, "-m", "fashionrec_indexer"]


def with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def admin(sql: str) -> None:
    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def indexer_env(url: str, work: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHIONREC_")}
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "FASHIONREC_INDEXER_DATABASE_URL": url,
            "FASHIONREC_STORAGE_BACKEND": "local",
            "FASHIONREC_STORAGE_LOCAL_DIR": str(work / "blobs"),
            "FASHIONREC_INDEXER_INDEX_DIR": str(work / "index-cache"),
            "FASHIONREC_BROKER_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "FASHIONREC_INDEXER_LOG_LEVEL": "WARNING",
            "TMPDIR": str(work / "tmp"),
            **extra,
        }
    )
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return env


class MemoryWatch(threading.Thread):
    """Polls a process's RssAnon / RssFile (kB) and keeps their peaks."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_anon = self.peak_file = self.peak_rss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        path = Path(f"/proc/{self.pid}/status")
        while not self.stop.is_set():
            try:
                fields = dict(
                    line.split(":", 1) for line in path.read_text().splitlines() if ":" in line
                )
            except (FileNotFoundError, ProcessLookupError):
                return
            kb = {k: int(v.split()[0]) for k, v in fields.items() if k.startswith("Rss")}
            self.peak_anon = max(self.peak_anon, kb.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, kb.get("RssFile", 0))
            self.peak_rss = max(self.peak_rss, kb.get("RssAnon", 0) + kb.get("RssFile", 0))
            self.stop.wait(self.every_s)


def run_build(env: dict[str, str], work: Path, log: Console) -> dict[str, Any]:
    """`fashionrec-indexer rebuild` in a child; wall time and peak memory from the kernel."""
    started = time.perf_counter()
    with open(work / "rebuild.log", "ab") as out:
        child = subprocess.Popen(
            [*INDEXER, "rebuild"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        watch = MemoryWatch(child.pid)
        watch.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        watch.stop.set()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        sys.exit(f"rebuild failed ({child.returncode}); see {work / 'rebuild.log'}")
    return {
        "build_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kB on Linux: anonymous + file pages
        "peak_anon_mb": watch.peak_anon / 1024,
        "peak_file_mb": watch.peak_file / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def latest_build(url: str) -> dict[str, Any]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT id, manifest, extract(epoch from finished_at), "
                "extract(epoch from finished_at - created_at) FROM index_builds "
                "WHERE status = 'ready' ORDER BY finished_at DESC LIMIT 1"
            )
            build_id, manifest, finished, took = cur.fetchone()
    finally:
        conn.close()
    return {"build_id": str(build_id), "manifest": manifest, "finished_at": float(finished),
            "in_db_s": float(took)}  # fmt: skip


def index_size(work: Path, build_id: str) -> dict[str, float]:
    directory = work / "blobs" / "indexes" / build_id
    sizes = {p.name: p.stat().st_size / 1e6 for p in directory.iterdir() if p.is_file()}
    sizes["total"] = sum(sizes.values())
    return sizes


class Server:
    """`fashionrec-indexer serve` as a child process on a free port."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        from fashionrec_cli.infra import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(work / "serve.log", "ab")  # noqa: SIM115 - for the child's lifetime
        self.proc = subprocess.Popen(
            [*INDEXER, "serve", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_serving(self, build_id: str, timeout_s: float = 900) -> float:
        """Seconds until /readyz answers with `build_id`; the time it was first seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit("indexer serve exited; see serve.log")
            try:
                answer = self.client.get("/readyz", timeout=5)
                if answer.status_code == 200 and answer.json()["index_version"] == build_id:
                    return time.time()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        sys.exit(f"build {build_id} not served within {timeout_s}s")

    def rss_mb(self) -> dict[str, float]:
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        )
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def timings(header: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if name and rest:
            out[name] = float(rest)
    return out


def encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


# ---- measurements -----------------------------------------------------------------------------


def measure_search(server: Server, queries: np.ndarray, truth: np.ndarray, ids: list[str]):
    """POST /search for every query: client latency (ms), stage medians, recall@5."""
    latency: list[float] = []
    stages: dict[str, list[float]] = {}
    recall: list[float] = []
    index_of = {item_id: i for i, item_id in enumerate(ids)}
    for query, want in zip(queries, truth, strict=True):
        body = {"vector": encode(query), "model_version": MODEL, "k": K}
        t0 = time.perf_counter()
        answer = server.client.post("/search", json=body)
        latency.append((time.perf_counter() - t0) * 1000)
        answer.raise_for_status()
        for name, value in timings(answer.headers.get("server-timing", "")).items():
            stages.setdefault(name, []).append(value)
        got = {index_of[hit["item_id"]] for hit in answer.json()["results"]}
        recall.append(len(got & set(want.tolist())) / K)
    return _summary(latency, stages, recall)


def measure_similar(server: Server, positions: np.ndarray, truth: np.ndarray, ids: list[str]):
    latency: list[float] = []
    stages: dict[str, list[float]] = {}
    recall: list[float] = []
    index_of = {item_id: i for i, item_id in enumerate(ids)}
    for position, want in zip(positions, truth, strict=True):
        t0 = time.perf_counter()
        answer = server.client.get(f"/items/{ids[position]}/similar", params={"k": K})
        latency.append((time.perf_counter() - t0) * 1000)
        answer.raise_for_status()
        for name, value in timings(answer.headers.get("server-timing", "")).items():
            stages.setdefault(name, []).append(value)
        got = {index_of[hit["item_id"]] for hit in answer.json()["results"]}
        recall.append(len(got & set(want.tolist())) / K)
    return _summary(latency, stages, recall)


def _summary(latency: list[float], stages: dict[str, list[float]], recall: list[float]):
    return {
        "p50_ms": statistics.median(latency),
        "p95_ms": percentile(latency, 95),
        "stages_p50_ms": {name: statistics.median(v) for name, v in stages.items()},
        "recall_at_5": float(np.mean(recall)),
        "queries": len(latency),
    }


class Load(threading.Thread):
    """Searches in a loop (during a build and its swap); records what each answer served."""

    def __init__(self, server: Server, queries: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.server, self.queries = server, queries
        self.stop = threading.Event()
        self.seen: list[tuple[float, str | None, float]] = []  # (time, index_version, ms)
        self.errors = 0

    def run(self) -> None:
        client = httpx.Client(base_url=self.server.url, timeout=60)
        i = 0
        while not self.stop.is_set():
            body = {"vector": encode(self.queries[i % len(self.queries)]), "model_version": MODEL,
                    "k": K}  # fmt: skip
            t0 = time.perf_counter()
            try:
                answer = client.post("/search", json=body)
                answer.raise_for_status()
                ms = (time.perf_counter() - t0) * 1000
                self.seen.append((time.time(), answer.json()["index_version"], ms))
            except httpx.HTTPError:
                self.errors += 1
            i += 1
            self.stop.wait(0.05)
        client.close()


def free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def run_point(n: int, dim: int, dtype: str, args: argparse.Namespace, log: Console) -> dict:
    log.rule(f"{n:,} items x {dim}-d, vectors stored as {dtype}")
    need_gb = n * dim * 4 * 1.4 / 1e9 + n * dim * 4 * 3 / 1e9
    if free_gb(Path(tempfile.gettempdir())) < need_gb + 5:
        sys.exit(f"not enough free disk for {n} x {dim}: need ~{need_gb:.0f} GB")
    name = f"fashionrec_scale_{n}_{dim}_{os.getpid()}"
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin(f'CREATE DATABASE "{name}"')
    url = with_database(ADMIN_URL, name)
    work = Path(tempfile.mkdtemp(prefix=f"fashionrec-scale-{n}-{dim}-"))
    env = indexer_env(url, work, {"FASHIONREC_INDEXER_VECTOR_DTYPE": dtype, **args.env})
    server: Server | None = None
    result: dict[str, Any] = {"items": n, "dim": dim, "vector_dtype": dtype,
                              "latent_dim": args.latent_dim,
                              "noise": args.noise if args.latent_dim else 0.0}  # fmt: skip
    try:
        subprocess.run([*INDEXER, "migrate"], env=env, check=True, capture_output=True)
        mixture = Mixture(
            n,
            dim,
            max(1, n // args.per_cluster),
            args.sigma,
            seed=args.seed,
            latent=args.latent_dim,
            noise=args.noise,
        )
        result["load"] = bulk_load(url, mixture, MODEL, log)
        log.print(f"  loaded in {result['load']['load_s']:.1f}s")
        ids = [str(uuid.UUID(bytes=bytes(row))) for row in item_ids(n)]
        queries = mixture.queries(args.queries)
        rng = np.random.default_rng([args.seed, 5])
        positions = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
        t0 = time.perf_counter()
        truth_search, _ = exact_top(mixture, queries, K)
        truth_similar, _ = exact_top(mixture, mixture.rows(positions), K, exclude=positions)
        log.print(f"  exact truth in {time.perf_counter() - t0:.1f}s")

        build1 = run_build(env, work, log)
        first = latest_build(url)
        result["build"] = {**build1, "in_db_s": first["in_db_s"]}
        result["index_mb"] = index_size(work, first["build_id"])
        # The Annoy budget the build calibrated (None for a build without calibration).
        result["search_k"] = first["manifest"].get("search_k")
        result["calibrated_recall"] = first["manifest"].get("calibrated_recall")
        log.print(f"  build {build1['build_s']:.1f}s, peak RSS {build1['peak_rss_mb']:.0f} MB")

        started = time.time()
        server = Server(env, work)
        served = server.wait_serving(first["build_id"])
        result["cold_start_s"] = served - started
        # Warm up (page cache, connection pool), then measure.
        measure_search(server, queries[:20], truth_search[:20], ids)
        result["search"] = measure_search(server, queries, truth_search, ids)
        result["similar"] = measure_similar(server, positions, truth_similar, ids)
        first_s, first_m = result["search"], result["similar"]
        log.print(
            f"  search p50 {first_s['p50_ms']:.2f} ms, similar p50 {first_m['p50_ms']:.2f} ms,"
            f" recall {first_s['recall_at_5']:.3f}"
        )

        # A second build while the first is served and searched: the swap.
        load = Load(server, queries)
        load.start()
        build2 = run_build(env, work, log)
        second = latest_build(url)
        served = server.wait_serving(second["build_id"])
        time.sleep(0.5)
        load.stop.set()
        load.join()
        first_seen = min((t for t, v, _ in load.seen if v == second["build_id"]), default=served)
        start, end = second["finished_at"] - 1, first_seen + 1
        during = [ms for t, _, ms in load.seen if start <= t <= end]
        result["rebuild"] = {**build2, "in_db_s": second["in_db_s"]}
        result["swap_s"] = min(served, first_seen) - second["finished_at"]
        result["during_swap"] = {
            "max_ms": max(during, default=float("nan")),
            "p50_ms": statistics.median(during) if during else float("nan"),
            "errors": load.errors,
        }
        result["search_after_swap"] = measure_search(server, queries, truth_search, ids)
        result["similar_after_swap"] = measure_similar(server, positions, truth_similar, ids)
        result["api_memory_mb"] = server.rss_mb()
        log.print(f"  swap {result['swap_s']:.2f}s; after: search p50 "
                  f"{result['search_after_swap']['p50_ms']:.2f} ms")  # fmt: skip
    finally:
        if server is not None:
            server.close()
        if not args.keep:
            admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.print(f"  kept {work} and database {name}")
    return result


# ---- report -----------------------------------------------------------------------------------


def _data(r: dict[str, Any]) -> str:
    latent = r.get("latent_dim", 0)
    return "isotropic" if not latent else f"{latent}-d + noise {r['noise']:g}"


def render(results: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="indexer at scale (one client, loopback HTTP, k=5)")
    for column in ("items", "dim", "data", "vectors", "build s", "build peak RSS MB", "index MB",
                   "swap s", "search_k", "search p50/p95 ms", "similar p50/p95 ms",
                   "recall@5"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in results:
        s, m = r["search_after_swap"], r["similar_after_swap"]
        table.add_row(
            f"{r['items']:,}", str(r["dim"]), _data(r), r["vector_dtype"],
            f"{r['build']['build_s']:.1f}", f"{r['build']['peak_rss_mb']:.0f}",
            f"{r['index_mb']['total']:.0f}", f"{r['swap_s']:.2f}", str(r.get("search_k") or "-"),
            f"{s['p50_ms']:.2f} / {s['p95_ms']:.2f}", f"{m['p50_ms']:.2f} / {m['p95_ms']:.2f}",
            f"{s['recall_at_5']:.3f} / {m['recall_at_5']:.3f}",
        )  # fmt: skip
    console.print(table)
    stages = Table(title="indexer stage medians, ms (Server-Timing), after the swap")
    for column in ("items", "dim", "data", "vectors", "endpoint", "delta", "item", "ann",
                   "metadata", "client p50"):  # fmt: skip
        stages.add_column(column, justify="right")
    for r in results:
        for endpoint in ("search", "similar"):
            m = r[f"{endpoint}_after_swap"]
            st = m["stages_p50_ms"]
            stages.add_row(
                f"{r['items']:,}", str(r["dim"]), _data(r), r["vector_dtype"], endpoint,
                *(f"{st[name]:.2f}" if name in st else "-" for name in
                  ("delta", "item", "ann", "metadata")),
                f"{m['p50_ms']:.2f}",
            )  # fmt: skip
    console.print(stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", default="1000,10000,100000")
    parser.add_argument("--dims", default="1280")
    parser.add_argument("--dtypes", default="float16", help="vector storage: float32,float16,int8")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--per-cluster", type=int, default=100, help="items per mixture component")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument(
        "--latent-dim", type=int, default=0, help="0: isotropic mixture; L: in an L-d subspace"
    )
    parser.add_argument("--noise", type=float, default=0.3, help="full-dim noise (with L)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the indexer")
    parser.add_argument("--keep", action="store_true", help="keep the database and files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = parser.parse_args()
    args.env = dict(item.split("=", 1) for item in args.env)
    console = Console()
    results: list[dict[str, Any]] = []
    for dim in [int(d) for d in args.dims.split(",")]:
        for n in [int(x) for x in args.items.split(",")]:
            for dtype in args.dtypes.split(","):
                result = run_point(n, dim, dtype, args, console)
                result["env"] = args.env
                results.append(result)
                render(results, console)
                write_results(args, results)  # after every point: a long run keeps its figures
    console.print(f"wrote {args.out}")


def write_results(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """Merge into --out (a point measured again replaces its earlier figures)."""
    previous: list[dict[str, Any]] = []
    if args.out.is_file():
        previous = json.loads(args.out.read_text()).get("results", [])

    def key(r: dict[str, Any]) -> tuple:
        return (
            r["items"],
            r["dim"],
            r["vector_dtype"],
            r.get("latent_dim", 0),
            json.dumps(r.get("env", {})),
        )

    merged = {key(r): r for r in previous} | {key(r): r for r in results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "written_at": datetime.now(UTC).isoformat(),
        "per_cluster": args.per_cluster, "sigma": args.sigma, "queries": args.queries,
        "results": sorted(merged.values(), key=lambda r: (r.get("latent_dim", 0), r["dim"],
                                                          r["items"], r["vector_dtype"])),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
