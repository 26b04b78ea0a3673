"""Why a result matches its query, in garment terms: what the two share (`Reasons`).

The query's side is what the caller knows of it: the photo's predictions and colours sent by the
gateway (POST /search), the stored item's (similar), or the liked example the result is closest
to (recommend). Both sides' predictions come from the served model version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fashionrec_shared.schemas import Reasons
from fashionrec_shared.tasks import Colour, Predicted


@dataclass(frozen=True)
class QuerySide:
    """What is known of a query (or a liked example): its predictions and dominant colours."""

    predicted: Predicted | None = None
    colours: Sequence[Colour] | None = None


def shared_category(hit: Predicted | None, query: Predicted | None) -> str | None:
    if hit is None or query is None or hit.category is None or query.category is None:
        return None
    return hit.category.label if hit.category.label == query.category.label else None


def shared_attributes(hit: Predicted | None, query: Predicted | None) -> dict[str, list[str]]:
    """Attribute labels both predict, by type, in the hit's order (best first)."""
    if hit is None or query is None:
        return {}
    shared: dict[str, list[str]] = {}
    for kind, labels in hit.attributes.items():
        theirs = {label.label for label in query.attributes.get(kind, [])}
        both = list(dict.fromkeys(label.label for label in labels if label.label in theirs))
        if both:
            shared[kind] = both
    return shared


def shared_colours(hit: Sequence[Colour] | None, query: Sequence[Colour] | None) -> list[str]:
    """Colour names both have among their dominant colours, in the hit's order (largest first)."""
    if not hit or not query:
        return []
    theirs = {colour.name for colour in query}
    return list(dict.fromkeys(colour.name for colour in hit if colour.name in theirs))


def reasons_for(score: float, hit: QuerySide, query: QuerySide, like: int | None = None) -> Reasons:
    """What `hit` shares with `query`; `like`: the liked example `query` is (recommend)."""
    return Reasons(
        score=score,
        like=like,
        category=shared_category(hit.predicted, query.predicted),
        attributes=shared_attributes(hit.predicted, query.predicted),
        colours=shared_colours(hit.colours, query.colours),
    )
