"""Redis key names that more than one service (or the health probe) reads or writes.

Every key a service only uses internally stays in that service; the ones here are contracts.
"""

from __future__ import annotations

# Each embedder worker process refreshes `<EMBEDDER_ALIVE_PREFIX>:<host>:<pid>` with its
# `schemas.EmbedderInfo` as JSON, expiring after EMBEDDER_ALIVE_TTL_S: a key exists exactly while
# its process is alive and serving. The gateway's /readyz and GET /v1/index and the container
# health probe (deploy/healthcheck.py) read them.
EMBEDDER_ALIVE_PREFIX = "fashionrec:embedder:alive"
EMBEDDER_ALIVE_TTL_S = 30
# Every embedder heartbeat (SCAN MATCH pattern).
EMBEDDER_ALIVE_PATTERN = f"{EMBEDDER_ALIVE_PREFIX}:*"

# Deliveries of one Celery task id, counted by every worker (`task_base.PolicyTask`); a day is
# far longer than any message stays queued.
DELIVERIES_PREFIX = "fashionrec:deliveries"
DELIVERIES_TTL_S = 24 * 3600


def embedder_alive_key(hostname: str, pid: int) -> str:
    """The heartbeat key of one embedder process."""
    return f"{EMBEDDER_ALIVE_PREFIX}:{hostname}:{pid}"


def embedder_alive_pattern(hostname: str) -> str:
    """The heartbeats of the embedder processes on one host (SCAN MATCH pattern)."""
    return f"{EMBEDDER_ALIVE_PREFIX}:{hostname}:*"


def deliveries_key(task_id: str) -> str:
    return f"{DELIVERIES_PREFIX}:{task_id}"
