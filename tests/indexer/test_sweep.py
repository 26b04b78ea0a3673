"""The pending sweep's decisions against real Postgres: what it re-queues, when it gives up.

Items are accepted by the upsert path itself, whose EMBED_ITEMS are never sent (lost); their
age is set in the database (state, not waiting).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from fashionrec_indexer import repository as repo
from fashionrec_indexer.schema import items
from fashionrec_indexer.sweep import give_up_reason, sweep_pending
from fashionrec_indexer.upserts import UpsertPlan, upsert_items
from fashionrec_shared.schemas import ItemMetadata, UpsertItem
from fashionrec_shared.tasks import EmbedItems
from sqlalchemy import Engine, func, update

from tests.indexer.conftest import embed, image_for, random_vectors

TIMEOUT_S = 600.0


def accept(engine: Engine, skus: Sequence[str], job_id: str | None = None) -> UpsertPlan:
    """Upsert items as POST /items/batch does; the tasks of the plan are 'lost'."""
    bodies = [UpsertItem(metadata=ItemMetadata(sku=sku), image=image_for(sku)) for sku in skus]
    return upsert_items(engine, bodies, job_id)


def age(engine: Engine, seconds: float = 2 * TIMEOUT_S) -> None:
    """Make every item's last upsert and re-queue `seconds` older."""
    ago = func.make_interval(0, 0, 0, 0, 0, 0, seconds)
    with engine.begin() as conn:
        conn.execute(
            update(items).values(
                updated_at=items.c.updated_at - ago, requeued_at=items.c.requeued_at - ago
            )
        )


def sweep(engine: Engine, max_requeues: int = 2):  # type: ignore[no-untyped-def]
    return sweep_pending(engine, timeout_s=TIMEOUT_S, max_requeues=max_requeues)


def item_ids(tasks: Sequence[EmbedItems]) -> dict[str | None, set[str]]:
    found: dict[str | None, set[str]] = {}
    for task in tasks:
        found.setdefault(task.job_id, set()).update(i.item_id for i in task.items)
    return found


def row(engine: Engine, item_id: str | uuid.UUID):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return repo.get_item(conn, repo.parse_uuid(item_id))  # type: ignore[arg-type]


def test_resends_the_upserts_own_tasks_for_items_pending_too_long(engine: Engine) -> None:
    plan = accept(engine, ["A", "B"])
    assert sweep(engine).embed == []  # pending, but not for long: their tasks may be on the way

    age(engine)
    swept = sweep(engine)
    assert (swept.requeued, swept.failed) == (2, 0)
    assert item_ids(swept.embed) == item_ids(plan.embed)  # the same job, the same items
    sent = {i.item_id: i for task in swept.embed for i in task.items}
    assert sent == {i.item_id: i for task in plan.embed for i in task.items}  # and images
    assert all(task.model_version is None for task in swept.embed)  # as the upsert sends them
    assert sweep(engine).embed == []  # just re-queued: the clock starts again
    assert row(engine, plan.results[0].item_id).requeues == 1
    assert row(engine, plan.results[0].item_id).status == "pending"


def test_gives_up_after_max_requeues_with_a_reason_the_job_reports(engine: Engine) -> None:
    plan = accept(engine, ["LOST", "FINE"])
    lost, fine = (r.item_id for r in plan.results)
    for n in range(1, 3):
        age(engine)
        assert sweep(engine).requeued == (2 if n == 1 else 1)
        if n == 1:  # one of them gets embedded after the first re-queue
            embed(engine, repo.parse_uuid(fine), image_for("FINE"), random_vectors(1)[0],
                  job_id=plan.job_id)  # fmt: skip
    age(engine)
    swept = sweep(engine)
    assert (swept.requeued, swept.failed, swept.embed) == (0, 1, [])
    reason = give_up_reason(2, TIMEOUT_S)
    assert "not embedded after 2 re-queues" in reason
    assert (row(engine, lost).status, row(engine, lost).error) == ("failed", reason)
    assert row(engine, fine).status == "indexed"
    with engine.connect() as conn:
        job = repo.job_summary(conn, plan.job_id)
    assert job is not None
    assert (job["status"], job["done"], job["failed"]) == ("completed", 1, 1)
    assert job["errors"] == [{"item_id": lost, "sku": "LOST", "error": reason}]
    age(engine)
    assert sweep(engine).failed == 0  # failed stays failed


def test_max_requeues_zero_fails_at_once(engine: Engine) -> None:
    plan = accept(engine, ["A"])
    age(engine)
    assert sweep(engine, max_requeues=0).failed == 1
    assert row(engine, plan.results[0].item_id).status == "failed"


def test_a_new_upload_starts_over(engine: Engine) -> None:
    plan = accept(engine, ["A"])
    age(engine)
    sweep(engine)
    age(engine)
    sweep(engine)
    assert row(engine, plan.results[0].item_id).requeues == 2
    accept(engine, ["A"])  # the shop uploads it again
    again = row(engine, plan.results[0].item_id)
    assert (again.requeues, again.requeued_at, again.status) == (0, None, "pending")


def test_indexed_and_deleted_items_are_left_alone(engine: Engine) -> None:
    plan = accept(engine, ["DONE", "GONE"])
    done, gone = (repo.parse_uuid(r.item_id) for r in plan.results)
    assert done is not None and gone is not None
    embed(engine, done, image_for("DONE"), random_vectors(1)[0], job_id=plan.job_id)
    with engine.begin() as conn:
        repo.delete_item(conn, gone)
    age(engine)
    assert sweep(engine).embed == []


def test_an_item_queued_in_two_jobs_is_resent_for_each(engine: Engine) -> None:
    first = accept(engine, ["A"])
    with engine.begin() as conn:
        second_job = repo.create_job(conn, "ingest")
    second = accept(engine, ["A"], job_id=str(second_job))
    item_id = first.results[0].item_id
    assert second.results[0].item_id == item_id
    age(engine)
    swept = sweep(engine)
    assert item_ids(swept.embed) == {str(first.job_id): {item_id}, str(second_job): {item_id}}
    assert swept.requeued == 1  # one item, one re-queue counted


def test_concurrent_sweeps_do_not_requeue_the_same_item_twice(engine: Engine) -> None:
    accept(engine, ["A", "B"])
    age(engine)
    with engine.begin() as conn:
        held = repo.lock_stale_pending(conn, TIMEOUT_S, limit=1)  # another sweep holds one
        assert len(held) == 1
        swept = sweep(engine)
    assert swept.requeued == 1
