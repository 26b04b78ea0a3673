"""Jobs: open one that uploads attach to, and read its progress (derived from its entries)."""

from __future__ import annotations

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import JobCreate, JobOut
from fastapi import APIRouter

from fashionrec_indexer import repository as repo
from fashionrec_indexer.deps import EngineDep

router = APIRouter()


@router.post("/jobs", response_model=JobOut, status_code=201)
def create_job(body: JobCreate, engine: EngineDep) -> JobOut:
    with engine.begin() as conn:
        job_id = repo.create_job(conn, body.kind)
        summary = repo.job_summary(conn, job_id)
    return JobOut.model_validate(summary)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, engine: EngineDep) -> JobOut:
    job_uuid = repo.parse_uuid(job_id)
    summary = None
    if job_uuid is not None:
        with engine.connect() as conn:
            summary = repo.job_summary(conn, job_uuid)
    if summary is None:
        raise ProblemError(404, "Not Found", f"no job {job_id!r}")
    return JobOut.model_validate(summary)
