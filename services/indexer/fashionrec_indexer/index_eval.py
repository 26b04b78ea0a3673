"""Quality and speed of the LIVE index: Annoy's top-k against exact top-k over the same build.

The latest ready build is loaded the way the API loads it (fetched from object storage into
index_dir, checksums verified, Annoy and vectors.npy mmapped). N stored vectors, drawn with a
seed, serve as queries; each query's own entry is left out of both answers (as /similar does),
so a perfect index scores 1.0 without the trivial self-match.

recall@k = mean over queries of |annoy_k ∩ exact_k| / k, where an Annoy result also counts when
its exact cosine equals the k-th exact cosine (within 1e-6): with tied scores any of the tied
items is a correct answer. "Annoy" is the served path: `candidates` Annoy answers (in the trees'
space, possibly a projection) re-scored exactly from vectors.npy. Latencies are wall times of
one query each (that path with search_k; exact = one matrix-vector product over all vectors plus
a partial sort).

Every new build also calibrates its Annoy budget here (`calibrate_search_k`): at a fixed
search_k the recall falls as the inventory grows, at a rate that depends on the data (the
benchmark mixture: 0.997 at 100k items with 2000, 0.44 at 1M), so a fixed budget either wastes
work on small catalogues or loses neighbours on large ones. The build measures the same recall on
its own items and keeps the smallest search_k that reaches the target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fashionrec_shared.storage import BlobStore
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.index_files import fetch
from fashionrec_indexer.loaded_index import LoadedIndex, open_build
from fashionrec_indexer.search import annoy_candidates
from fashionrec_indexer.settings import (
    ANN_CANDIDATES,
    CALIBRATION_QUERIES,
    SEARCH_K_PER_CANDIDATE,
    TARGET_RECALL,
)

TIE_EPS = 1e-6
WARMUP_QUERIES = 10  # page in the mmapped files before timing


class NoIndexBuild(RuntimeError):
    """There is no ready index build to evaluate."""


def load_latest_build(engine: Engine, store: BlobStore, index_dir: Path) -> LoadedIndex:
    """The latest ready build, fetched and verified into index_dir (as the API does)."""
    with engine.connect() as conn:
        latest = repo.latest_ready_build(conn)
    if latest is None:
        raise NoIndexBuild(
            "no index build is ready yet: add items and wait for a build, or run "
            "`fashionrec-indexer rebuild`"
        )
    return open_build(fetch(store, str(latest.id), Path(index_dir)))


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000.0, 4)


def _served_top(
    build: LoadedIndex, query: np.ndarray, position: int, k: int, n: int, search_k: int
) -> list[int]:
    """The served answer for a stored vector: Annoy candidates re-scored exactly, self left out."""
    found = np.sort(np.array(annoy_candidates(build, query, n, search_k), dtype=np.int64))
    found = found[found != position]
    scores = build.vectors.scores(found, query)
    return [int(found[i]) for i in np.argsort(-scores, kind="stable")[:k]]


def evaluate_build(
    build: LoadedIndex,
    samples: int = 200,
    k: int = 5,
    search_k: int = -1,
    seed: int = 0,
    candidates: int = ANN_CANDIDATES,
) -> dict[str, Any]:
    """Recall@k of Annoy vs exact search and per-query latencies on `samples` stored vectors."""
    if k < 1 or samples < 1:
        raise ValueError("k and samples must be >= 1")
    if build.annoy is None or build.size < 2:
        raise NoIndexBuild(f"index build {build.build_id} has {build.size} items: nothing to rank")
    k_eff = min(k, build.size - 1)  # the query's own entry is left out
    rng = np.random.default_rng(seed)
    positions = rng.choice(build.size, size=min(samples, build.size), replace=False)
    vectors = build.vectors
    queries = [np.ascontiguousarray(vectors[p], dtype=np.float32) for p in positions]
    n = max(candidates, k_eff + 1)
    for position, query in zip(positions[:WARMUP_QUERIES], queries, strict=False):
        _served_top(build, query, int(position), k_eff, n, search_k)
        vectors.scan(query)
    annoy_s: list[float] = []
    exact_s: list[float] = []
    recalls: list[float] = []
    short = 0
    for position, query in zip(positions, queries, strict=True):
        t0 = time.perf_counter()
        answer = _served_top(build, query, int(position), k_eff, n, search_k)
        t1 = time.perf_counter()
        scores = vectors.scan(query)
        scores[position] = -np.inf
        exact = _best(scores, k_eff)
        t2 = time.perf_counter()
        annoy_s.append(t1 - t0)
        exact_s.append(t2 - t1)
        short += len(answer) < k_eff
        threshold = scores[exact[-1]] - TIE_EPS
        recalls.append(sum(scores[p] >= threshold for p in answer) / k_eff)
    manifest = build.manifest
    return {
        "build_id": build.build_id,
        "model_version": manifest.model_version,
        "built_at": manifest.created_at.isoformat(),
        "items": build.size,
        "dim": build.dim,
        "n_trees": manifest.n_trees,
        "search_k": search_k,
        "candidates": candidates,
        "ann_dim": manifest.ann_dim,
        "k": k_eff,
        "samples": len(positions),
        "seed": seed,
        f"recall@{k_eff}": float(np.mean(recalls)),
        "recall": float(np.mean(recalls)),
        "min_recall": float(np.min(recalls)),
        "annoy_short_answers": int(short),
        "annoy_ms_median": _ms(annoy_s, 50),
        "annoy_ms_p95": _ms(annoy_s, 95),
        "exact_ms_median": _ms(exact_s, 50),
        "exact_ms_p95": _ms(exact_s, 95),
    }


# ---- per-build search_k -------------------------------------------------------------------------

CALIBRATION_K = 5
# search_k doubles from the flat-cost floor until the target is reached (at most this many
# steps), then two bisections narrow the step that reached it to a quarter of its width.
CALIBRATION_STEPS = 9
CALIBRATION_BISECTIONS = 2
# Rows of the exact scan per step (float32 of this many rows x dim is held at once).
EXACT_ROWS = 16384


@dataclass(frozen=True)
class Calibration:
    search_k: int
    recall: float  # on the sampled items, at search_k
    samples: int
    seconds: float
    steps: tuple[tuple[int, float], ...] = ()  # (search_k, recall) measured, in order


def exact_thresholds(build: LoadedIndex, positions: np.ndarray, k: int) -> np.ndarray:
    """The k-th best exact cosine of each sampled item (sorted positions) with the others (itself
    left out), in one streamed pass over vectors.npy (products of EXACT_ROWS rows at a time)."""
    queries = np.ascontiguousarray(build.vectors[positions], dtype=np.float32)
    best = np.full((len(positions), k), -np.inf, dtype=np.float32)
    rows = np.arange(len(positions))
    for start in range(0, build.size, EXACT_ROWS):
        end = min(build.size, start + EXACT_ROWS)
        scores = queries @ build.vectors[start:end].T
        inside = (positions >= start) & (positions < end)
        scores[rows[inside], positions[inside] - start] = -np.inf
        if scores.shape[1] > k:
            scores = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:]
        merged = np.concatenate([best, scores], axis=1)
        best = np.partition(merged, merged.shape[1] - k, axis=1)[:, -k:]
    return best.min(axis=1)


def _recall_at(
    build: LoadedIndex,
    positions: np.ndarray,
    queries: list[np.ndarray],
    thresholds: np.ndarray,
    k: int,
    candidates: int,
    search_k: int,
) -> float:
    hits = 0
    for position, query, threshold in zip(positions, queries, thresholds, strict=True):
        answer = _served_top(build, query, int(position), k, candidates, search_k)
        scores = build.vectors.scores(np.array(answer, dtype=np.int64), query)
        hits += int(np.sum(scores >= threshold - TIE_EPS))
    return hits / (k * len(positions))


def calibrate_search_k(
    build: LoadedIndex,
    target: float = TARGET_RECALL,
    samples: int = CALIBRATION_QUERIES,
    candidates: int = ANN_CANDIDATES,
    seed: int = 0,
    progress: Any = None,
) -> Calibration:
    """The smallest Annoy search_k (from SEARCH_K_PER_CANDIDATE x candidates up, doubling, then
    bisected) whose recall@5 on `samples` of the build's own items, each left out of its own
    answer, reaches `target`; the largest tried when none does. `progress`: a rich Progress."""
    started = time.perf_counter()
    floor = SEARCH_K_PER_CANDIDATE * candidates
    k = min(CALIBRATION_K, build.size - 1)
    if build.annoy is None or k < 1 or target <= 0:
        return Calibration(floor, float("nan"), 0, 0.0)
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(build.size, size=min(samples, build.size), replace=False))
    task = progress.add_task("calibrating search_k", total=None) if progress else None
    thresholds = exact_thresholds(build, positions, k)
    queries = [np.ascontiguousarray(build.vectors[int(p)], dtype=np.float32) for p in positions]
    n = max(candidates, k + 1)
    steps: list[tuple[int, float]] = []

    def measure(search_k: int) -> float:
        recall = _recall_at(build, positions, queries, thresholds, k, n, search_k)
        steps.append((search_k, recall))
        if task is not None:
            progress.update(task, description=f"calibrating search_k: {search_k} → {recall:.3f}")
        return recall

    low, high = 0, floor
    recall = measure(high)
    for _ in range(CALIBRATION_STEPS - 1):
        # Past size x trees Annoy already visits every leaf: more budget finds nothing new.
        if recall >= target or high >= build.size * build.manifest.n_trees:
            break
        low, high = high, high * 2
        recall = measure(high)
    if recall >= target and low:
        for _ in range(CALIBRATION_BISECTIONS):
            middle = (low + high) // 2
            found = measure(middle)
            if found >= target:
                high, recall = middle, found
            else:
                low = middle
    if task is not None:
        progress.update(task, total=1, completed=1)
    return Calibration(
        high, recall, len(positions), round(time.perf_counter() - started, 3), tuple(steps)
    )


def evaluate_index(
    engine: Engine,
    store: BlobStore,
    index_dir: Path,
    *,
    samples: int = 200,
    k: int = 5,
    search_k: int = -1,
    seed: int = 0,
    candidates: int = ANN_CANDIDATES,
) -> dict[str, Any]:
    """Load the latest ready build and evaluate it (see evaluate_build)."""
    started = time.perf_counter()
    build = load_latest_build(engine, store, index_dir)
    result = evaluate_build(
        build, samples=samples, k=k, search_k=search_k, seed=seed, candidates=candidates
    )
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def render_table(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Index {result['build_id']} ({result['model_version']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(f"recall@{result['k']} (Annoy vs exact)", f"{result['recall']:.4f}")
    table.add_row("min recall over queries", f"{result['min_recall']:.4f}")
    table.add_row(
        "Annoy ms median / p95", f"{result['annoy_ms_median']} / {result['annoy_ms_p95']}"
    )
    table.add_row(
        "exact ms median / p95", f"{result['exact_ms_median']} / {result['exact_ms_p95']}"
    )
    table.add_section()
    keys = ("items", "dim", "ann_dim", "n_trees", "search_k", "candidates", "samples")
    for key in (*keys, "annoy_short_answers"):
        table.add_row(key, str(result[key]))
    console.print(table)
