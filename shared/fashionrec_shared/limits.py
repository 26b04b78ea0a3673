"""Limits that are part of a contract between services or processes (one definition each)."""

from __future__ import annotations

# Pixels (width x height, read from the header before decoding) above which an image is refused
# as a possible decompression bomb. The gateway checks every upload, the embedder re-checks every
# blob it decodes; with the same default an upload the gateway accepted is never refused later.
MAX_IMAGE_PIXELS = 40_000_000

# Seconds a writer's transaction may take to commit (see the indexer's
# `repository.settled_change_seq`). The index builder (worker) records only changes older than
# this as included in a build, and the API re-checks everything newer: both must agree on it.
SETTLE_S = 30.0
