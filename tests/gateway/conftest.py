"""Gateway app under TestClient: real local blob store and Redis, the real indexer app (on the
Postgres fixture, reached in process; see indexer.py) and a fake embedder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fashionrec_gateway.app import create_app
from fashionrec_gateway.deps import get_indexer, get_query_embedder
from fashionrec_gateway.embedding import CeleryQueryEmbedder
from fashionrec_gateway.indexer_client import IndexerClient
from fashionrec_gateway.settings import GatewaySettings
from fashionrec_shared.settings import BrokerSettings, StorageSettings
from fastapi.testclient import TestClient

from tests.gateway.fakes import FakeEmbedder
from tests.gateway.indexer import INDEXER_URL, RealIndexer


@dataclass
class Gateway:
    client: TestClient
    blob_dir: Path
    indexer: RealIndexer
    embedder: FakeEmbedder
    redis: redis.Redis
    settings: GatewaySettings

    def stored(self) -> set[str]:
        """Every object key in the blob store (temp files included: nothing may linger)."""
        return {
            p.relative_to(self.blob_dir).as_posix() for p in self.blob_dir.rglob("*") if p.is_file()
        }


@pytest.fixture
def indexer(
    make_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> Iterator[RealIndexer]:
    """One indexer per test (every gateway of the test talks to it); it starts on first use."""
    real = RealIndexer(make_database, redis_url, tmp_path / "indexer")
    yield real
    real.close()


@pytest.fixture
def make_gateway(
    tmp_path: Path, redis_url: str, indexer: RealIndexer
) -> Iterator[Callable[..., Gateway]]:
    opened: list[TestClient] = []
    clients: list[redis.Redis] = []
    indexers: list[IndexerClient] = []

    def make(**overrides: Any) -> Gateway:
        blob_dir = tmp_path / f"blobs{len(opened)}"
        fields: dict[str, Any] = {
            "storage": StorageSettings(backend="local", local_dir=blob_dir),
            "broker": BrokerSettings(url=redis_url),
            "indexer_url": INDEXER_URL,
            "embed_timeout_s": 2,
        }
        settings = GatewaySettings(**{**fields, **overrides})
        embedder = FakeEmbedder()
        app = create_app(settings)
        indexer_client = IndexerClient.create(INDEXER_URL, 5, transport=indexer.faults)
        indexers.append(indexer_client)
        app.dependency_overrides[get_indexer] = lambda: indexer_client
        app.dependency_overrides[get_query_embedder] = lambda: CeleryQueryEmbedder(
            app.state.celery, sender=embedder
        )
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        r = redis.Redis.from_url(redis_url)
        clients.append(r)
        return Gateway(client, blob_dir, indexer, embedder, r, settings)

    yield make
    for client in opened:
        client.__exit__(None, None, None)
    for r in clients:
        r.close()
    for indexer_client in indexers:
        indexer_client.close()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()
