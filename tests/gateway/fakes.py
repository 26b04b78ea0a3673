"""Stand-ins for the two backends the gateway calls: the indexer (HTTP) and the embedder (Celery).

The indexer is an in-memory implementation of its HTTP contract behind httpx.MockTransport; the
embedder replaces `fashionrec_shared.celery_app.send` and the AsyncResult it returns.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
from celery.exceptions import TimeoutError as CeleryTimeoutError
from fashionrec_shared.schemas import IndexerItem, JobOut
from fashionrec_shared.tasks import EmbedQueryResult, Predicted
from fashionrec_shared.vectors import encode_vector

INDEXER_URL = "http://indexer.test"


def problem(status: int, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": "about:blank", "title": "Error", "status": status, "detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


@dataclass
class FakeIndexer:
    model_version: str = "m1"
    index_version: str | None = "b1"
    ready: bool = True
    down: bool = False
    fail_search_with: tuple[int, str] | None = None
    pending_model_version: str | None = None
    swap_after_conflict: str | None = None
    reembed_job_id: str | None = None
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str, Any]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def calls_to(self, method: str, path: str) -> list[Any]:
        return [body for m, p, body in self.calls if m == method and p == path]

    def add_item(self, sku: str, key: str, sha: str, **extra: Any) -> str:
        item_id = str(uuid.uuid4())
        now = datetime.now(UTC).isoformat()
        self.items[item_id] = {
            "item_id": item_id,
            "sku": sku,
            "title": extra.get("title", f"title {sku}"),
            "category": extra.get("category"),
            "price": extra.get("price"),
            "attributes": extra.get("attributes", {}),
            "status": extra.get("status", "indexed"),
            "error": None,
            "image": {"key": key, "sha256": sha},
            "model_version": self.model_version,
            "predicted": extra.get("predicted"),
            "created_at": now,
            "updated_at": now,
        }
        return item_id

    @property
    def index_info(self) -> dict[str, Any]:
        return {
            "index_version": self.index_version,
            "model_version": self.model_version,
            "items_in_index": len(self.items),
            "items_since_build": 0,
            "built_at": None,
            "pending_model_version": self.pending_model_version,
            "reembed_job_id": self.reembed_job_id,
        }

    def _hits(self, k: int, exclude: str | None = None) -> list[dict[str, Any]]:
        hits = []
        for rank, item in enumerate(v for v in self.items.values() if v["item_id"] != exclude):
            fields = ("item_id", "sku", "title", "category", "price", "image", "predicted")
            hit = {f: item[f] for f in fields}
            hits.append({**hit, "score": 1.0 - 0.1 * rank})
        return hits[:k]

    def _search_response(self, hits: list[dict[str, Any]]) -> httpx.Response:
        body = {"results": hits, "model_version": self.model_version}
        return httpx.Response(200, json={**body, "index_version": self.index_version})

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        # GETs are recorded with their query parameters instead of a body.
        self.calls.append((request.method, path, body or dict(request.url.params) or None))
        method = request.method
        if (method, path) == ("GET", "/readyz"):
            if not self.ready:
                return problem(503, "database not ready")
            return httpx.Response(200, json={"status": "ready"})
        if (method, path) == ("POST", "/search"):
            if self.fail_search_with:
                return problem(*self.fail_search_with)
            if body["model_version"] != self.model_version:
                served = self.model_version
                if self.swap_after_conflict:  # a new index swapped in right after this answer
                    self.model_version, self.swap_after_conflict = self.swap_after_conflict, None
                return problem(
                    409,
                    f"model version {body['model_version']} is not active",
                    model_version=served,
                )
            return self._search_response(self._hits(body["k"]))
        if (method, path) == ("GET", "/index"):
            return httpx.Response(200, json=self.index_info)
        if (method, path) == ("POST", "/items"):
            return self._upsert(body)
        if (method, path) == ("POST", "/items/batch"):
            job_id = body.get("job_id")
            if job_id is not None and job_id not in self.jobs:
                return problem(404, f"job {job_id} not found")
            job_id = job_id or str(uuid.uuid4())
            results = [self._upsert({**item, "job_id": None}).json() for item in body["items"]]
            results = [{**r, "job_id": job_id} for r in results]
            answer = {"job_id": job_id, "results": results, "embed_tasks": 1}
            return httpx.Response(200, json=answer)
        if (method, path) == ("POST", "/jobs"):
            job_id = str(uuid.uuid4())
            self.jobs[job_id] = {
                "job_id": job_id,
                "kind": body["kind"],
                "status": "queued",
                "total": 0,
                "done": 0,
                "failed": 0,
                "errors": [],
            }
            return httpx.Response(201, json=self.jobs[job_id])
        if match := re.fullmatch(r"/jobs/([^/]+)", path):
            job = self.jobs.get(match.group(1))
            return httpx.Response(200, json=job) if job else problem(404, "job not found")
        if match := re.fullmatch(r"/items/([^/]+)(/similar)?", path):
            item_id, similar = match.groups()
            if item_id not in self.items:
                return problem(404, f"item {item_id} not found")
            if similar:
                k = int(request.url.params.get("k", 5))
                return self._search_response(self._hits(k, exclude=item_id))
            if method == "DELETE":
                del self.items[item_id]
                return httpx.Response(204)
            return httpx.Response(200, json=self.items[item_id])
        return problem(404, f"no route {method} {path}")

    def _upsert(self, body: dict[str, Any]) -> httpx.Response:
        job_id = body.get("job_id")
        if job_id is not None and job_id not in self.jobs:
            return problem(404, f"job {job_id} not found")
        meta = body["metadata"]
        existing = [i for i, v in self.items.items() if v["sku"] == meta["sku"]]
        item_id = (
            existing[0]
            if existing
            else self.add_item(
                meta["sku"], body["image"]["key"], body["image"]["sha256"], status="pending"
            )
        )
        self.items[item_id].update({k: v for k, v in meta.items() if k != "sku"})
        self.items[item_id]["image"] = body["image"]
        IndexerItem.model_validate(self.items[item_id])  # the fake keeps the contract too
        result = {
            "item_id": item_id,
            "job_id": job_id or str(uuid.uuid4()),
            "created": not existing,
            "embed_queued": True,
        }
        return httpx.Response(200, json=result)


def unit_vector(dim: int = 8) -> np.ndarray:
    v = np.arange(1, dim + 1, dtype=np.float32)
    return v / np.linalg.norm(v)


@dataclass
class FakeResult:
    value: Any = None
    error: BaseException | None = None
    forgotten: bool = False

    def get(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def forget(self) -> None:
        self.forgotten = True


@dataclass
class FakeEmbedder:
    """Replaces `send`: records each task sent and answers like an embedder worker would."""

    model_version: str = "m1"
    error: BaseException | None = None
    sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def timeout(self) -> None:
        self.error = CeleryTimeoutError("The operation timed out.")

    # Versions this embedder also holds (a model change): a query naming one gets it.
    also_loaded: tuple[str, ...] = ()
    # What the heads predict for a query photo, per model version (none: no heads).
    predicted: dict[str, Predicted] = field(default_factory=dict)

    def __call__(self, app: Any, task: str, payload: Any, **options: Any) -> FakeResult:
        self.sent.append((str(task), payload.model_dump(mode="json"), options))
        wanted = getattr(payload, "model_version", None)
        version = wanted if wanted in self.also_loaded else self.model_version
        result = EmbedQueryResult(
            vector=encode_vector(unit_vector()),
            dim=8,
            model_version=version,
            predicted=self.predicted.get(version),
        )
        return FakeResult(value=result.model_dump(mode="json"), error=self.error)


def make_job(**fields: Any) -> JobOut:
    return JobOut(job_id="j", kind="ingest", status="queued", total=0, done=0, failed=0, **fields)
