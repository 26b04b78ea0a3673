"""Top-k search over one snapshot: Annoy candidates re-scored exactly, merged with the delta.

Guarantees: exactly min(k, eligible) distinct items, sorted by exact cosine (highest first). Annoy
is approximate and can return fewer neighbours than asked (notably on small or filtered indexes),
so when its candidates run short the build's vectors are scanned exactly instead.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from fashionrec_shared.schemas import SearchFilters

from fashionrec_indexer.index_files import LoadedIndex
from fashionrec_indexer.index_state import DeltaView

# Below this share of eligible build items Annoy mostly returns filtered-out ones: scan exactly.
EXACT_BELOW_FRACTION = 0.2
OVERFETCH = 4


@dataclass(frozen=True)
class SearchStats:
    annoy_used: bool = False
    fallback: bool = False


def _filter_mask(categories: np.ndarray, prices: np.ndarray, filters: SearchFilters) -> np.ndarray:
    mask = np.ones(len(categories), dtype=bool)
    if filters.category is not None:
        mask &= categories == filters.category
    # NaN (no price) compares False, so unpriced items drop out when a price bound is given.
    if filters.min_price is not None:
        mask &= prices >= filters.min_price
    if filters.max_price is not None:
        mask &= prices <= filters.max_price
    return mask


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores, highest first."""
    if n >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, n - 1)[:n]
    return part[np.argsort(-scores[part], kind="stable")]


def annoy_candidates(build: LoadedIndex, query: np.ndarray, n: int, search_k: int) -> list[int]:
    """Annoy's n nearest positions (may return fewer: a known Annoy behaviour)."""
    assert build.annoy is not None
    return build.annoy.get_nns_by_vector(query, n, search_k=search_k)


def _search_build(
    build: LoadedIndex,
    query: np.ndarray,
    k: int,
    mask: np.ndarray,
    search_k: int,
) -> tuple[list[tuple[uuid.UUID, float]], SearchStats]:
    eligible = int(mask.sum())
    need = min(k, eligible)
    if need == 0:
        return [], SearchStats()
    positions: list[int] = []
    use_annoy = build.annoy is not None and eligible >= EXACT_BELOW_FRACTION * build.size
    if use_annoy:
        # Over-fetch in proportion to what the filters and the delta mask out.
        n = min(build.size, max(16, math.ceil(need * OVERFETCH * build.size / eligible)))
        while True:
            candidates = dict.fromkeys(annoy_candidates(build, query, n, search_k))
            positions = [p for p in candidates if mask[p]]
            if len(positions) >= need or n >= build.size:
                break
            n = min(build.size, n * OVERFETCH)
    if len(positions) >= need:
        chosen = np.array(positions, dtype=np.int64)
        scores = np.asarray(build.vectors[chosen]) @ query
        order = _top(scores, need)
        hits = [(build.ids[int(chosen[i])], float(scores[i])) for i in order]
        return hits, SearchStats(annoy_used=True)
    # Exact scan of the eligible part of the build.
    chosen = np.flatnonzero(mask)
    scores = np.asarray(build.vectors[chosen]) @ query
    order = _top(scores, need)
    hits = [(build.ids[int(chosen[i])], float(scores[i])) for i in order]
    return hits, SearchStats(annoy_used=use_annoy, fallback=use_annoy)


def search(
    build: LoadedIndex | None,
    delta: DeltaView,
    query: np.ndarray,
    k: int,
    filters: SearchFilters | None = None,
    exclude: Collection[uuid.UUID] = (),
    search_k: int = -1,
) -> tuple[list[tuple[uuid.UUID, float]], SearchStats]:
    """(item_id, cosine) of the k best eligible items, best first; `query` must be normalised."""
    filters = filters or SearchFilters()
    query = np.ascontiguousarray(query, dtype=np.float32)
    excluded = set(exclude)
    hits: list[tuple[uuid.UUID, float]] = []
    stats = SearchStats()
    if build is not None and build.size:
        mask = _filter_mask(build.categories, build.prices, filters)
        mask[delta.masked_positions] = False  # stale entries: the delta has their current state
        for item_id in excluded:
            position = build.positions.get(item_id)
            if position is not None:
                mask[position] = False
        hits, stats = _search_build(build, query, k, mask, search_k)
    if delta.ids:
        mask = _filter_mask(delta.categories, delta.prices, filters)
        if excluded:
            mask &= np.array([i not in excluded for i in delta.ids], dtype=bool)
        chosen = np.flatnonzero(mask)
        if len(chosen):
            scores = delta.vectors[chosen] @ query
            for i in _top(scores, min(k, len(chosen))):
                hits.append((delta.ids[int(chosen[i])], float(scores[i])))
    hits.sort(key=lambda hit: -hit[1])
    return [(item_id, max(-1.0, min(1.0, score))) for item_id, score in hits[:k]], stats


def searchable_count(build: LoadedIndex | None, delta: DeltaView) -> int:
    """Items a query can return now (the build minus its stale entries, plus the delta)."""
    in_build = 0
    if build is not None:
        in_build = build.size - len(np.unique(delta.masked_positions))
    return in_build + len(delta.ids)
