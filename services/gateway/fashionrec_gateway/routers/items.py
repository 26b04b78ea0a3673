"""Inventory items: add (async embedding), read, delete, neighbours of a stored item."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import (
    BatchAccepted,
    BatchItemResult,
    ItemAccepted,
    ItemMetadata,
    ItemOut,
    SearchResponse,
    UpsertItem,
    UpsertItems,
)
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError

from fashionrec_gateway.blobs import store_image
from fashionrec_gateway.deps import (
    ApiKeyDep,
    BlobStoreDep,
    IndexerDep,
    MetricsDep,
    SettingsDep,
    WriteLimitDep,
)
from fashionrec_gateway.forms import single_parts
from fashionrec_gateway.metrics import StageTimer
from fashionrec_gateway.responses import problems
from fashionrec_gateway.results import Collapse, Explain, FiltersDep, K, to_response
from fashionrec_gateway.urls import image_url, public_base
from fashionrec_gateway.validation import ValidatedImage, validate_upload

router = APIRouter(prefix="/v1/items", tags=["items"])

METADATA_HELP = (
    'JSON object: {"sku": required, unique per item, "title", "category", "price", "attributes", '
    '"group": the product it is a variant of}'
)


BATCH_METADATA_HELP = (
    "JSON list with one metadata object per `image` part, in the same order "
    '(each {"sku": required, "title", "category", "price", "attributes", "group"})'
)
_JSON_LIST = TypeAdapter(list[Any])


def _metadata_problem(exc: ValidationError, prefix: str = "metadata") -> ProblemError:
    parts = []
    for err in exc.errors():
        # A value deep inside a JSON field (attributes) names its path there, the loc the field.
        where = (err.get("ctx") or {}).get("path") or ".".join(str(p) for p in err["loc"])
        if err["type"] == "json_invalid":
            parts.append(f"{prefix} is not valid JSON ({err['ctx'].get('error', '')})")
        elif err["type"] in ("model_type", "model_attributes_type"):
            parts.append(f"{prefix} must be a JSON object")
        else:
            parts.append(f"{prefix}.{where}: {err['msg']}" if where else err["msg"])
    return ProblemError(422, "Unprocessable Content", "; ".join(parts))


def parse_metadata(raw: str) -> ItemMetadata:
    try:
        return ItemMetadata.model_validate_json(raw)
    except ValidationError as exc:
        raise _metadata_problem(exc) from exc


@router.post(
    "",
    status_code=202,
    response_model=ItemAccepted,
    summary="Add or replace (same sku) an item; its embedding is computed asynchronously",
    responses=problems(401, 404, 413, 415, 422, 429, 502, 503, 504, 507),
    dependencies=[WriteLimitDep, ApiKeyDep, single_parts("image", "metadata")],
)
def add_item(
    image: Annotated[UploadFile, File(description="the item photo")],
    metadata: Annotated[str, Form(description=METADATA_HELP)],
    settings: SettingsDep,
    store: BlobStoreDep,
    indexer: IndexerDep,
    job_id: Annotated[
        str | None, Query(max_length=64, description="attach to a job opened by POST /v1/jobs")
    ] = None,
) -> ItemAccepted:
    # Everything is checked before anything is stored: no orphan blobs for bad requests.
    meta = parse_metadata(metadata)
    checked = validate_upload(image.file, settings.max_upload_bytes, settings.max_image_pixels)
    if job_id is not None:
        indexer.get_job(job_id)  # 404 problem for an unknown job
    ref = store_image(store, "inventory", checked)
    result = indexer.upsert_item(UpsertItem(metadata=meta, image=ref, job_id=job_id))
    return ItemAccepted(item_id=result.item_id, job_id=result.job_id)


@router.post(
    "/batch",
    status_code=207,
    response_model=BatchAccepted,
    summary="Add or replace many items in one request (one job, batched embedding)",
    description=(
        "Multipart: one `image` part per item and one `metadata` field holding a JSON list of "
        "the items' metadata in the same order. Every item is checked like `POST /v1/items`; "
        "a bad item is rejected on its own (nothing of it is stored) and the others go on. "
        "The answer is **207 Multi-Status** with one result per item, in request order: "
        "`status` 202 and its `item_id`, or the item's problem status (413, 415, 422) and "
        "`detail`. A sku that appears twice in one request: the first occurrence is processed, "
        "later ones are rejected with 422. Accepted items join one job (`job_id`, or the one "
        "given as query parameter) and are embedded in batches. Problems of the request as a "
        "whole (metadata not a list, counts differ, too many items, unknown job, storage or "
        "indexer down) are problem+json answers and nothing is stored."
    ),
    responses=problems(401, 404, 413, 422, 429, 502, 503, 504, 507),
    dependencies=[WriteLimitDep, ApiKeyDep, single_parts("metadata")],
)
def add_items_batch(
    request: Request,
    image: Annotated[list[UploadFile], File(description="the item photos, one part per item")],
    metadata: Annotated[str, Form(description=BATCH_METADATA_HELP)],
    settings: SettingsDep,
    store: BlobStoreDep,
    indexer: IndexerDep,
    metrics: MetricsDep,
    job_id: Annotated[
        str | None, Query(max_length=64, description="attach to a job opened by POST /v1/jobs")
    ] = None,
) -> JSONResponse:
    timer = StageTimer(metrics)
    started = getattr(request.state, "started", None)
    if started is not None:
        timer.record("upload", time.perf_counter() - started)
    try:
        raw_items = _JSON_LIST.validate_json(metadata)
    except ValidationError as exc:
        raise ProblemError(
            422, "Unprocessable Content", "metadata must be a JSON list of objects"
        ) from exc
    if len(image) > settings.max_batch_items:
        raise ProblemError(
            413,
            "Content Too Large",
            f"{len(image)} items in one request; the limit is {settings.max_batch_items}",
        )
    if len(raw_items) != len(image):
        raise ProblemError(
            422,
            "Unprocessable Content",
            f"{len(image)} image parts but {len(raw_items)} metadata entries; send one each",
        )
    if job_id is not None:
        indexer.get_job(job_id)  # 404 problem for an unknown job

    results: list[BatchItemResult | None] = [None] * len(image)
    valid: list[tuple[int, ItemMetadata, ValidatedImage]] = []
    first_of: dict[str, int] = {}
    with timer.stage("validate"):
        for n, (raw, upload) in enumerate(zip(raw_items, image, strict=True)):
            sku = raw.get("sku") if isinstance(raw, dict) else None
            try:
                try:
                    meta = ItemMetadata.model_validate(raw)
                except ValidationError as exc:
                    raise _metadata_problem(exc, f"metadata[{n}]") from exc
                if meta.sku in first_of:
                    raise ProblemError(
                        422,
                        "Unprocessable Content",
                        f"sku {meta.sku!r} already appears in this request (item "
                        f"{first_of[meta.sku]}); send each sku once per batch",
                    )
                checked = validate_upload(
                    upload.file, settings.max_upload_bytes, settings.max_image_pixels
                )
            except ProblemError as problem:
                results[n] = BatchItemResult(
                    index=n,
                    sku=sku if isinstance(sku, str) else None,
                    status=problem.status,
                    title=problem.title,
                    detail=problem.detail,
                )
                continue
            first_of[meta.sku] = n
            valid.append((n, meta, checked))
    with timer.stage("store"):
        refs = [store_image(store, "inventory", checked) for _, _, checked in valid]
    accepted_job = job_id
    if valid:
        body = UpsertItems(
            items=[
                UpsertItem(metadata=meta, image=ref)
                for (_, meta, _), ref in zip(valid, refs, strict=True)
            ],
            job_id=job_id,
        )
        with timer.stage("index"):
            upserted = indexer.upsert_items(body)
        accepted_job = upserted.job_id
        for (n, meta, _), result in zip(valid, upserted.results, strict=True):
            results[n] = BatchItemResult(index=n, sku=meta.sku, status=202, item_id=result.item_id)
    done = [r for r in results if r is not None]
    answer = BatchAccepted(
        job_id=accepted_job,
        accepted=len(valid),
        rejected=len(done) - len(valid),
        results=done,
    )
    return JSONResponse(
        answer.model_dump(mode="json"),
        status_code=207,
        headers={"Server-Timing": timer.header()},
    )


@router.get(
    "/{item_id}",
    response_model=ItemOut,
    summary="An item and its indexing status (pending, indexed, failed)",
    responses=problems(404, 502, 503, 504),
)
def get_item(item_id: str, request: Request, settings: SettingsDep, indexer: IndexerDep) -> ItemOut:
    item = indexer.get_item(item_id)
    return ItemOut(
        **item.model_dump(exclude={"image"}),
        image_url=image_url(public_base(request, settings), item.image.key),
    )


@router.delete(
    "/{item_id}",
    status_code=204,
    response_class=Response,
    summary="Remove an item from results at once",
    responses=problems(401, 404, 429, 502, 503, 504),
    dependencies=[WriteLimitDep, ApiKeyDep],
)
def delete_item(item_id: str, indexer: IndexerDep) -> Response:
    indexer.delete_item(item_id)
    return Response(status_code=204)


@router.get(
    "/{item_id}/similar",
    response_model=SearchResponse,
    summary="Neighbours of a stored item (no re-embedding)",
    responses=problems(404, 409, 422, 502, 503, 504),
)
def similar_items(
    item_id: str,
    request: Request,
    settings: SettingsDep,
    indexer: IndexerDep,
    filters: FiltersDep,
    k: K = 5,
    collapse: Collapse = True,
    explain: Explain = True,
) -> SearchResponse:
    found = indexer.similar(item_id, k, filters, collapse=collapse, explain=explain)
    return to_response(found, public_base(request, settings))
