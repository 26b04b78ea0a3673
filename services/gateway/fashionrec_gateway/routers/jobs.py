"""Ingest jobs: item uploads attach to a job, whose progress the indexer keeps."""

from __future__ import annotations

from typing import Annotated

from fashionrec_shared.schemas import JobCreate, JobOut
from fastapi import APIRouter, Body

from fashionrec_gateway.deps import ApiKeyDep, IndexerDep, WriteLimitDep
from fashionrec_gateway.responses import problems

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Open a job that later uploads (POST /v1/items?job_id=...) attach to",
    responses=problems(401, 422, 429, 502, 503, 504),
    dependencies=[WriteLimitDep, ApiKeyDep],
)
def create_job(indexer: IndexerDep, job: Annotated[JobCreate | None, Body()] = None) -> JobOut:
    return indexer.create_job(job or JobCreate())


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Progress of a job",
    responses=problems(404, 502, 503, 504),
)
def get_job(job_id: str, indexer: IndexerDep) -> JobOut:
    return indexer.get_job(job_id)
