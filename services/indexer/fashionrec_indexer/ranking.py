"""A query's result list: over-fetched candidates, their metadata, `min_score`, one per group.

Collapsing variants (items naming the same `group`; an item without one is its own group)
keeps the best-scoring item of each group, so it needs more candidates than results: the
candidates are fetched `OVERFETCH` x k at a time, growing by that factor while collapsing
leaves fewer than k and more candidates exist, up to `max_candidates` (a bound that keeps the
cost independent of the inventory: a catalogue of a few huge groups answers fewer than k).
Every candidate's metadata is read once, in one query per round.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from fashionrec_indexer import repository as repo

OVERFETCH = 4

Hits = list[tuple[uuid.UUID, float]]
# n -> (the best n candidates at most, best first; whether more may exist)
Fetch = Callable[[int], tuple[Hits, bool]]


@dataclass(frozen=True)
class Ranked:
    hits: Hits  # at most k, best first
    rows: dict[uuid.UUID, Any]  # repository.hits_metadata rows of every candidate looked at


def group_of(item_id: uuid.UUID, row: Any) -> tuple[str, Any]:
    """The item's group key (an item without a group is its own group)."""
    return ("group", row.variant_group) if row.variant_group is not None else ("item", item_id)


def collapse_variants(hits: Hits, rows: Mapping[uuid.UUID, Any]) -> Hits:
    """The first (best) hit of each group, in order; hits without metadata are left out."""
    seen: set[tuple[str, Any]] = set()
    kept: Hits = []
    for item_id, score in hits:
        row = rows.get(item_id)
        if row is None:
            continue
        key = group_of(item_id, row)
        if key not in seen:
            seen.add(key)
            kept.append((item_id, score))
    return kept


def first_fetch(k: int, collapse: bool) -> int:
    return k * OVERFETCH if collapse else k


def rank(
    conn: Connection,
    fetch: Fetch,
    k: int,
    model_version: str,
    *,
    collapse: bool,
    min_score: float | None = None,
    start: int | None = None,
    max_candidates: int = 1000,
    lap: Callable[[str], None] | None = None,
) -> Ranked:
    """The k best hits of `fetch` with their metadata, scores below `min_score` dropped and
    (with `collapse`) one per group; `start`: the first round's size (default k, OVERFETCH x k
    when collapsing). `lap(stage)` is called after each fetch ("ann") and metadata query
    ("metadata"): a Stopwatch's."""
    n = max(k, min(max_candidates, start or first_fetch(k, collapse)))
    rows: dict[uuid.UUID, Any] = {}
    looked: set[uuid.UUID] = set()
    while True:
        ranked, more = fetch(n)
        if lap is not None:
            lap("ann")
        new = [item_id for item_id, _ in ranked if item_id not in looked]
        looked.update(new)
        rows.update(repo.hits_metadata(conn, new, model_version))
        if lap is not None:
            lap("metadata")
        kept = [
            (item_id, score)
            for item_id, score in ranked
            if item_id in rows and (min_score is None or score >= min_score)
        ]
        if collapse:
            kept = collapse_variants(kept, rows)
        if not collapse or len(kept) >= k or not more or n >= max_candidates:
            break
        if min_score is not None and ranked and ranked[-1][1] < min_score:
            break  # later candidates score lower still
        n = min(max_candidates, n * OVERFETCH)
    return Ranked(kept[:k], rows)
