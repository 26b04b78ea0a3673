"""Rows of the repository as the HTTP contract's models (fashionrec_shared.schemas)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from fashionrec_shared.schemas import IndexerHit, IndexerItem, Reasons
from fashionrec_shared.tasks import Colour, ImageRef, Predicted
from pydantic import TypeAdapter, ValidationError

log = logging.getLogger("fashionrec.indexer.responses")
_COLOURS = TypeAdapter(list[Colour])


def stored_predictions(raw: Any) -> Predicted | None:
    """Stored predictions (JSONB) as the contract's model; unreadable ones count as none."""
    if raw is None:
        return None
    try:
        return Predicted.model_validate(raw)
    except ValidationError:
        log.warning("ignoring unreadable stored predictions: %.200r", raw)
        return None


def stored_colours(raw: Any) -> list[Colour] | None:
    """Stored colours (JSONB) as the contract's models; unreadable ones count as none."""
    if raw is None:
        return None
    try:
        return _COLOURS.validate_python(raw)
    except ValidationError:
        log.warning("ignoring unreadable stored colours: %.200r", raw)
        return None


def item_out(row: Any) -> IndexerItem:
    """An item row of repository.get_item."""
    return IndexerItem(
        item_id=str(row.id),
        sku=row.sku,
        title=row.title,
        category=row.category,
        price=row.price,
        attributes=row.attributes or {},
        status=row.status,
        error=row.error,
        image=ImageRef(key=row.image_key, sha256=row.image_sha256),
        model_version=row.model_version,
        predicted=stored_predictions(row.predicted),
        group=row.variant_group,
        colours=stored_colours(row.colours),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def hits_out(
    hits: list[tuple[uuid.UUID, float]],
    rows: Mapping[uuid.UUID, Any],
    reasons: Mapping[uuid.UUID, Reasons] | None = None,
) -> list[IndexerHit]:
    """Search hits with their metadata (repository.hits_metadata) and `reasons` (None: none),
    best first; hits deleted between the delta probe and the metadata query are left out."""
    return [
        IndexerHit(
            item_id=str(item_id),
            sku=rows[item_id].sku,
            title=rows[item_id].title,
            category=rows[item_id].category,
            price=rows[item_id].price,
            score=score,
            image=ImageRef(key=rows[item_id].image_key, sha256=rows[item_id].image_sha256),
            predicted=stored_predictions(rows[item_id].predicted),
            group=rows[item_id].variant_group,
            colours=stored_colours(rows[item_id].colours),
            reasons=reasons.get(item_id) if reasons is not None else None,
        )
        for item_id, score in hits
        if item_id in rows
    ]
