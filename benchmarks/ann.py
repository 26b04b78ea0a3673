"""Nearest-neighbour search of the indexer: Annoy trees x candidates x dimension, vs exact search.

Measures the REAL code path: the index files are written with the indexer's own
`builder.write_ann` (Annoy over the full vectors or over a PCA / random projection of them), opened
with `index_files.open_build` (Annoy and vectors.npy mmapped) and queried with `search.search`
(over-fetch of `candidates` Annoy answers, exact re-scoring from vectors.npy, empty delta).

Data: unit vectors drawn around `--clusters` random unit centres (Gaussian noise of norm
~`--sigma`), queries drawn from the same distribution but not in the index. Ground truth: exact
top-5 by cosine. Also times, in the same run, the exact scan of the whole build (the fallback:
one matvec over the mmapped vectors.npy, one query at a time) and the delta's exact scan
(search over a DeltaView of 1k / 10k items), whose answer is checked against brute force.

    .venv/bin/python benchmarks/ann.py                 # 100k items, 2048-d and 512-d (~5 min)
    .venv/bin/python benchmarks/ann.py --items 20000   # quick run

Prints a table and writes benchmarks/results/ann.json. Timings are medians of single queries.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fashionrec_indexer.builder import write_ann
from fashionrec_indexer.index_files import MANIFEST, open_build
from fashionrec_indexer.index_state import DeltaView
from fashionrec_indexer.manifest import IndexManifest
from fashionrec_indexer.search import SearchRequest, search
from fashionrec_indexer.settings import ANN_CANDIDATES, ANN_DIM, ANN_PROJECTION, N_TREES
from rich.console import Console
from rich.table import Table

K = 5

# (label, ann_dim or 0 = full, projection, n_trees, [(candidates, search_k), ...])
SWEEP = [50, 100, 200]


def variants(dim: int) -> list[tuple[str, int, str, int, list[tuple[int, int]]]]:
    full = [(20, -1), (50, -1), (100, -1), (100, 10_000)]
    proj = [(c, -1) for c in SWEEP]
    out = [
        (f"annoy {dim}-d", 0, "-", 10, full[:2]),
        (f"annoy {dim}-d", 0, "-", N_TREES, full),
        (f"pca {dim}->256", 256, "pca", 10, proj),
        (f"pca {dim}->256", 256, "pca", N_TREES, proj),
        (f"random {dim}->256", 256, "random", N_TREES, proj),
    ]
    if dim > 512:
        out.append((f"pca {dim}->512", 512, "pca", N_TREES, proj[:2]))
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, sigma: float) -> np.ndarray:
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 10_000):
        m = min(10_000, n - start)
        labels = rng.integers(0, len(centres), m)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (sigma / np.sqrt(dim))
        out[start : start + m] = unit(centres[labels] + noise)
    return out


def exact_truth(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    scores = queries @ vectors.T
    top = np.argpartition(-scores, K, axis=1)[:, :K]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 3)


def write_build(directory: Path, vectors_file: Path, n: int, dim: int, ann: dict) -> None:
    (directory / "vectors.npy").symlink_to(vectors_file)
    ids = [str(uuid.UUID(int=i)) for i in range(n)]
    (directory / "items.json").write_text(
        json.dumps({"ids": ids, "categories": [None] * n, "prices": [None] * n})
    )
    manifest = IndexManifest(
        build_id=directory.name,
        model_version="benchmark",
        item_count=n,
        dim=dim,
        **ann,
        checksums={},  # never fetched: opened in place
        max_change_seq=0,
        created_at=datetime.now(UTC),
    )
    (directory / MANIFEST).write_text(manifest.dumps())


def run_queries(build, queries, truth, candidates, search_k) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    delta = DeltaView.empty(None, build.dim)
    for q in queries[:10]:  # warm the mmaps
        search(build, delta, SearchRequest(q, K, search_k=search_k, candidates=candidates))
    times, recalls = [], []
    for q, want in zip(queries, truth, strict=True):
        request = SearchRequest(q, K, search_k=search_k, candidates=candidates)
        t0 = time.perf_counter()
        hits, _ = search(build, delta, request)
        times.append(time.perf_counter() - t0)
        got = {h.int for h, _ in hits}
        assert len(got) == K
        recalls.append(len(got & set(want.tolist())) / K)
    return {"recall@5": round(float(np.mean(recalls)), 4), "ms_median": ms(times, 50),
            "ms_p95": ms(times, 95)}  # fmt: skip


def exact_scan(vectors_file: Path, queries: np.ndarray) -> dict[str, Any]:
    vectors = np.load(vectors_file, mmap_mode="r")
    times = []
    for q in queries[:30]:
        t0 = time.perf_counter()
        scores = np.asarray(vectors) @ q
        np.argpartition(-scores, K)[:K]
        times.append(time.perf_counter() - t0)
    return {"ms_median": ms(times[5:], 50), "ms_p95": ms(times[5:], 95)}


def delta_scan(rng: np.random.Generator, dim: int, m: int) -> dict[str, Any]:
    vectors = unit(rng.standard_normal((m, dim), dtype=np.float32))
    ids = [uuid.UUID(int=i) for i in range(m)]
    view = DeltaView(
        model_version="bench",
        dim=dim,
        changed=frozenset(ids),
        masked_positions=np.empty(0, dtype=np.int64),
        ids=ids,
        vectors=vectors,
        categories=np.array([None] * m, dtype=object),
        prices=np.full(m, np.nan),
        positions={i: n for n, i in enumerate(ids)},
    )
    queries = unit(rng.standard_normal((60, dim), dtype=np.float32))
    times = []
    for q in queries:
        t0 = time.perf_counter()
        hits, _ = search(None, view, SearchRequest(q, K))
        times.append(time.perf_counter() - t0)
        brute = np.argsort(-(vectors @ q))[:K]
        assert [h.int for h, _ in hits] == brute.tolist()
    return {"items": m, "dim": dim, "ms_median": ms(times[10:], 50), "ms_p95": ms(times[10:], 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dims", default="2048,512")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--delta", default="1000,10000")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ann.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="fashionrec-ann-"))
    rows: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        for dim in (int(d) for d in args.dims.split(",")):
            centres = unit(rng.standard_normal((args.clusters, dim), dtype=np.float32))
            vectors = clustered(rng, centres, args.items, args.sigma)
            queries = clustered(rng, centres, args.queries, args.sigma)
            truth = exact_truth(vectors, queries)
            vectors_file = work / f"vectors-{dim}.npy"
            np.save(vectors_file, vectors)
            del vectors
            baselines[f"exact {dim}-d"] = exact_scan(vectors_file, queries)
            for label, ann_dim, projection, n_trees, sweep in variants(dim):
                directory = work / f"{dim}-{ann_dim}-{projection}-{n_trees}"
                directory.mkdir()
                src = np.load(vectors_file, mmap_mode="r")
                t0 = time.perf_counter()
                ann = write_ann(directory, src, n_trees, ann_dim, projection)
                build_s = time.perf_counter() - t0
                del src
                write_build(directory, vectors_file, args.items, dim, ann)
                size = sum(
                    (directory / f).stat().st_size for f in ann["files"] if f != "vectors.npy"
                )
                build = open_build(directory)
                for candidates, search_k in sweep:
                    result = run_queries(build, queries, truth, candidates, search_k)
                    row = {"variant": label, "dim": dim, "ann_dim": ann["ann_dim"],
                           "n_trees": n_trees, "candidates": candidates, "search_k": search_k,
                           "build_s": round(build_s, 1), "index_mb": round(size / 2**20, 1),
                           **result}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del build
                shutil.rmtree(directory)
            vectors_file.unlink()
        deltas = [
            delta_scan(rng, dim, int(m))
            for dim in (int(d) for d in args.dims.split(","))
            for m in args.delta.split(",")
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"ANN search, {args.items} items, k={K}, {args.queries} queries")
    for col in ("variant", "trees", "cand", "search_k", "build s", "ann MB", "recall@5",
                "ms med", "ms p95"):  # fmt: skip
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        default = (r["ann_dim"] == min(ANN_DIM or r["dim"], r["dim"]) and r["n_trees"] == N_TREES
                   and r["candidates"] == ANN_CANDIDATES and r["search_k"] == -1
                   and ("pca" in r["variant"]) == (ANN_PROJECTION == "pca"))  # fmt: skip
        table.add_row(
            r["variant"] + (" *" if default else ""), str(r["n_trees"]), str(r["candidates"]),
            str(r["search_k"]), f"{r['build_s']:.1f}", f"{r['index_mb']:.0f}",
            f"{r['recall@5']:.3f}", f"{r['ms_median']:.3f}", f"{r['ms_p95']:.3f}",
        )  # fmt: skip
    table.add_section()
    for name, b in baselines.items():
        table.add_row(f"{name} scan (fallback)", "", "", "", "", "", "1.000",
                      f"{b['ms_median']:.3f}", f"{b['ms_p95']:.3f}")  # fmt: skip
    for d in deltas:
        table.add_row(f"delta exact {d['items']}x{d['dim']}", "", "", "", "", "", "1.000",
                      f"{d['ms_median']:.3f}", f"{d['ms_p95']:.3f}")  # fmt: skip
    console = Console(width=120)
    console.print(table)
    total = time.perf_counter() - started
    console.print(
        "* = the indexer's defaults (settings.py); ann MB excludes vectors.npy "
        f"({args.items} x dim x 4 B); total {total:.0f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "items": args.items, "queries": args.queries, "clusters": args.clusters,
        "sigma": args.sigma, "k": K, "machine": platform.processor() or platform.machine(),
        "defaults": {"n_trees": N_TREES, "ann_dim": ANN_DIM, "ann_projection": ANN_PROJECTION,
                     "candidates": ANN_CANDIDATES},
        "rows": rows, "exact": baselines, "delta": deltas,
    }, indent=2) + "\n")  # fmt: skip
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
