"""Retrieval evaluation of an embedding model on DeepFashion In-shop (consumer-to-shop style).

Protocol (Eval/list_eval_partition.txt, see evaluation_inshop): every query and gallery image is
embedded; each query ranks the WHOLE gallery by cosine similarity (exact, numpy; embeddings are
unit vectors so cosine = dot product; ties go to the lower gallery index); a gallery image is
relevant to a query when it shows the same item_id. Train images are not used.

Metrics, over the queries whose item has at least one gallery image (the others are skipped and
counted in `queries_skipped`):

- Recall@K (K = 1, 5, 10, 20): fraction of queries with at least one relevant image among the top
  K. This is the "top-K retrieval accuracy" that In-shop papers report.
- mAP@10: mean over queries of AP@10 = (1 / min(R, 10)) * sum_{k=1..10} P@k * rel_k, where rel_k
  is 1 when the k-th result is relevant, P@k the precision of the top k, and R the number of
  gallery images of the query's item. It is 1 only when the first min(R, 10) results are all
  relevant, so mAP@10 <= Recall@10.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fashionrec_shared.progress import progress_bar

from fashionrec_embedder.evaluation_inshop import (
    EvaluationError,
    check_images,
    read_partition,
)
from fashionrec_embedder.model import Embedder
from fashionrec_embedder.preprocess import ImageDecodeError, decode_image
from fashionrec_embedder.settings import EmbedderSettings

RECALL_KS = (1, 5, 10, 20)
MAP_K = 10
# Queries per similarity block: bounds memory at QUERY_BLOCK x gallery floats (In-shop: ~50 MB).
QUERY_BLOCK = 1024

__all__ = [
    "EvaluationError",
    "average_precision_at_k",
    "evaluate_inshop",
    "map_at_k",
    "rank_gallery",
    "recall_at_k",
    "relevance",
    "render_table",
    "retrieval_metrics",
]


# ---- metrics on rankings ----------------------------------------------------------------------


def rank_gallery(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """(Q, min(k, G)) gallery indices, best first, by dot product (cosine for unit vectors)."""
    n_gallery = gallery.shape[0]
    k = min(k, n_gallery)
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], QUERY_BLOCK):
        scores = queries[start : start + QUERY_BLOCK] @ gallery.T
        if k < n_gallery:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(n_gallery), scores.shape)
        part_scores = np.take_along_axis(scores, part, axis=1)
        # Sort by score descending, ties by gallery index: a deterministic ranking.
        order = np.lexsort((part, -part_scores), axis=1)
        out[start : start + len(scores)] = np.take_along_axis(part, order, axis=1)
    return out


def relevance(
    ranking: np.ndarray, query_items: Sequence[str], gallery_items: Sequence[str]
) -> np.ndarray:
    """Boolean (Q, K): is the k-th result of query q an image of q's item?"""
    gallery = np.asarray(gallery_items, dtype=object)
    queries = np.asarray(query_items, dtype=object)
    return gallery[ranking] == queries[:, None]


def recall_at_k(rel: np.ndarray, k: int) -> float:
    """Fraction of queries (rows) with a relevant result in the first k columns."""
    if rel.shape[0] == 0:
        return float("nan")
    return float(rel[:, :k].any(axis=1).mean())


def average_precision_at_k(rel: Sequence[bool] | np.ndarray, n_relevant: int, k: int) -> float:
    """AP@k = (1/min(R, k)) * sum_{i<=k} P@i * rel_i for one ranking (R = n_relevant)."""
    if n_relevant <= 0:
        raise ValueError("AP is undefined for a query without relevant items")
    hits = np.asarray(rel, dtype=bool)[:k]
    if not hits.any():
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / min(n_relevant, k))


def map_at_k(rel: np.ndarray, n_relevant: Sequence[int] | np.ndarray, k: int) -> float:
    """Mean of AP@k over the rows of `rel`."""
    if rel.shape[0] == 0:
        return float("nan")
    pairs = zip(rel, n_relevant, strict=True)
    return float(np.mean([average_precision_at_k(row, int(r), k) for row, r in pairs]))


def retrieval_metrics(
    query_vectors: np.ndarray,
    query_items: Sequence[str],
    gallery_vectors: np.ndarray,
    gallery_items: Sequence[str],
    ks: Sequence[int] = RECALL_KS,
    map_k: int = MAP_K,
) -> dict[str, Any]:
    """Recall@K and mAP@k of every query against the whole gallery, plus counts."""
    per_item = Counter(gallery_items)
    n_relevant = np.array([per_item.get(item, 0) for item in query_items], dtype=np.int64)
    keep = n_relevant > 0
    if not keep.any():
        raise EvaluationError("no query has a gallery image of its item: nothing to evaluate")
    kept_items = [item for item, kept in zip(query_items, keep, strict=True) if kept]
    ranking = rank_gallery(query_vectors[keep], gallery_vectors, max(*ks, map_k))
    rel = relevance(ranking, kept_items, gallery_items)
    metrics: dict[str, Any] = {f"recall@{k}": recall_at_k(rel, k) for k in ks}
    metrics[f"map@{map_k}"] = map_at_k(rel, n_relevant[keep], map_k)
    metrics.update(
        queries=int(keep.sum()),
        queries_skipped=int((~keep).sum()),
        gallery=len(gallery_items),
        items=len(set(kept_items)),
    )
    return metrics


# ---- embedding a dataset ----------------------------------------------------------------------


def _input_size(model: Embedder) -> int:
    # A trained artifact fixes its own input size (Embedder.image_size); else the setting.
    return int(getattr(model, "image_size", None) or model.settings.image_size)


def embed_files(
    model: Embedder, root: Path, names: Sequence[str], batch_size: int, progress: bool = True
) -> np.ndarray:
    """Embed `root/name` for every name, `batch_size` images per model call → (N, dim)."""
    settings = model.settings
    parts: list[np.ndarray] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("embedding", total=len(names))
        for start in range(0, len(names), batch_size):
            images = []
            for name in names[start : start + batch_size]:
                path = root / name
                try:
                    images.append(
                        decode_image(
                            path.read_bytes(),
                            max_pixels=settings.max_image_pixels,
                            draft_size=_input_size(model),
                        )
                    )
                except (OSError, ImageDecodeError) as exc:
                    raise EvaluationError(f"{path}: {exc}") from exc
            parts.append(model.embed(images))
            bar.update(task, advance=len(images))
    if not parts:
        return np.empty((0, model.dim), dtype=np.float32)
    return np.concatenate(parts, axis=0)


def evaluate_inshop(
    root: Path | str,
    settings_or_embedder: EmbedderSettings | Embedder,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on an In-shop dataset at `root`; returns the JSON-able result.

    Keys: recall@1, recall@5, recall@10, recall@20, map@10 (see the module docstring), queries
    (evaluated), queries_skipped (item without gallery images), gallery, items (distinct query
    items), train_images (listed, unused), model_version, dim, image_size, device, dataset, root,
    embed_seconds, images_per_second, seconds (wall time including model load).
    """
    started = time.perf_counter()
    partition = read_partition(root)
    check_images(partition)  # before the (slow) model load
    if isinstance(settings_or_embedder, Embedder):
        model = settings_or_embedder
    else:
        model = Embedder(settings_or_embedder)
    model.load()
    batch = batch_size or model.settings.batch_size
    names = partition.query_images + partition.gallery_images
    embed_started = time.perf_counter()
    vectors = embed_files(model, partition.root, names, batch, progress)
    embed_seconds = time.perf_counter() - embed_started
    n_query = len(partition.query_images)
    metrics = retrieval_metrics(
        vectors[:n_query], partition.query_items, vectors[n_query:], partition.gallery_items
    )
    return {
        "dataset": "deepfashion-inshop",
        "root": str(partition.root),
        "model_version": model.model_version,
        "dim": int(vectors.shape[1]),
        "image_size": _input_size(model),
        "device": str(model.device),
        **metrics,
        "train_images": partition.train_images,
        "embed_seconds": round(embed_seconds, 3),
        "images_per_second": round(len(names) / embed_seconds, 2) if embed_seconds else None,
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- output ----------------------------------------------------------------------------------


def render_table(result: dict[str, Any], console: Any = None) -> None:
    """Print the metrics and counts as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"In-shop retrieval: {result['model_version']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (*(f"recall@{k}" for k in RECALL_KS), f"map@{MAP_K}"):
        table.add_row(key, f"{result[key]:.4f}")
    table.add_section()
    for key in ("queries", "queries_skipped", "gallery", "items"):
        table.add_row(key, str(result[key]))
    table.add_row("images/s", str(result.get("images_per_second")))
    table.add_row("seconds", f"{result['seconds']:.1f}")
    console.print(table)
