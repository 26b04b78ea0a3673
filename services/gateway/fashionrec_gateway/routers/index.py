"""GET /v1/index: what the index serves, and the model change under way (if any)."""

from __future__ import annotations

from fashionrec_shared.schemas import IndexInfo
from fastapi import APIRouter

from fashionrec_gateway.deps import IndexerDep, ServingVersionDep
from fashionrec_gateway.responses import problems

router = APIRouter(prefix="/v1", tags=["index"])


@router.get(
    "/index",
    response_model=IndexInfo,
    summary="The served index and model version; during a model change the re-embed job "
    "(follow it with GET /v1/jobs/{reembed_job_id})",
    responses=problems(502, 503),
)
def index_info(indexer: IndexerDep, serving: ServingVersionDep) -> IndexInfo:
    info = indexer.index_info()
    serving.update(info.model_version)
    return info
