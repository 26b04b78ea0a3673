"""The real indexer behind the gateway's tests: fashionrec_indexer's app, in process.

`RealIndexer` runs the indexer app (a starlette TestClient, so its lifespan runs: engine, index
state, Celery) on a freshly migrated Postgres database, the test's Redis and a local blob store.
It starts on first use and begins as a deployment does after its first build: serving model
`m1` (an empty build: one stored vector of no item pins the version). Tests put items in with
the indexer's own code (repository upsert + STORE_EMBEDDINGS) and change the served model with
real builds swapped in, so every answer the gateway gets is the indexer's.

Item vectors fall in cosine to the fake embedder's query vector (`unit_vector()`) in the order
items were embedded: searches answer in insertion order.

The gateway reaches the app through `FaultInjection`, an httpx transport that forwards every
request unless a test switched a fault on (the indexer unreachable, or a canned problem for one
route: failures the real app cannot be made to produce on demand), and records what it was sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fashionrec_indexer import repository as repo
from fashionrec_indexer.api import create_app
from fashionrec_indexer.builder import build_index
from fashionrec_indexer.db import migrate
from fashionrec_indexer.index_state import IndexState
from fashionrec_indexer.ingest import store_embeddings
from fashionrec_indexer.model_change import model_online
from fashionrec_indexer.schema import embeddings, items
from fashionrec_indexer.settings import IndexerSettings
from fashionrec_shared.schemas import ItemMetadata
from fashionrec_shared.settings import BrokerSettings, StorageSettings
from fashionrec_shared.storage import LocalBlobStore
from fashionrec_shared.tasks import ImageRef, ItemEmbedding, ModelOnline, Predicted, StoreEmbeddings
from fashionrec_shared.vectors import encode_vector
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, func, insert, literal, select, text

from tests.gateway.fakes import unit_vector

INDEXER_URL = "http://indexer.test"
MODEL = "m1"
DIM = 8  # the fake embedder's query vectors
# A stored vector of no item: it makes the version served before any item is embedded.
ANCHOR_SHA = hashlib.sha256(b"no item").hexdigest()


def problem(status: int, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": "Error", "status": status, "detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def rank_vector(rank: int, dim: int = DIM) -> np.ndarray:
    """A unit vector whose cosine with `unit_vector()` (and with rank 0's) falls as rank grows."""
    query = unit_vector(DIM)
    other = np.eye(DIM, dtype=np.float32)[0]
    other -= (other @ query) * query
    vector = query + 0.25 * rank * other / np.linalg.norm(other)
    padded = np.zeros(dim, dtype=np.float32)
    padded[:DIM] = vector / np.linalg.norm(vector)
    return padded


class FaultInjection(httpx.BaseTransport):
    """Forwards the gateway's requests to the real app; records them; injects switched-on faults.

    `down`: every request fails to connect. `problems[(method, path)]`: that route answers the
    given (status, detail) problem instead of the app. `after[(method, path, status)]`: run once
    right after the app answered so (e.g. a new index swapped in between two requests).
    """

    def __init__(self, app: Callable[[], TestClient]) -> None:
        self._app = app
        self.down = False
        self.problems: dict[tuple[str, str], tuple[int, str]] = {}
        self.after: dict[tuple[str, str, int], Callable[[], None]] = {}
        self.calls: list[tuple[str, str, Any]] = []

    def answer(self, method: str, path: str, status: int, detail: str) -> None:
        """From now on `method path` answers this problem instead of the app."""
        self.problems[(method, path)] = (status, detail)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        method, path = request.method, request.url.path
        body = json.loads(request.content) if request.content else None
        # GETs are recorded with their query parameters instead of a body.
        self.calls.append((method, path, body or dict(request.url.params) or None))
        if (method, path) in self.problems:
            return problem(*self.problems[(method, path)])
        answer = self._app().request(
            method, str(request.url), content=request.content, headers=request.headers
        )
        hook = self.after.pop((method, path, answer.status_code), None)
        if hook is not None:
            hook()
        headers = [(k, v) for k, v in answer.headers.items() if k != "content-encoding"]
        return httpx.Response(answer.status_code, headers=headers, content=answer.content)


class _Items(Mapping[str, dict[str, Any]]):
    """Items as the indexer answers GET /items/{id} (read past the recorder)."""

    def __init__(self, indexer: RealIndexer) -> None:
        self._indexer = indexer

    def __getitem__(self, item_id: str) -> dict[str, Any]:
        response = self._indexer.app.get(f"/items/{item_id}")
        if response.status_code == 404:
            raise KeyError(item_id)
        response.raise_for_status()
        return response.json()

    def __iter__(self) -> Iterator[str]:
        with self._indexer.engine.connect() as conn:
            rows = conn.execute(select(items.c.id).where(items.c.deleted_at.is_(None)))
            return iter([str(row.id) for row in rows])

    def __len__(self) -> int:
        return len(list(iter(self)))


class RealIndexer:
    def __init__(self, make_database: Callable[[], str], redis_url: str, root: Path) -> None:
        self._make_database = make_database
        self._redis_url = redis_url
        self._root = root
        self._lock = threading.RLock()  # _start serves m1 through `app`
        self._client: TestClient | None = None
        self._rank = 0
        self.database_url: str | None = None  # set when the app starts
        self.dim = DIM  # of the served vectors; set it before first use
        self.faults = FaultInjection(lambda: self.app)  # the gateway's transport
        self.items = _Items(self)

    # ---- the app -------------------------------------------------------------------------

    @property
    def app(self) -> TestClient:
        """A client of the running app (started on first use)."""
        with self._lock:
            if self._client is None:
                self._client = self._start()
        return self._client

    def _start(self) -> TestClient:
        database_url = self.database_url = self._make_database()
        migrate(database_url, timeout_s=10)
        settings = IndexerSettings(
            database_url=database_url,
            broker=BrokerSettings(url=self._redis_url),
            storage=StorageSettings(backend="local", local_dir=self._root / "blobs"),
            index_dir=self._root / "cache",
            refresh_interval_s=3600,  # builds are swapped in by `serve`, not by the timer
            settle_s=0,
        )
        client = TestClient(create_app(settings), base_url=INDEXER_URL)
        client.__enter__()
        self._client = client
        self.serve(MODEL)
        return client

    def database_down(self) -> None:
        """Postgres refuses the indexer's database from now on, as in an outage: no new
        connection is allowed (superusers included) and the open ones are cut."""
        engine = self.engine  # started first: the outage hits a running indexer
        name = engine.url.database
        # From the maintenance database: a database cannot lock itself out.
        admin = create_engine(engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name"
                    ),
                    {"name": name},
                )
        finally:
            admin.dispose()

    def close(self) -> None:
        if self._client is not None:
            self._client.__exit__(None, None, None)
            self._client = None

    @property
    def engine(self) -> Engine:
        return self.app.app.state.engine

    @property
    def _state(self) -> IndexState:
        return self.app.app.state.index_state

    # ---- what it serves ------------------------------------------------------------------

    @property
    def model_version(self) -> str | None:
        snapshot = self._state.current
        return snapshot.build_model_version if snapshot else None

    @property
    def index_version(self) -> str | None:
        snapshot = self._state.current
        return snapshot.index_version if snapshot else None

    def serve(self, version: str) -> None:
        """Swap in a build of `version`: every vector of the served version is stored for it
        too (a model change that moved nothing), then it is built and loaded."""
        with self.engine.begin() as conn:
            served = repo.active_model_version(conn)
            if served is None:
                anchor = {
                    "image_sha256": ANCHOR_SHA,
                    "model_version": version,
                    "dim": self.dim,
                    "vector": rank_vector(0, self.dim).astype("<f4").tobytes(),
                    "predicted": None,
                    "predicted_category": None,
                }
                repo.upsert_embeddings(conn, [anchor])
            elif served != version:
                columns = ["image_sha256", "dim", "vector", "predicted", "predicted_category"]
                source = select(
                    *(embeddings.c[c] for c in columns), literal(version), func.now()
                ).where(embeddings.c.model_version == served)
                conn.execute(
                    insert(embeddings).from_select(
                        [*columns, "model_version", "created_at"], source
                    )
                )
        store = LocalBlobStore(self._root / "blobs")
        built = build_index(
            self.engine, store, n_trees=2, settle_s=0, force=True, model_version=version
        )
        assert built.status == "ready", built.detail
        assert self._state.refresh()

    def announce(self, version: str) -> str:
        """An embedder announces `version` (MODEL_ONLINE): the re-embed job it opens."""
        plan = model_online(self.engine, ModelOnline(model_version=version, dim=self.dim))
        assert plan.job_id is not None, plan.detail
        return str(plan.job_id)

    # ---- items ---------------------------------------------------------------------------

    def add_item(
        self,
        sku: str,
        key: str,
        sha: str,
        *,
        title: str | None = None,
        category: str | None = None,
        price: float | None = None,
        attributes: dict[str, Any] | None = None,
        predicted: dict[str, Any] | None = None,
    ) -> str:
        """An item embedded with the served model (with these predictions, if given)."""
        metadata = ItemMetadata(
            sku=sku,
            title=title or f"title {sku}",
            category=category,
            price=price,
            attributes=attributes or {},
        )
        with self.engine.begin() as conn:
            served = repo.active_model_version(conn)
            upserted = repo.upsert_item(conn, metadata, ImageRef(key=key, sha256=sha), served)
        self._embed([(upserted.item_id, sha)], predicted)
        return str(upserted.item_id)

    def embed_pending(self) -> None:
        """What the embedders would do with the EMBED_ITEMS the indexer sent: embed every
        pending item, in the order they were added."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(items.c.id, items.c.image_sha256)
                .where(items.c.status == "pending", items.c.deleted_at.is_(None))
                .order_by(items.c.change_seq)
            )
            pending = [(row.id, row.image_sha256) for row in rows]
        self._embed(pending)

    def _embed(self, rows: list[Any], predicted: dict[str, Any] | None = None) -> None:
        version = self.model_version
        assert version is not None
        found = []
        for item_id, sha in rows:
            found.append(
                ItemEmbedding(
                    item_id=str(item_id),
                    image_sha256=sha,
                    vector=encode_vector(rank_vector(self._rank, self.dim)),
                    predicted=Predicted.model_validate(predicted) if predicted else None,
                )
            )
            self._rank += 1
        payload = StoreEmbeddings(model_version=version, dim=self.dim, embeddings=found)
        store_embeddings(self.engine, payload)

    # ---- timing, and what the gateway sent ---------------------------------------------

    def swap_after_next_conflict(self, version: str) -> None:
        """The index swaps to `version` right after its next 409 to a search."""
        self.faults.after[("POST", "/search", 409)] = lambda: self.serve(version)

    def calls_to(self, method: str, path: str) -> list[Any]:
        return [body for m, p, body in self.faults.calls if m == method and p == path]
