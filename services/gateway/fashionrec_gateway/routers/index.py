"""GET /v1/index: what the index serves, the model change under way (if any), and the embedder
processes that are alive (from their heartbeats)."""

from __future__ import annotations

import logging

import redis
from fashionrec_shared.schemas import EmbedderInfo, IndexStatus
from fastapi import APIRouter

from fashionrec_gateway.deps import IndexerDep, RedisDep, ServingVersionDep
from fashionrec_gateway.embedders import read_embedders
from fashionrec_gateway.responses import problems

router = APIRouter(prefix="/v1", tags=["index"])
log = logging.getLogger("fashionrec.gateway.index")


def _embedders(client: redis.Redis) -> list[EmbedderInfo] | None:
    """The alive embedders; None when Redis cannot be read (the index part still answers)."""
    try:
        return read_embedders(client)
    except redis.RedisError as exc:
        log.warning("embedder heartbeats unreadable: %s", exc)
        return None


@router.get(
    "/index",
    response_model=IndexStatus,
    summary="The served index and model version; during a model change the re-embed job "
    "(follow it with GET /v1/jobs/{reembed_job_id}); the embedders alive and what they run",
    responses=problems(502, 503, 504),
)
def index_info(indexer: IndexerDep, serving: ServingVersionDep, client: RedisDep) -> IndexStatus:
    info = indexer.index_info()
    serving.update(info.model_version)
    return IndexStatus(**info.model_dump(), embedders=_embedders(client))
