"""Inventory items: add (async embedding), read, delete, neighbours of a stored item."""

from __future__ import annotations

from typing import Annotated

from fashionrec_shared.problems import ProblemError
from fashionrec_shared.schemas import (
    ItemAccepted,
    ItemMetadata,
    ItemOut,
    SearchResponse,
    UpsertItem,
)
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from pydantic import ValidationError

from fashionrec_gateway.blobs import store_image
from fashionrec_gateway.deps import ApiKeyDep, BlobStoreDep, IndexerDep, SettingsDep
from fashionrec_gateway.responses import problems
from fashionrec_gateway.results import Category, K, Price, make_filters, to_response
from fashionrec_gateway.urls import image_url, public_base
from fashionrec_gateway.validation import validate_upload

router = APIRouter(prefix="/v1/items", tags=["items"])

METADATA_HELP = (
    'JSON object: {"sku": required, unique per item, "title", "category", "price", "attributes"}'
)


def parse_metadata(raw: str) -> ItemMetadata:
    try:
        return ItemMetadata.model_validate_json(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "json_invalid":
                parts.append(f"metadata is not valid JSON ({err['ctx'].get('error', '')})")
            elif err["type"] == "model_type":
                parts.append("metadata must be a JSON object")
            else:
                parts.append(f"metadata.{where}: {err['msg']}" if where else err["msg"])
        raise ProblemError(422, "Unprocessable Content", "; ".join(parts)) from exc


@router.post(
    "",
    status_code=202,
    response_model=ItemAccepted,
    summary="Add or replace (same sku) an item; its embedding is computed asynchronously",
    responses=problems(401, 404, 413, 415, 422, 502, 503),
    dependencies=[ApiKeyDep],
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


@router.get(
    "/{item_id}",
    response_model=ItemOut,
    summary="An item and its indexing status (pending, indexed, failed)",
    responses=problems(404, 502, 503),
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
    responses=problems(401, 404, 502, 503),
    dependencies=[ApiKeyDep],
)
def delete_item(item_id: str, indexer: IndexerDep) -> Response:
    indexer.delete_item(item_id)
    return Response(status_code=204)


@router.get(
    "/{item_id}/similar",
    response_model=SearchResponse,
    summary="Neighbours of a stored item (no re-embedding)",
    responses=problems(404, 409, 422, 502, 503),
)
def similar_items(
    item_id: str,
    request: Request,
    settings: SettingsDep,
    indexer: IndexerDep,
    k: K = 5,
    category: Category = None,
    min_price: Price = None,
    max_price: Price = None,
) -> SearchResponse:
    filters = make_filters(category, min_price, max_price)
    found = indexer.similar(item_id, k, filters)
    return to_response(found, public_base(request, settings))
