"""Request ids: the gateway's reaches the indexer (HTTP header) and Celery tasks (message header),
and every log line carries it; JSON log lines on request.

The apps are the real ones: the gateway's, calling the real indexer app over its ASGI interface
(a TestClient as the gateway's httpx client), on the Postgres, Redis and blob store fixtures.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from fashionrec_gateway.app import create_app as create_gateway
from fashionrec_gateway.deps import get_indexer
from fashionrec_gateway.indexer_client import IndexerClient
from fashionrec_gateway.settings import GatewaySettings
from fashionrec_indexer.api import create_app as create_indexer
from fashionrec_indexer.db import migrate
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_indexer.worker import create_worker_app
from fashionrec_shared.celery_app import make_celery
from fashionrec_shared.logging_setup import (
    TEXT_FORMAT,
    JsonFormatter,
    RequestIdFilter,
    configure_logging,
    log_handler,
)
from fashionrec_shared.request_id import (
    CELERY_HEADER,
    REQUEST_ID_HEADER,
    current_request_id,
    install_celery_request_id,
    request_id_scope,
)
from fashionrec_shared.settings import BrokerSettings, StorageSettings
from fashionrec_shared.tasks import ItemEmbedding, StoreEmbeddings, TaskName
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from PIL import Image

RID = "req-7f3a-from-the-shop"


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog whose records pass the production filter (request_id, service on each)."""
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.DEBUG)
    return caplog


def jpeg(colour: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(out, "JPEG")
    return out.getvalue()


def _pop_message(client: redis.Redis, queue: str) -> tuple[dict, list]:
    raw = client.rpop(queue)
    assert raw is not None, f"no message on queue {queue!r}"
    message = json.loads(raw)
    return message["headers"], json.loads(base64.b64decode(message["body"]))


def test_a_gateway_request_id_reaches_the_indexer_and_celery_tasks(
    records: pytest.LogCaptureFixture, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    migrate(database_url, timeout_s=10)
    storage = StorageSettings(backend="local", local_dir=tmp_path / "blobs")
    broker = BrokerSettings(url=redis_url)
    indexer_settings = IndexerSettings(
        database_url=database_url,
        broker=broker,
        storage=storage,
        index_dir=tmp_path / "cache",
        settle_s=0,
    )
    gateway_app = create_gateway(
        GatewaySettings(storage=storage, broker=broker, indexer_url="http://indexer.test")
    )
    image = jpeg()
    with TestClient(create_indexer(indexer_settings), base_url="http://indexer.test") as http:
        indexer = IndexerClient(http)
        gateway_app.dependency_overrides[get_indexer] = lambda: indexer
        with TestClient(gateway_app) as gateway:
            # The lifespans set fashionrec's level from the settings; request lines are DEBUG.
            logging.getLogger("fashionrec").setLevel(logging.DEBUG)
            accepted = gateway.post(
                "/v1/items",
                files={"image": ("a.jpg", image, "image/jpeg")},
                data={"metadata": json.dumps({"sku": "A-1", "title": "Red dress"})},
                headers={REQUEST_ID_HEADER: RID},
            )
            fresh = gateway.get("/livez")
            tampered = gateway.get("/livez", headers={REQUEST_ID_HEADER: "x\ny" * 3})
    assert accepted.status_code == 202, accepted.text
    assert accepted.headers[REQUEST_ID_HEADER] == RID
    made = fresh.headers[REQUEST_ID_HEADER]
    assert len(made) == 32 and made != RID  # no header: a new id
    assert tampered.headers[REQUEST_ID_HEADER] not in ("x\ny" * 3, made)

    # The indexer served the gateway's calls under the gateway's id.
    indexer_lines = [r for r in records.records if r.name == "fashionrec.indexer.http"]
    assert indexer_lines and {r.request_id for r in indexer_lines} == {RID}
    gateway_lines = [r for r in records.records if r.name == "fashionrec.gateway.http"]
    assert [r.request_id for r in gateway_lines] == [RID, made, tampered.headers[REQUEST_ID_HEADER]]

    # The indexer's EMBED_ITEMS message carries it, and a task run from that header logs it.
    client = redis.Redis.from_url(redis_url)
    try:
        headers, _body = _pop_message(client, "embed")
    finally:
        client.close()
    assert headers["task"] == str(TaskName.EMBED_ITEMS)
    assert headers[CELERY_HEADER] == RID
    item_id = accepted.json()["item_id"]
    payload = StoreEmbeddings(
        model_version="test-model-v1",
        dim=4,
        embeddings=[
            ItemEmbedding(
                item_id=item_id,
                image_sha256=hashlib.sha256(image).hexdigest(),
                vector=encode_vector([0.5, 0.5, 0.5, 0.5]),
            )
        ],
    ).model_dump(mode="json")
    records.clear()
    task = create_worker_app(indexer_settings).tasks[str(TaskName.STORE_EMBEDDINGS)]
    result = task.apply(args=[payload], task_id="t-rid", headers={CELERY_HEADER: RID})
    assert result.successful(), result.traceback
    task_lines = [r for r in records.records if r.name == "celery.app.trace"]
    assert task_lines and {r.request_id for r in task_lines} == {RID}
    assert current_request_id() is None  # reset after the task


@pytest.fixture
def worker_app(redis_url: str) -> Iterator:
    """A Celery app of the shared factory with one task, served by a real (threaded) worker."""
    install_celery_request_id()
    app = make_celery("request-id-test", BrokerSettings(url=redis_url))
    seen: list[str | None] = []

    @app.task(name="test.echo_request_id")
    def echo() -> str | None:
        logging.getLogger("fashionrec.test.task").info("running in a worker")
        seen.append(current_request_id())
        return current_request_id()

    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="INFO"):
        yield echo, seen
    app.close()


def test_a_worker_runs_a_task_under_the_request_id_of_its_message(
    records: pytest.LogCaptureFixture, worker_app
) -> None:
    echo, seen = worker_app
    with request_id_scope(RID):
        sent = echo.apply_async(queue="celery")
    assert sent.get(timeout=20) == RID
    assert echo.apply_async(queue="celery").get(timeout=20) is None
    assert seen == [RID, None]
    [inside, outside] = [r for r in records.records if r.name == "fashionrec.test.task"]
    assert (inside.request_id, outside.request_id) == (RID, "-")


def test_json_lines_carry_time_level_logger_message_request_id_and_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger = logging.getLogger("fashionrec.test.json")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = log_handler("indexer", fmt="json")
    logger.addHandler(handler)
    try:
        with request_id_scope(RID):
            logger.info("stored %d embeddings", 3)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("outside any request")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message", "request_id", "service"}
    assert first["message"] == "stored 3 embeddings" and first["level"] == "INFO"
    assert (first["logger"], first["request_id"], first["service"]) == (
        "fashionrec.test.json",
        RID,
        "indexer",
    )
    assert first["time"].endswith("+00:00")
    assert second["request_id"] == "-" and "ValueError: boom" in second["exception"]
    assert isinstance(log_handler("indexer", fmt="text").formatter, logging.Formatter)
    assert not isinstance(log_handler("indexer", fmt="text").formatter, JsonFormatter)


def test_configure_logging_reads_the_format_and_replaces_only_its_own_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    try:
        monkeypatch.setenv("FASHIONREC_LOG_FORMAT", "json")
        configure_logging("gateway", "DEBUG")
        configure_logging("gateway", "INFO", root_level="WARNING")
        ours = [h for h in root.handlers if getattr(h, "fashionrec", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
        assert foreign in root.handlers
        assert root.level == logging.WARNING
        assert logging.getLogger("fashionrec").level == logging.INFO
        monkeypatch.setenv("FASHIONREC_LOG_FORMAT", "xml")
        with pytest.raises(ValueError, match="text or json"):
            configure_logging("gateway")
    finally:
        root.removeHandler(foreign)
    assert "%(request_id)s" in TEXT_FORMAT and "%(service)s" in TEXT_FORMAT
