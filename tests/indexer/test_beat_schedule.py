"""The indexer worker's beat schedule file: a corrupt one is replaced by a fresh schedule
(RecoveringScheduler) instead of ending the embedded beat while the worker runs on."""

from __future__ import annotations

import dbm
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery
from celery.beat import PersistentScheduler
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_indexer.worker import RecoveringScheduler, create_worker_app
from fashionrec_shared.settings import BrokerSettings

ENTRIES = {"every-5s": {"task": "tests.noop", "schedule": 5.0}}


def make_app() -> Celery:
    app = Celery("beat-test", broker="memory://", set_as_current=False)
    app.conf.beat_schedule = ENTRIES
    return app


def truncate_values(filename: Path) -> None:
    """Keys still list, values no longer unpickle (EOFError): what Celery does not recover."""
    with dbm.open(str(filename), "w") as db:
        for key in db.keys():  # noqa: SIM118 - dbm objects are not iterable everywhere
            db[key] = db[key][: len(db[key]) // 2]


def garbage_files(filename: Path) -> None:
    """Every file of the schedule overwritten with bytes that are no database at all."""
    for path in filename.parent.glob(filename.name + "*"):
        path.write_bytes(b"\x00garbage\xff" * 64)


@pytest.fixture
def schedule_file(tmp_path: Path) -> Path:
    """A schedule written by a beat that ran (its entries with their last run times)."""
    filename = tmp_path / "celerybeat-schedule"
    PersistentScheduler(app=make_app(), schedule_filename=str(filename)).close()
    assert list(tmp_path.iterdir())
    return filename


def test_celery_alone_does_not_recover_from_values_that_no_longer_unpickle(
    schedule_file: Path,
) -> None:
    """The case RecoveringScheduler exists for (should Celery handle it one day, this fails
    and the class can go)."""
    truncate_values(schedule_file)
    with pytest.raises(EOFError):
        PersistentScheduler(app=make_app(), schedule_filename=str(schedule_file))


@pytest.mark.parametrize("corrupt", [truncate_values, garbage_files], ids=["values", "files"])
def test_a_corrupt_schedule_is_started_afresh(
    schedule_file: Path, corrupt: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    corrupt(schedule_file)
    scheduler = RecoveringScheduler(app=make_app(), schedule_filename=str(schedule_file))
    try:
        assert set(ENTRIES) <= set(scheduler.schedule)
        entry = scheduler.schedule["every-5s"]
        assert entry.task == "tests.noop"
        assert entry.total_run_count == 0  # fresh: no run times carried over
    finally:
        scheduler.close()
    if corrupt is truncate_values:
        assert "is unreadable" in caplog.text and "starting a fresh one" in caplog.text
    # What it wrote is a sound schedule again: Celery's own scheduler opens it as it is.
    again = PersistentScheduler(app=make_app(), schedule_filename=str(schedule_file))
    try:
        assert "every-5s" in again.schedule
    finally:
        again.close()


def test_a_sound_schedule_is_kept(schedule_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    scheduler = RecoveringScheduler(app=make_app(), schedule_filename=str(schedule_file))
    try:
        assert "every-5s" in scheduler.schedule
    finally:
        scheduler.close()
    assert "unreadable" not in caplog.text


def test_the_worker_app_uses_it(tmp_path: Path) -> None:
    settings = IndexerSettings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        broker=BrokerSettings(url="redis://127.0.0.1:1/0"),
        index_dir=tmp_path / "cache",
    )
    app = create_worker_app(settings)
    assert app.conf.beat_scheduler is RecoveringScheduler
    assert app.conf.beat_schedule_filename == str(tmp_path / "cache" / "celerybeat-schedule")
