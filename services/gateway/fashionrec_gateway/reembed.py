"""Running a query with the model version the indexer serves, re-embedding after its 409.

Search and recommend embed photos with the version last seen in the indexer's answers
(`ServingVersion`); when the index serves another one (a model change was swapped in, or this
process has not seen an answer yet) the indexer answers 409 naming it, and the query is embedded
again with that version: once, unless the served version moved again meanwhile (a swap during
this request).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fashionrec_gateway.embedding import ServingVersion
from fashionrec_gateway.indexer_client import IndexerConflict
from fashionrec_gateway.metrics import GatewayMetrics

T = TypeVar("T")

# Re-embeds after a 409: one for a changed model version, a second only if the served version
# changed again during the request.
MAX_REEMBEDS = 2


def with_served_version(
    serving: ServingVersion, metrics: GatewayMetrics, run: Callable[[str | None], T]
) -> T:
    """`run(version)` with the served version (None: unknown yet, the embedder's choice),
    again with the version a 409 names; the last IndexerConflict is raised."""
    version, named = serving.value, None
    for attempt in range(MAX_REEMBEDS + 1):
        try:
            return run(version)
        except IndexerConflict as conflict:
            if conflict.model_version is None:
                raise  # not a version change (an example item has no embedding yet, say)
            serving.update(conflict.model_version)
            if attempt == MAX_REEMBEDS or (attempt > 0 and conflict.model_version == named):
                raise
            named = version = conflict.model_version
            metrics.reembeds.inc()
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
