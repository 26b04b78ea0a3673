"""HTTP schemas: the public API (gateway) and the internal indexer API the gateway calls.

The public shapes follow the contract in the design notes; the indexer's carry object keys
instead of URLs (only the gateway knows how images are served).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fashionrec_shared.tasks import MAX_QUERY_PHOTOS, Colour, ImageRef, Predicted

ItemStatus = Literal["pending", "indexed", "failed"]
JobStatus = Literal["queued", "running", "completed", "failed"]

MAX_K = 50
# Items per `POST /v1/items/batch` (and the indexer's bulk upsert).
MAX_BATCH_ITEMS = 256
# `POST /v1/recommend`: liked + disliked examples (photos and item ids), photos among them (one
# embedder batch), and items in `exclude`.
MAX_RECOMMEND_EXAMPLES = 32
MAX_RECOMMEND_PHOTOS = MAX_QUERY_PHOTOS
MAX_EXCLUDE = 1000

RecommendStrategy = Literal["average", "best_score"]


# ---- values Postgres can store -------------------------------------------------------------
# Postgres text and JSONB hold no U+0000, UTF-8 has no lone surrogates, and JSON (so JSONB) no
# NaN or Infinity: such a value fails inside the indexer's INSERT (a 500), so the payload
# schemas refuse it (a 422 naming the field) before it travels.

_UNSTORABLE_CHARS = re.compile(r"[\x00\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
UNSTORABLE = "value_not_storable"


def _text_problem(value: str) -> str | None:
    found = _UNSTORABLE_CHARS.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains a NUL character (U+0000), which cannot be stored"
    return "contains a lone surrogate (U+D800-U+DFFF), which is not valid Unicode"


def _not_storable(reason: str, path: str | None = None) -> PydanticCustomError:
    # `path`: where inside a JSON field (`attributes.colour[0]`); the error's loc is the field.
    return PydanticCustomError(UNSTORABLE, reason, {"path": path} if path else {})


def storable_text(value: str) -> str:
    """A string Postgres can store (text or JSONB)."""
    reason = _text_problem(value)
    if reason is not None:
        raise _not_storable(reason)
    return value


def _key_path(parent: str, key: str) -> str:
    if _PLAIN_KEY.match(key):
        return f"{parent}.{key}"
    return f"{parent}[{json.dumps(key)}]"  # escaped: a NUL in a key is shown as \u0000


def check_storable_json(value: Any, path: str) -> None:
    """Raises (a pydantic error naming the JSON path) unless every string, key and number at
    any depth of `value` can be stored in JSONB."""
    if isinstance(value, str):
        reason = _text_problem(value)
        if reason is not None:
            raise _not_storable(reason, path)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _not_storable("is not a finite number (NaN and Infinity cannot be stored)", path)
    elif isinstance(value, dict):
        for key, item in value.items():
            where = _key_path(path, str(key))
            reason = _text_problem(str(key))
            if reason is not None:
                raise _not_storable(f"key {reason}", where)
            check_storable_json(item, where)
    elif isinstance(value, list | tuple):
        for n, item in enumerate(value):
            check_storable_json(item, f"{path}[{n}]")


StoredText = Annotated[str, AfterValidator(storable_text)]


class ItemMetadata(BaseModel):
    """What a client sends with an item image (`metadata` form field, JSON). Every string, at
    any depth of `attributes` too, must be storable (no NUL, no lone surrogate)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    sku: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f]+$")
    title: StoredText | None = Field(default=None, max_length=500)
    category: StoredText | None = Field(default=None, max_length=128)
    price: float | None = Field(default=None, ge=0, le=1e9)
    attributes: dict[str, Any] = Field(default_factory=dict)
    group: StoredText | None = Field(
        default=None,
        max_length=128,
        description="the product this item is a variant of (colourway, size): results show one "
        "item per group unless collapse=false",
    )

    @field_validator("attributes")
    @classmethod
    def _storable_attributes(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_storable_json(value, "attributes")
        return value


class SearchFilters(BaseModel):
    # Compared in SQL: a NUL would fail the query like it fails an INSERT.
    category: StoredText | None = None
    min_price: float | None = Field(default=None, ge=0)
    max_price: float | None = Field(default=None, ge=0)
    # The category the served model predicted for the item image; items without one drop out.
    predicted_category: StoredText | None = None

    def any_set(self) -> bool:
        """Whether any filter is set."""
        return any(value is not None for value in self.model_dump().values())


PREDICTED_HELP = (
    "the served model's predictions for the image (category, attributes above its threshold, "
    "best first, with confidences in [0, 1]); null for a model without prediction heads"
)


# ---- public API ---------------------------------------------------------------------------


class Problem(BaseModel):
    """An error answer of either HTTP service (RFC 9457, `application/problem+json`)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class Reasons(BaseModel):
    """What a result shares with the query, in garment terms (`explain=false` leaves it out).

    For a recommendation the query is the liked example the result is closest to (`like`)."""

    score: float = Field(description="the result's score")
    like: int | None = Field(
        default=None,
        description="recommend only: the liked example the result is closest to (0-based: "
        "liked photos in request order, then liked item ids)",
    )
    category: str | None = Field(
        default=None, description="the predicted category both have (a trained model's heads)"
    )
    attributes: dict[str, list[str]] = Field(
        default_factory=dict, description="predicted attribute labels both have, by type"
    )
    colours: list[str] = Field(
        default_factory=list, description="dominant colours (palette names) both have"
    )


REASONS_HELP = "what the result shares with the query; null with explain=false"


class SearchResult(BaseModel):
    item_id: str
    sku: str
    title: str | None
    category: str | None
    price: float | None
    score: float = Field(description="cosine similarity in [-1, 1], highest first")
    image_url: str
    predicted: Predicted | None = Field(default=None, description=PREDICTED_HELP)
    group: str | None = None
    colours: list[Colour] | None = Field(default=None, description="the image's dominant colours")
    reasons: Reasons | None = Field(default=None, description=REASONS_HELP)


class SearchResponse(BaseModel):
    results: list[SearchResult]
    model_version: str
    index_version: str | None
    predicted: Predicted | None = Field(
        default=None,
        description="the query photo's predictions (POST /v1/search only); null for a model "
        "without prediction heads",
    )


class ItemAccepted(BaseModel):
    item_id: str
    job_id: str


class BatchItemResult(BaseModel):
    """One item of `POST /v1/items/batch`, in request order.

    `status` 202: accepted (item_id set); otherwise the item's problem (status, detail) and
    nothing of it was stored.
    """

    index: int = Field(description="position of the item in the request (0-based)")
    sku: str | None = None
    status: int = Field(description="202 accepted, or the item's problem status (413, 415, 422)")
    item_id: str | None = None
    title: str | None = Field(default=None, description="problem title when rejected")
    detail: str | None = Field(default=None, description="why the item was rejected")


class BatchAccepted(BaseModel):
    """207 answer of `POST /v1/items/batch`: per-item outcomes, one job for the whole batch."""

    job_id: str | None = Field(description="the job accepted items are attached to")
    accepted: int
    rejected: int
    results: list[BatchItemResult]


class ItemOut(BaseModel):
    item_id: str
    sku: str
    title: str | None
    category: str | None
    price: float | None
    attributes: dict[str, Any]
    status: ItemStatus
    error: str | None = None
    image_url: str
    model_version: str | None = None
    predicted: Predicted | None = Field(default=None, description=PREDICTED_HELP)
    group: str | None = None
    colours: list[Colour] | None = Field(default=None, description="the image's dominant colours")
    created_at: datetime
    updated_at: datetime


class JobError(BaseModel):
    item_id: str | None = None
    sku: str | None = None
    error: str


class JobOut(BaseModel):
    job_id: str
    kind: str
    status: JobStatus
    total: int
    done: int
    failed: int
    errors: list[JobError] = Field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None


class JobCreate(BaseModel):
    """Opens a job that later uploads attach to (`POST /v1/items?job_id=…`), e.g. one ingest."""

    kind: str = Field(default="ingest", pattern=r"^[a-z][a-z0-9_-]{0,31}$")


# ---- indexer API (internal) -----------------------------------------------------------------


class UpsertItem(BaseModel):
    metadata: ItemMetadata
    image: ImageRef
    # In `UpsertItems` the batch's job_id counts; this one is ignored there.
    job_id: str | None = None


class UpsertItemResult(BaseModel):
    item_id: str
    job_id: str
    created: bool
    embed_queued: bool


class UpsertItems(BaseModel):
    """Many items in one call: one transaction, one job, embedding tasks of many images each."""

    items: list[UpsertItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)
    job_id: str | None = None


class UpsertItemsResult(BaseModel):
    job_id: str
    results: list[UpsertItemResult]
    embed_tasks: int = 0


class IndexerItem(BaseModel):
    item_id: str
    sku: str
    title: str | None
    category: str | None
    price: float | None
    attributes: dict[str, Any]
    status: ItemStatus
    error: str | None = None
    image: ImageRef
    model_version: str | None = None
    predicted: Predicted | None = Field(default=None, description=PREDICTED_HELP)
    group: str | None = None
    colours: list[Colour] | None = None
    created_at: datetime
    updated_at: datetime


class VectorQuery(BaseModel):
    vector: str = Field(description="base64 little-endian float32, as sent by the embedder")
    model_version: str
    k: int = Field(default=5, ge=1, le=MAX_K)
    filters: SearchFilters = Field(default_factory=SearchFilters)
    collapse: bool = True
    explain: bool = True
    # The photo's predictions and colours, for the results' reasons.
    predicted: Predicted | None = None
    colours: list[Colour] | None = None


class QueryExample(BaseModel):
    """A photo the gateway had embedded (a recommendation's liked or disliked example)."""

    vector: str = Field(description="base64 little-endian float32, as sent by the embedder")
    predicted: Predicted | None = None
    colours: list[Colour] | None = None


class RecommendQuery(BaseModel):
    """The indexer's `POST /recommend`: liked and disliked photos (embedded) and item ids.

    `average`: one query vector, the mean of the liked minus `negative_weight` x the mean of the
    disliked, normalised. `best_score`: each candidate scores its best cosine to any liked
    example, less `negative_weight` x how much closer it is to its closest disliked one
    (max(0, best_disliked - best_liked)). Example items never answer, nor do `exclude`d ones.
    """

    model_version: str
    liked: list[QueryExample] = Field(default_factory=list, max_length=MAX_RECOMMEND_PHOTOS)
    disliked: list[QueryExample] = Field(default_factory=list, max_length=MAX_RECOMMEND_PHOTOS)
    liked_items: list[str] = Field(default_factory=list, max_length=MAX_RECOMMEND_EXAMPLES)
    disliked_items: list[str] = Field(default_factory=list, max_length=MAX_RECOMMEND_EXAMPLES)
    strategy: RecommendStrategy = "average"
    negative_weight: float = Field(default=0.5, ge=0.0, le=2.0)
    k: int = Field(default=5, ge=1, le=MAX_K)
    filters: SearchFilters = Field(default_factory=SearchFilters)
    exclude: list[str] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    min_score: float | None = Field(default=None, ge=-1.0, le=1.0)
    collapse: bool = True
    explain: bool = True

    @model_validator(mode="after")
    def _examples(self) -> RecommendQuery:
        if not self.liked and not self.liked_items:
            raise ValueError("at least one liked example (a photo or an item id) is needed")
        total = (
            len(self.liked) + len(self.disliked) + len(self.liked_items) + len(self.disliked_items)
        )
        if total > MAX_RECOMMEND_EXAMPLES:
            raise ValueError(f"{total} examples, at most {MAX_RECOMMEND_EXAMPLES} are allowed")
        return self


class IndexerHit(BaseModel):
    item_id: str
    sku: str
    title: str | None
    category: str | None
    price: float | None
    score: float
    image: ImageRef
    predicted: Predicted | None = None
    group: str | None = None
    colours: list[Colour] | None = None
    reasons: Reasons | None = None


class IndexerSearchResponse(BaseModel):
    results: list[IndexerHit]
    model_version: str
    index_version: str | None


class IndexInfo(BaseModel):
    index_version: str | None
    model_version: str | None = Field(description="the version searches are served with")
    items_in_index: int
    items_since_build: int
    built_at: datetime | None = None
    # Set while a model change re-embeds the inventory; the old version serves until it is done.
    pending_model_version: str | None = None
    reembed_job_id: str | None = None


class EmbedderInfo(BaseModel):
    """An embedder process's heartbeat (`fashionrec:embedder:alive:<host>:<pid>`), or the
    `processes` that serve the same (model_version, backbone, weights, runtime, precision).
    Fields after `model_versions` are newer: older embedders leave them out (null)."""

    model_version: str = Field(description="the primary model's version")
    dim: int = Field(description="embedding dimension of the primary model")
    device: str | None = Field(
        default=None,
        description="cpu, cuda, …; a group of processes on different devices lists each, "
        "comma-separated",
    )
    model_versions: list[str] = Field(
        default_factory=list,
        description="every loaded version, the primary first (in a group: any process's)",
    )
    backbone: str | None = None
    weights: str | None = None
    runtime: str | None = None
    precision: str | None = None
    pooling: str | None = Field(
        default=None, description="global or regional (a plain backbone); global for a trained one"
    )
    processes: int = Field(default=1, ge=1, description="embedder processes in this group")


class IndexStatus(IndexInfo):
    """GET /v1/index: the indexer's IndexInfo plus the embedders that are alive."""

    embedders: list[EmbedderInfo] | None = Field(
        default=None,
        description="alive embedder processes, one entry per (model_version, backbone, "
        "weights, runtime, precision), most processes first; null when the heartbeat store "
        "(Redis) cannot be read",
    )


class RebuildAccepted(BaseModel):
    task_id: str
