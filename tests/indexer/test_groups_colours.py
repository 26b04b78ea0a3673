"""Migration 0005: items' variant group and the dominant colours of their current image, stored
by upserts and STORE_EMBEDDINGS (for the current image only) and returned with items and hits."""

from __future__ import annotations

import uuid

from alembic import command
from fashionrec_indexer import repository as repo
from fashionrec_indexer.db import alembic_config, make_engine
from fashionrec_indexer.ingest import store_embeddings
from fashionrec_indexer.responses import item_out
from fashionrec_shared.schemas import ItemMetadata
from fashionrec_shared.tasks import ItemEmbedding, StoreEmbeddings
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from tests.indexer.conftest import (
    MODEL,
    add_item,
    colours,
    embed,
    image_for,
    random_vectors,
    upsert,
)
from tests.indexer.test_api import client, query, settings  # noqa: F401 (fixtures)


def test_migration_0005_adds_group_and_colours_and_downgrades(database_url: str) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0004")
    engine = make_engine(database_url)
    columns_sql = text(
        "SELECT column_name FROM information_schema.columns WHERE table_name='items'"
    )
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO items (id, sku, image_key, image_sha256, change_seq) "
                    "VALUES (gen_random_uuid(), 'old', 'k', 'a', nextval('items_change_seq'))"
                )
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            row = conn.execute(text("SELECT variant_group, colours FROM items")).one()
            assert tuple(row) == (None, None)  # existing items: no group, no colours yet
            indexes = conn.execute(
                text("SELECT indexname FROM pg_indexes WHERE tablename='items'")
            ).scalars()
            assert "items_variant_group_idx" in set(indexes)
        command.downgrade(config, "0004")
        with engine.connect() as conn:
            assert not {"variant_group", "colours"} & set(conn.execute(columns_sql).scalars())
            assert conn.execute(text("SELECT count(*) FROM items")).scalar() == 1
        command.upgrade(config, "head")
    finally:
        engine.dispose()


def stored_item(engine: Engine, item_id: uuid.UUID):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return item_out(repo.get_item(conn, item_id, MODEL))


def test_group_and_colours_follow_the_item_and_its_current_image(engine: Engine) -> None:
    item_id, image = upsert(engine, "A", group="dress-1")
    assert stored_item(engine, item_id).group == "dress-1"
    assert stored_item(engine, item_id).colours is None  # not embedded yet
    embed(engine, item_id, image, random_vectors(1)[0], colours=colours("navy", "white"))
    item = stored_item(engine, item_id)
    assert [c.name for c in item.colours] == ["navy", "white"] and item.status == "indexed"

    # The same image again (a metadata update): colours stay; the group is replaced.
    again, _ = upsert(engine, "A", group="dress-2")
    assert again == item_id
    item = stored_item(engine, item_id)
    assert item.group == "dress-2" and [c.name for c in item.colours] == ["navy", "white"]
    upsert(engine, "A")
    assert stored_item(engine, item_id).group is None

    # A new image clears them until it is embedded; a late result for the old image is stale.
    _, new_image = upsert(engine, "A", "A-new")
    assert stored_item(engine, item_id).colours is None
    embed(engine, item_id, image, random_vectors(1)[0], colours=colours("red"))
    assert stored_item(engine, item_id).colours is None
    embed(engine, item_id, new_image, random_vectors(1)[0], colours=colours("green"))
    assert [c.name for c in stored_item(engine, item_id).colours] == ["green"]

    # An embedder older than colours sends none: what is stored for the image stays.
    embed(engine, item_id, new_image, random_vectors(1)[0], colours=None)
    assert [c.name for c in stored_item(engine, item_id).colours] == ["green"]


def test_an_image_embedded_before_brings_its_colours(engine: Engine) -> None:
    """An item uploaded with an image another item has is indexed at once (never embedded
    again), so it takes the colours stored with that image."""
    add_item(engine, "A", random_vectors(1)[0], colours=colours("black"))
    item_id, _ = upsert(engine, "B", "A")
    item = stored_item(engine, item_id)
    assert item.status == "indexed" and [c.name for c in item.colours] == ["black"]
    replaced, _ = upsert(engine, "C")
    assert stored_item(engine, replaced).colours is None
    upsert(engine, "C", "A")  # re-imaged with the known image
    assert [c.name for c in stored_item(engine, replaced).colours] == ["black"]


def test_a_reembed_stores_colours_without_a_change(engine: Engine) -> None:
    item_id, image = upsert(engine, "A")
    embed(engine, item_id, image, random_vectors(1)[0])
    with engine.begin() as conn:
        job = repo.create_job(conn, repo.REEMBED, "test-model-v2")
        repo.add_job_items(conn, job, [item_id])
        seq = conn.execute(text("SELECT change_seq FROM items")).scalar_one()
    store_embeddings(
        engine,
        StoreEmbeddings(
            job_id=str(job),
            model_version="test-model-v2",
            dim=16,
            embeddings=[
                ItemEmbedding(
                    item_id=str(item_id),
                    image_sha256=image.sha256,
                    vector=encode_vector(random_vectors(1)[0]),
                    colours=colours("beige"),
                )
            ],
        ),
    )
    assert [c.name for c in stored_item(engine, item_id).colours] == ["beige"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT change_seq FROM items")).scalar_one() == seq


def test_items_and_hits_carry_group_and_colours(client: TestClient, engine: Engine) -> None:  # noqa: F811
    vector = random_vectors(1)[0]
    item_id = add_item(engine, "A", vector, group="g", colours=colours("navy"))
    item = client.get(f"/items/{item_id}").json()
    assert item["group"] == "g"
    assert item["colours"] == [{"name": "navy", "hex": "#000000", "share": 1.0}]
    [hit] = client.post("/search", json=query(vector)).json()["results"]
    assert hit["group"] == "g" and hit["colours"] == item["colours"]

    body = {
        "metadata": ItemMetadata(sku="B", group="g2").model_dump(),
        "image": image_for("B").model_dump(),
    }
    batch = client.post("/items/batch", json={"items": [body]}).json()
    other = client.get(f"/items/{batch['results'][0]['item_id']}").json()
    assert other["group"] == "g2" and other["colours"] is None
    single = client.post("/items", json={**body, "metadata": {"sku": "B"}}).json()
    assert client.get(f"/items/{single['item_id']}").json()["group"] is None
