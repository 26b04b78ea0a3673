"""Indexer fixtures: a migrated database, an engine, a local blob store and item helpers."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fashionrec_indexer import repository as repo
from fashionrec_indexer.db import make_engine, migrate
from fashionrec_indexer.ingest import store_embeddings
from fashionrec_shared.schemas import ItemMetadata
from fashionrec_shared.storage import LocalBlobStore
from fashionrec_shared.tasks import Colour, ImageRef, ItemEmbedding, Predicted, StoreEmbeddings
from fashionrec_shared.vectors import encode_vector
from sqlalchemy import Engine

DIM = 16
MODEL = "test-model-v1"
# Scores of build items come from vectors.npy, stored as float16 by default (VECTOR_DTYPE):
# within ~1e-4 of the float32 cosine.
SCORE_ATOL = 1e-3


@pytest.fixture
def migrated_url(database_url: str) -> str:
    migrate(database_url, timeout_s=10)
    return database_url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def random_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def image_for(tag: str) -> ImageRef:
    sha = hashlib.sha256(tag.encode()).hexdigest()
    return ImageRef(key=f"inventory/{sha}.jpg", sha256=sha)


def upsert(
    engine: Engine,
    sku: str,
    image_tag: str | None = None,
    *,
    category: str | None = None,
    price: float | None = None,
    job_id: uuid.UUID | None = None,
    group: str | None = None,
) -> tuple[uuid.UUID, ImageRef]:
    image = image_for(image_tag or sku)
    with engine.begin() as conn:
        model = repo.active_model_version(conn)
        result = repo.upsert_item(
            conn,
            ItemMetadata(
                sku=sku, title=f"title {sku}", category=category, price=price, group=group
            ),
            image,
            model,
        )
        if job_id is not None:
            status = "done" if result.status == "indexed" else "queued"
            repo.add_job_item(conn, job_id, result.item_id, status)
    return result.item_id, image


def embed(
    engine: Engine,
    item_id: uuid.UUID,
    image: ImageRef,
    vector: np.ndarray,
    job_id: uuid.UUID | None = None,
    model: str = MODEL,
    predicted: Predicted | None = None,
    colours: list[Colour] | None = None,
) -> None:
    store_embeddings(
        engine,
        StoreEmbeddings(
            job_id=str(job_id) if job_id else None,
            model_version=model,
            dim=vector.shape[0],
            embeddings=[
                ItemEmbedding(
                    item_id=str(item_id),
                    image_sha256=image.sha256,
                    vector=encode_vector(vector),
                    predicted=predicted,
                    colours=colours,
                )
            ],
        ),
    )


def add_item(
    engine: Engine,
    sku: str,
    vector: np.ndarray,
    *,
    category: str | None = None,
    price: float | None = None,
    predicted: Predicted | None = None,
    group: str | None = None,
    colours: list[Colour] | None = None,
) -> uuid.UUID:
    """An item with its embedding stored (indexed), with the model's predictions and the
    image's colours if given."""
    item_id, image = upsert(engine, sku, category=category, price=price, group=group)
    embed(engine, item_id, image, vector, predicted=predicted, colours=colours)
    return item_id


def colours(*names: str) -> list[Colour]:
    """Dominant colours by palette name, largest share first."""
    share = 1.0 / max(1, len(names))
    return [Colour(name=name, hex="#000000", share=share) for name in names]


def predicted(category: str | None, confidence: float = 0.9, **attributes: str) -> Predicted:
    """Predictions of a model with heads: a category and one label per attribute type."""
    return Predicted.model_validate(
        {
            "category": None if category is None else {"label": category, "confidence": confidence},
            "attributes": {k: [{"label": v, "confidence": 0.5}] for k, v in attributes.items()},
        }
    )
