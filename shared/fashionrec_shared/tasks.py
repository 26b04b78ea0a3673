"""Celery queues, task names and typed payloads: the contract between gateway, embedder and indexer.

Tasks are sent by name (`send_task`), so no service imports another's task code. Payloads are
pydantic models dumped to JSON; vectors travel as base64 float32 (see `vectors`).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class Queue(StrEnum):
    # Served by embedder workers (one per GPU or CPU box): everything that runs the model.
    EMBED = "embed"
    # Served by indexer workers: writes to Postgres and index builds.
    INDEX = "index"


class TaskName(StrEnum):
    EMBED_QUERY = "fashionrec.embedder.embed_query"
    EMBED_QUERIES = "fashionrec.embedder.embed_queries"
    EMBED_ITEMS = "fashionrec.embedder.embed_items"
    STORE_EMBEDDINGS = "fashionrec.indexer.store_embeddings"
    BUILD_INDEX = "fashionrec.indexer.build_index"
    MODEL_ONLINE = "fashionrec.indexer.model_online"
    SWEEP_PENDING = "fashionrec.indexer.sweep_pending"


TASK_QUEUES: dict[TaskName, Queue] = {
    TaskName.EMBED_QUERY: Queue.EMBED,
    TaskName.EMBED_QUERIES: Queue.EMBED,
    TaskName.EMBED_ITEMS: Queue.EMBED,
    TaskName.STORE_EMBEDDINGS: Queue.INDEX,
    TaskName.BUILD_INDEX: Queue.INDEX,
    TaskName.MODEL_ONLINE: Queue.INDEX,
    TaskName.SWEEP_PENDING: Queue.INDEX,
}


class ImageRef(BaseModel):
    """An image in object storage; the key is derived from the content hash."""

    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class EmbedQuery(BaseModel):
    image: ImageRef
    # The version the live index serves; a worker that has it loaded uses it (during a model
    # change workers hold the new model and the previous one), otherwise its primary model.
    model_version: str | None = None


class LabelScore(BaseModel):
    label: str
    confidence: float = Field(ge=0.0, le=1.0)


class Predicted(BaseModel):
    """What a trained model's heads say about one image; a plain ImageNet backbone has none."""

    category: LabelScore | None = None
    # attribute type -> the labels whose probability reaches the model's threshold, best first
    attributes: dict[str, list[LabelScore]] = Field(default_factory=dict)


class Colour(BaseModel):
    """One dominant colour of a garment image, computed by the embedder when it embeds it."""

    name: str = Field(description="the palette colour's name (black, navy, red, …)")
    hex: str = Field(pattern=r"^#[0-9a-f]{6}$", description="mean colour of its pixels")
    share: float = Field(ge=0.0, le=1.0, description="its share of the garment's pixels")


class EmbedQueryResult(BaseModel):
    vector: str = Field(description="base64 of little-endian float32, L2-normalised")
    dim: int
    model_version: str
    predicted: Predicted | None = None
    # Dominant colours, largest share first; None from an embedder older than colours.
    colours: list[Colour] | None = None
    cached: bool = False
    timings_ms: dict[str, float] = Field(default_factory=dict)


# Photos per `EMBED_QUERIES` task (a recommendation's liked and disliked photos).
MAX_QUERY_PHOTOS = 8


class EmbedQueries(BaseModel):
    """Several query photos embedded in one model batch, all with the same model version."""

    images: list[ImageRef] = Field(min_length=1, max_length=MAX_QUERY_PHOTOS)
    model_version: str | None = None


class EmbedQueriesResult(BaseModel):
    results: list[EmbedQueryResult] = Field(description="one per image, in request order")


class EmbedItem(BaseModel):
    item_id: str
    image: ImageRef


class EmbedItems(BaseModel):
    job_id: str | None = None
    items: list[EmbedItem]
    # Embed with this loaded model only (re-embed jobs); None: with every loaded model, so items
    # added during a model change are searchable under the old and the new version.
    model_version: str | None = None


class ItemEmbedding(BaseModel):
    item_id: str
    image_sha256: str
    vector: str = Field(description="base64 of little-endian float32, L2-normalised")
    predicted: Predicted | None = None
    colours: list[Colour] | None = None


class ItemFailure(BaseModel):
    item_id: str
    error: str


class StoreEmbeddings(BaseModel):
    job_id: str | None = None
    model_version: str
    dim: int
    embeddings: list[ItemEmbedding] = Field(default_factory=list)
    failures: list[ItemFailure] = Field(default_factory=list)


class BuildIndex(BaseModel):
    reason: str = "manual"
    force: bool = False
    # None: the version the index serves now (the newest stored one before the first build).
    model_version: str | None = None


class ModelOnline(BaseModel):
    """Sent by each embedder worker process once its primary model is loaded."""

    model_version: str
    dim: int
    hostname: str = ""


class SweepPending(BaseModel):
    """Sent by the indexer worker's beat: re-queue items pending too long (bounds: its settings)."""
