"""Top-k search over one snapshot: Annoy candidates re-scored exactly, merged with the delta.

Guarantees: exactly min(k, eligible) distinct items, sorted by exact cosine (highest first). Annoy
is approximate and can return fewer neighbours than asked (notably on small or filtered indexes),
so when its candidates run short the build's vectors are scanned exactly instead.
Annoy only proposes candidates (at least `candidates` of them, in the trees' space, which may be
a projection: see builder.write_ann); they are re-scored in the full dimension from vectors.npy
(exact cosines of the stored vectors: float32, or float16 / int8 within ~1e-3), so recall@k
grows with the candidate count.

Without filters nothing here is proportional to the build's size: the candidates are checked
against the delta's masked positions and the excluded ids (binary searches), never through a
mask over every item. Filters build one vectorised mask over the build's integer codes.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
from fashionrec_shared.schemas import SearchFilters

from fashionrec_indexer.index_state import DeltaView
from fashionrec_indexer.loaded_index import LoadedIndex
from fashionrec_indexer.settings import ANN_CANDIDATES, SEARCH_K, SEARCH_K_PER_CANDIDATE

# Below this share of eligible build items Annoy mostly returns filtered-out ones: scan exactly.
EXACT_BELOW_FRACTION = 0.2
OVERFETCH = 4


@dataclass(frozen=True)
class SearchRequest:
    """One top-k query: what to look for, which items may answer, and how hard Annoy tries.

    `query` must be L2-normalised (full dimension). `candidates`: Annoy answers re-scored
    exactly (at least; more when filters or the delta mask out part of the build). `search_k`:
    Annoy's; -1 = the build's calibrated one, at least SEARCH_K_PER_CANDIDATE x the candidates.
    """

    query: np.ndarray
    k: int
    filters: SearchFilters = field(default_factory=SearchFilters)
    exclude: Collection[uuid.UUID] = ()
    search_k: int = SEARCH_K
    candidates: int = ANN_CANDIDATES


@dataclass(frozen=True)
class SearchStats:
    annoy_used: bool = False
    fallback: bool = False
    scored: int = 0  # build vectors scored (candidates, or the eligible part on an exact scan)


def _filter_mask(
    categories: np.ndarray,
    prices: np.ndarray,
    filters: SearchFilters,
    predicted_categories: np.ndarray | None = None,
) -> np.ndarray:
    """Rows that pass every filter. `predicted_categories` None: no row has a prediction."""
    mask = np.ones(len(categories), dtype=bool)
    if filters.category is not None:
        mask &= categories == filters.category
    # Like `category`, on the served model's prediction; items without one drop out.
    if filters.predicted_category is not None:
        if predicted_categories is None:
            mask[:] = False
        else:
            mask &= predicted_categories == filters.predicted_category
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


def build_mask(build: LoadedIndex, filters: SearchFilters) -> np.ndarray:
    """Build rows that pass every filter (one vectorised pass over the item codes)."""
    items = build.items
    mask = np.ones(build.size, dtype=bool)
    if filters.category is not None:
        mask &= items.categories.matches(filters.category)
    # Like `category`, on the served model's prediction; items without one drop out.
    if filters.predicted_category is not None:
        mask &= items.predicted.matches(filters.predicted_category)
    # NaN (no price) compares False, so unpriced items drop out when a price bound is given.
    if filters.min_price is not None:
        mask &= items.prices >= filters.min_price
    if filters.max_price is not None:
        mask &= items.prices <= filters.max_price
    return mask


def annoy_candidates(build: LoadedIndex, query: np.ndarray, n: int, search_k: int) -> list[int]:
    """Annoy's n nearest positions (may return fewer: a known Annoy behaviour); search_k -1:
    the build's calibrated one, at least SEARCH_K_PER_CANDIDATE x n (see settings)."""
    assert build.annoy is not None
    if search_k < 0:
        search_k = max(n * SEARCH_K_PER_CANDIDATE, build.manifest.search_k or 0)
    return build.annoy.get_nns_by_vector(build.ann_vector(query), n, search_k=search_k)


def exact_top(
    vectors: np.ndarray, query: np.ndarray, n: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the n best rows of a contiguous matrix, best first; one matvec.

    Rows where `mask` is False never win: their scores become -inf instead of gathering the
    eligible rows (a fancy-index copy of a 10kx2048 matrix costs ~10x the product itself).
    """
    scores = vectors @ query
    if mask is not None:
        n = min(n, int(mask.sum()))
        scores[~mask] = -np.inf
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    rows = _top(scores, n)[:n]
    return rows, scores[rows]


def _search_build(
    build: LoadedIndex,
    query: np.ndarray,
    k: int,
    filters: SearchFilters,
    blocked: np.ndarray,
    search_k: int,
    candidates: int,
) -> tuple[list[tuple[uuid.UUID, float]], SearchStats]:
    """Top-k of the build; `blocked`: sorted unique positions that may not answer (stale in
    the delta, excluded)."""
    mask = build_mask(build, filters) if filters.any_set() else None
    if mask is not None:
        mask[blocked] = False
        eligible = int(mask.sum())
    else:
        eligible = build.size - len(blocked)

    def allowed(positions: np.ndarray) -> np.ndarray:
        if mask is not None:
            return mask[positions]
        if not len(blocked):
            return np.ones(len(positions), dtype=bool)
        return ~np.isin(positions, blocked)

    need = min(k, eligible)
    if need == 0:
        return [], SearchStats()
    chosen = np.empty(0, dtype=np.int64)
    use_annoy = build.annoy is not None and eligible >= EXACT_BELOW_FRACTION * build.size
    if use_annoy:
        # Over-fetch in proportion to what the filters and the delta mask out.
        n = min(build.size, max(candidates, math.ceil(need * OVERFETCH * build.size / eligible)))
        while True:
            found = np.fromiter(
                dict.fromkeys(annoy_candidates(build, query, n, search_k)), dtype=np.int64
            )
            chosen = found[allowed(found)] if len(found) else found
            if len(chosen) >= need or n >= build.size:
                break
            n = min(build.size, n * OVERFETCH)
    fallback = len(chosen) < need
    if fallback:  # exact scan of the eligible part of the build
        if mask is None:
            mask = np.ones(build.size, dtype=bool)
            mask[blocked] = False
        chosen = np.flatnonzero(mask)
    chosen = np.sort(chosen)  # sequential reads of the mmap
    if fallback and len(chosen) == build.size:
        scores = build.vectors.scan(query)
    else:
        scores = build.vectors.scan(query, chosen)
    order = _top(scores, need)
    hits = [(build.ids[int(chosen[i])], float(scores[i])) for i in order]
    stats = SearchStats(annoy_used=use_annoy, fallback=use_annoy and fallback, scored=len(chosen))
    return hits, stats


def _search_delta(
    delta: DeltaView,
    query: np.ndarray,
    k: int,
    filters: SearchFilters,
    excluded: set[uuid.UUID],
) -> list[tuple[uuid.UUID, float]]:
    """Exact top-k of the delta (items changed since the build): one matvec, no row copies."""
    mask = None
    if filters.any_set():
        mask = _filter_mask(delta.categories, delta.prices, filters, delta.predicted_categories)
    rows_out = [delta.positions[i] for i in excluded if i in delta.positions]
    if rows_out:
        mask = np.ones(len(delta.ids), dtype=bool) if mask is None else mask
        mask[rows_out] = False
    rows, scores = exact_top(delta.vectors, query, k, mask)
    return [(delta.ids[int(r)], float(s)) for r, s in zip(rows, scores, strict=True)]


def search(
    build: LoadedIndex | None, delta: DeltaView, request: SearchRequest
) -> tuple[list[tuple[uuid.UUID, float]], SearchStats]:
    """(item_id, cosine) of the k best eligible items of the build and the delta, best first."""
    filters, k = request.filters, request.k
    query = np.ascontiguousarray(request.query, dtype=np.float32)
    excluded = set(request.exclude)
    hits: list[tuple[uuid.UUID, float]] = []
    stats = SearchStats()
    if build is not None and build.size:
        # Stale entries (the delta has their current state) and excluded items.
        out = build.ids.lookup(list(excluded))
        blocked = np.union1d(delta.masked_positions, out[out >= 0])
        hits, stats = _search_build(
            build, query, k, filters, blocked, request.search_k, request.candidates
        )
    if delta.ids:
        hits.extend(_search_delta(delta, query, k, filters, excluded))
    hits.sort(key=lambda hit: -hit[1])
    return [(item_id, max(-1.0, min(1.0, score))) for item_id, score in hits[:k]], stats


def score_items(
    build: LoadedIndex | None,
    delta: DeltaView,
    item_ids: Sequence[uuid.UUID],
    queries: np.ndarray,
) -> np.ndarray:
    """Cosines (len(item_ids), len(queries)) of the given items' served vectors with each
    normalised query row; NaN rows for ids neither the delta nor the build serves.

    Reads only those items' rows (the delta's, else the build's by binary search over its ids),
    never anything in proportion to the build: what re-scores candidates against several
    query vectors (recommend)."""
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    out = np.full((len(item_ids), len(queries)), np.nan, dtype=np.float32)
    rows = [delta.positions.get(i, -1) for i in item_ids]
    in_delta = np.array([r >= 0 for r in rows], dtype=bool)
    if in_delta.any():
        picked = np.array([r for r in rows if r >= 0], dtype=np.int64)
        out[in_delta] = delta.vectors[picked] @ queries.T
    if build is not None and build.size:
        # Stale build entries (changed since the build) are not served.
        rest = [n for n, item_id in enumerate(item_ids) if not in_delta[n]]
        rest = [n for n in rest if item_ids[n] not in delta.changed]
        positions = build.ids.lookup([item_ids[n] for n in rest])
        known = positions >= 0
        if known.any():
            at = np.asarray(rest, dtype=np.int64)[known]
            order = np.argsort(positions[known])  # sequential reads of the mmap
            block = build.vectors[positions[known][order]]
            out[at[order]] = block @ queries.T
    return out


def searchable_count(build: LoadedIndex | None, delta: DeltaView) -> int:
    """Items a query can return now (the build minus its stale entries, plus the delta)."""
    in_build = 0
    if build is not None:
        in_build = build.size - len(np.unique(delta.masked_positions))
    return in_build + len(delta.ids)
