from __future__ import annotations

import pytest
from fashionrec_indexer import repository as repo
from fashionrec_indexer.schema import items
from sqlalchemy import Engine, func, select

from tests.indexer.conftest import upsert


def test_upsert_same_sku_keeps_one_item_and_its_id(engine: Engine) -> None:
    first_id, _ = upsert(engine, "SKU-1", "img-a")
    with engine.connect() as conn:
        seq_before = conn.execute(select(items.c.change_seq)).scalar_one()
    second_id, image = upsert(engine, "SKU-1", "img-b", category="shoes", price=10)
    assert first_id == second_id
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(items)).scalar_one() == 1
        row = repo.get_item(conn, first_id)
    assert row.image_sha256 == image.sha256
    assert row.category == "shoes"
    assert row.status == "pending"
    assert row.change_seq > seq_before


def test_created_flag_and_deleted_item_is_revived(engine: Engine) -> None:
    with engine.begin() as conn:
        from fashionrec_shared.schemas import ItemMetadata

        from tests.indexer.conftest import image_for

        meta = ItemMetadata(sku="S")
        first = repo.upsert_item(conn, meta, image_for("x"), None)
        again = repo.upsert_item(conn, meta, image_for("x"), None)
        assert first.created and not again.created
        assert repo.delete_item(conn, first.item_id)
        assert not repo.delete_item(conn, first.item_id)
        assert repo.get_item(conn, first.item_id) is None
        revived = repo.upsert_item(conn, meta, image_for("x"), None)
    assert revived.item_id == first.item_id and revived.created
    with engine.connect() as conn:
        assert repo.get_item(conn, first.item_id) is not None


@pytest.mark.parametrize(
    ("total", "done", "failed", "status"),
    [
        (0, 0, 0, "queued"),
        (3, 0, 0, "queued"),
        (3, 1, 0, "running"),
        (3, 1, 1, "running"),
        (3, 2, 1, "completed"),
        (2, 0, 2, "failed"),
        (2, 2, 0, "completed"),
    ],
)
def test_job_status_is_derived(total: int, done: int, failed: int, status: str) -> None:
    assert repo.job_status(total, done, failed) == status


def test_active_model_version(engine: Engine) -> None:
    from tests.indexer.conftest import MODEL, embed, random_vectors

    with engine.connect() as conn:
        assert repo.active_model_version(conn) is None
    item_id, image = upsert(engine, "A")
    embed(engine, item_id, image, random_vectors(1)[0])
    with engine.connect() as conn:
        assert repo.active_model_version(conn) == MODEL
        assert repo.get_item(conn, item_id).model_version == MODEL
