"""The ingest client against a small stand-in of the gateway's /v1 jobs and items API.

Tests about one request per row pass `batch_size=1` (POST /v1/items); the others send batches
(POST /v1/items/batch), the default.

The stand-in is a real FastAPI app under uvicorn on loopback, so multipart encoding, problem+json
bodies, retries and polling all go over HTTP. Rows steer it by SKU prefix: BAD… is refused with a
422 problem, FAIL… fails during "embedding", FLAKY… gets two 503s first, DOWN… always 503s,
STUCK… never finishes, LIMITED… gets two 429s (Retry-After: 1) first, THROTTLED… always 429s
(Retry-After: 30).
"""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from fashionrec_cli.client import retry_after_seconds
from fashionrec_cli.infra import free_port
from fashionrec_cli.ingest import IngestError, RetryPolicy, ingest, print_summary
from fashionrec_shared.problems import ProblemError, install_problem_handlers
from fashionrec_shared.schemas import ItemMetadata, JobCreate
from fastapi import FastAPI, File, Form, Header, UploadFile
from PIL import Image
from pydantic import ValidationError
from rich.console import Console

FAST_RETRY = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.02)


@dataclass
class StandIn:
    url: str = ""
    api_key: str | None = None
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    attempt_times: dict[str, list[float]] = field(default_factory=dict)  # monotonic, per sku
    inflight: int = 0
    max_inflight: int = 0
    batches: list[list[str]] = field(default_factory=list)  # skus of each batch request
    lock: threading.Lock = field(default_factory=threading.Lock)


def _job_out(job: dict[str, Any]) -> dict[str, Any]:
    # Each poll "embeds" one more pending item, so the client has to poll several times.
    if job["pending"]:
        item_id, sku = job["pending"].pop(0)
        if sku.startswith("STUCK"):
            job["pending"].append((item_id, sku))
        elif sku.startswith("FAIL"):
            job["failed"] += 1
            job["errors"].append({"item_id": item_id, "error": "image could not be decoded"})
        else:
            job["done"] += 1
    finished = job["done"] + job["failed"] == job["total"]
    return {
        "job_id": job["job_id"],
        "kind": job["kind"],
        "status": "completed" if finished else "running",
        "total": job["total"],
        "done": job["done"],
        "failed": job["failed"],
        "errors": job["errors"],
    }


def _count_attempt(state: StandIn, sku: str) -> int:
    """Count one attempt at `sku` (under the caller's lock); returns its number."""
    state.attempts[sku] = state.attempts.get(sku, 0) + 1
    state.attempt_times.setdefault(sku, []).append(time.monotonic())
    return state.attempts[sku]


def _limited(sku: str, attempt: int) -> ProblemError | None:
    """The stand-in's rate limit: a 429 problem with Retry-After, as the gateway answers."""
    if sku.startswith("THROTTLED"):
        retry_after = "30"
    elif sku.startswith("LIMITED") and attempt <= 2:
        retry_after = "1"
    else:
        return None
    return ProblemError(
        429,
        "Too Many Requests",
        "rate limit exceeded: 10 per 1 second",
        headers={"Retry-After": retry_after},
    )


def make_app(state: StandIn) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    def check_key(key: str | None) -> None:
        if state.api_key and key != state.api_key:
            raise ProblemError(401, "Unauthorized", "missing or wrong X-API-Key")

    @app.post("/v1/jobs", status_code=201)
    def open_job(
        body: JobCreate, x_api_key: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        check_key(x_api_key)
        job_id = str(uuid.uuid4())
        state.jobs[job_id] = {
            "job_id": job_id,
            "kind": body.kind,
            "total": 0,
            "done": 0,
            "failed": 0,
            "errors": [],
            "pending": [],
        }
        return _job_out(state.jobs[job_id])

    @app.post("/v1/items", status_code=202)
    def add_item(
        image: Annotated[UploadFile, File()],
        metadata: Annotated[str, Form()],
        job_id: str,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> dict[str, str]:
        check_key(x_api_key)
        with state.lock:
            state.inflight += 1
            state.max_inflight = max(state.max_inflight, state.inflight)
        try:
            time.sleep(0.02)
            try:
                meta = ItemMetadata.model_validate_json(metadata)
            except ValidationError as exc:
                raise ProblemError(422, "Unprocessable Content", str(exc)) from exc
            with state.lock:
                attempt = _count_attempt(state, meta.sku)
            limited = _limited(meta.sku, attempt)
            if limited is not None:
                raise limited
            if meta.sku.startswith("DOWN") or (meta.sku.startswith("FLAKY") and attempt <= 2):
                raise ProblemError(503, "Service Unavailable", "no embedder is alive")
            if meta.sku.startswith("BAD"):
                raise ProblemError(
                    422, "Unprocessable Content", f"image for {meta.sku} is not a valid picture"
                )
            data = image.file.read()
            Image.open(io.BytesIO(data)).verify()
            item_id = str(uuid.uuid4())
            with state.lock:
                state.uploads.append(
                    {"meta": meta, "content_type": image.content_type, "size": len(data)}
                )
                job = state.jobs[job_id]
                job["total"] += 1
                job["pending"].append((item_id, meta.sku))
            return {"item_id": item_id, "job_id": job_id}
        finally:
            with state.lock:
                state.inflight -= 1

    @app.post("/v1/items/batch", status_code=207)
    def add_batch(
        image: Annotated[list[UploadFile], File()],
        metadata: Annotated[str, Form()],
        job_id: str,
        x_api_key: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        check_key(x_api_key)
        metas = [ItemMetadata.model_validate(m) for m in json.loads(metadata)]
        assert len(metas) == len(image)
        skus = [m.sku for m in metas]
        with state.lock:
            state.batches.append(skus)
            attempts = [_count_attempt(state, sku) for sku in skus]
        for sku, attempt in zip(skus, attempts, strict=True):
            limited = _limited(sku, attempt)
            if limited is not None:
                raise limited
        if any(s.startswith("FLAKY") and a <= 2 for s, a in zip(skus, attempts, strict=True)):
            raise ProblemError(503, "Service Unavailable", "no embedder is alive")
        results = []
        for n, (meta, upload) in enumerate(zip(metas, image, strict=True)):
            if meta.sku.startswith("BAD"):
                detail = f"image for {meta.sku} is not a valid picture"
                results.append({"index": n, "sku": meta.sku, "status": 422, "detail": detail})
                continue
            data = upload.file.read()
            Image.open(io.BytesIO(data)).verify()
            item_id = str(uuid.uuid4())
            with state.lock:
                state.uploads.append(
                    {"meta": meta, "content_type": upload.content_type, "size": len(data)}
                )
                job = state.jobs[job_id]
                job["total"] += 1
                job["pending"].append((item_id, meta.sku))
            results.append({"index": n, "sku": meta.sku, "status": 202, "item_id": item_id})
        accepted = sum(r["status"] == 202 for r in results)
        return {
            "job_id": job_id,
            "accepted": accepted,
            "rejected": len(results) - accepted,
            "results": results,
        }

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        if job_id not in state.jobs:
            raise ProblemError(404, "Not Found", f"no job {job_id}")
        with state.lock:
            return _job_out(state.jobs[job_id])

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[StandIn]:
    state = StandIn()
    port = free_port()
    config = uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "stand-in gateway did not start"
        time.sleep(0.02)
    state.url = f"http://127.0.0.1:{port}"
    yield state
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def gateway(server: StandIn) -> StandIn:
    server.api_key = None
    server.uploads.clear()
    server.attempts.clear()
    server.attempt_times.clear()
    server.max_inflight = 0
    server.batches.clear()
    return server


def write_catalogue(folder: Path, skus: list[str], missing: tuple[str, ...] = ()) -> Path:
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["sku,title,category,price,image,colour"]
    for i, sku in enumerate(skus):
        if sku not in missing:
            Image.new("RGB", (16, 16), (i * 20 % 255, 80, 160)).save(images / f"{sku}.jpg")
        lines.append(f"{sku},Item {sku},shirt,{10 + i}.5,{sku}.jpg,blue")
    path = folder / "catalog.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ingest_reports_uploads_rejections_and_job_results(
    gateway: StandIn, tmp_path: Path
) -> None:
    skus = ["OK1", "OK2", "BAD1", "OK3", "FAIL1", "FLAKY1", "GONE1", "OK4"]
    path = write_catalogue(tmp_path, skus, missing=("GONE1",))

    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        concurrency=2,
        batch_size=1,
        poll_interval_s=0.01,
        retry=FAST_RETRY,
        progress=False,
    )

    assert summary.job_id in gateway.jobs
    assert summary.total_rows == 8
    assert summary.uploaded == 6
    assert set(summary.item_ids) == {"OK1", "OK2", "OK3", "OK4", "FAIL1", "FLAKY1"}
    assert summary.waited and not summary.timed_out
    assert (summary.done, summary.failed, summary.pending) == (5, 1, 0)
    assert summary.failures[0].sku == "FAIL1"  # filled in from the upload's item_id
    assert summary.failures[0].reason == "image could not be decoded"
    assert not summary.ok and summary.elapsed_s > 0

    by_sku = {r.sku: r for r in summary.rejected}
    assert set(by_sku) == {"BAD1", "GONE1"}
    assert by_sku["BAD1"].status == 422 and by_sku["BAD1"].source == "gateway"
    assert by_sku["BAD1"].reason == "image for BAD1 is not a valid picture"  # problem detail
    assert by_sku["BAD1"].line == 4
    assert by_sku["GONE1"].source == "catalogue" and by_sku["GONE1"].line == 8
    assert "image file not found" in by_sku["GONE1"].reason

    assert gateway.attempts["FLAKY1"] == 3  # two 503s, then accepted
    assert gateway.attempts["BAD1"] == 1  # a 422 is never retried
    assert gateway.max_inflight <= 2
    sent = {u["meta"].sku: u for u in gateway.uploads}
    assert sent["OK1"]["content_type"] == "image/jpeg" and sent["OK1"]["size"] > 0
    meta = sent["OK2"]["meta"]
    assert (meta.title, meta.category, meta.price) == ("Item OK2", "shirt", 11.5)
    assert meta.attributes == {"colour": "blue"}


def test_persistent_503_becomes_a_rejection(gateway: StandIn, tmp_path: Path) -> None:
    path = write_catalogue(tmp_path, ["DOWN1", "OK1"])
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        batch_size=1,
        retry=FAST_RETRY,
        progress=False,
        wait=False,
    )
    assert gateway.attempts["DOWN1"] == FAST_RETRY.attempts
    assert [(r.sku, r.status, r.reason) for r in summary.rejected] == [
        ("DOWN1", 503, "no embedder is alive")
    ]
    assert summary.uploaded == 1 and not summary.waited and summary.done == 0


def test_wait_times_out_with_counts_so_far(gateway: StandIn, tmp_path: Path) -> None:
    path = write_catalogue(tmp_path, ["OK1", "STUCK1"])
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        timeout_s=0.3,
        poll_interval_s=0.02,
        retry=FAST_RETRY,
        progress=False,
    )
    assert summary.timed_out and summary.done == 1 and summary.pending == 1
    assert not summary.ok


def test_api_key_is_sent_and_a_refusal_is_an_error(gateway: StandIn, tmp_path: Path) -> None:
    gateway.api_key = "s3cret"
    path = write_catalogue(tmp_path, ["OK1"])
    with pytest.raises(IngestError, match=r"HTTP 401.*missing or wrong X-API-Key"):
        ingest(path, tmp_path / "images", gateway.url, retry=FAST_RETRY, progress=False)
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        api_key="s3cret",
        poll_interval_s=0.01,
        retry=FAST_RETRY,
        progress=False,
    )
    assert summary.ok and summary.done == 1


def test_unreachable_gateway_is_an_error(tmp_path: Path) -> None:
    path = write_catalogue(tmp_path, ["OK1"])
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(IngestError, match="cannot reach the gateway"):
        ingest(path, tmp_path / "images", url, retry=FAST_RETRY, progress=False)


def test_bad_catalogue_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cat.csv").write_text("title\nx\n")
    with pytest.raises(IngestError, match="lacks column"):
        ingest(tmp_path / "cat.csv", tmp_path, "http://127.0.0.1:9", progress=False)


def test_progress_bars_and_summary_render(gateway: StandIn, tmp_path: Path) -> None:
    path = write_catalogue(tmp_path, ["OK1", "BAD1", "FAIL1"])
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        poll_interval_s=0.01,
        retry=FAST_RETRY,
        console=console,
    )
    print_summary(summary, console=console)
    text = out.getvalue()
    for expected in (
        "uploading",
        "embedding",
        "ingest summary",
        str(summary.job_id),
        "rejected rows",
        "image for BAD1 is not a valid picture",
        "failed items",
        "image could not be decoded",
    ):
        assert expected in text, expected


def test_empty_catalogue_opens_a_job_and_does_not_wait(gateway: StandIn, tmp_path: Path) -> None:
    (tmp_path / "cat.jsonl").write_text(json.dumps({"sku": "", "image": "x.jpg"}) + "\n")
    summary = ingest(tmp_path / "cat.jsonl", tmp_path, gateway.url, progress=False)
    assert summary.uploaded == 0 and not summary.waited
    assert [(r.line, r.reason) for r in summary.rejected] == [(1, "missing sku")]


def test_batches_go_in_one_request_each(gateway: StandIn, tmp_path: Path) -> None:
    skus = [f"OK{n}" for n in range(70)]
    skus[5], skus[40] = "BAD5", "FAIL40"
    path = write_catalogue(tmp_path, skus, missing=("OK7",))
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        batch_size=32,
        poll_interval_s=0.001,
        retry=FAST_RETRY,
        progress=False,
    )
    # 69 readable rows, consecutive ones in batches of at most 32 (sent concurrently).
    assert sorted(len(b) for b in gateway.batches) == [5, 32, 32]
    ordered = sorted(gateway.batches, key=lambda b: skus.index(b[0]))
    assert [s for b in ordered for s in b] == [s for s in skus if s != "OK7"]
    assert gateway.uploads and len(gateway.uploads) == 68
    assert summary.uploaded == 68 and len(summary.item_ids) == 68
    assert (summary.done, summary.failed) == (67, 1)
    by_sku = {r.sku: r for r in summary.rejected}
    assert by_sku["BAD5"].status == 422 and by_sku["BAD5"].line == 7
    assert by_sku["BAD5"].reason == "image for BAD5 is not a valid picture"
    assert by_sku["OK7"].source == "catalogue"
    sent = {u["meta"].sku: u for u in gateway.uploads}
    assert sent["OK1"]["meta"].attributes == {"colour": "blue"}
    assert sent["OK1"]["content_type"] == "image/jpeg"


def test_a_503_batch_is_resent_whole(gateway: StandIn, tmp_path: Path) -> None:
    path = write_catalogue(tmp_path, ["OK1", "FLAKY1", "OK2"])
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        poll_interval_s=0.001,
        retry=FAST_RETRY,
        progress=False,
    )
    assert gateway.batches == [["OK1", "FLAKY1", "OK2"]] * 3
    assert summary.ok and summary.uploaded == 3 and summary.done == 3


def test_batch_size_one_posts_items_one_by_one(gateway: StandIn, tmp_path: Path) -> None:
    path = write_catalogue(tmp_path, ["OK1", "OK2"])
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        batch_size=1,
        poll_interval_s=0.001,
        retry=FAST_RETRY,
        progress=False,
    )
    assert summary.ok and summary.uploaded == 2
    assert gateway.batches == [] and len(gateway.uploads) == 2


def test_429_is_retried_after_its_retry_after(gateway: StandIn, tmp_path: Path) -> None:
    """Over the gateway's rate limit: the request is sent again once Retry-After (1 s) has
    passed, not after the (much shorter) backoff; one item at a time and a whole batch."""
    path = write_catalogue(tmp_path, ["OK1", "LIMITED1", "OK2"])
    summary = ingest(
        path,
        tmp_path / "images",
        gateway.url,
        batch_size=1,
        poll_interval_s=0.01,
        retry=FAST_RETRY,
        progress=False,
    )
    assert summary.ok and summary.uploaded == 3 and summary.done == 3
    times = gateway.attempt_times["LIMITED1"]
    assert len(times) == 3  # two 429s, then accepted
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(times)), times
    assert gateway.attempts["OK1"] == 1

    gateway.attempt_times.clear()
    path = write_catalogue(tmp_path / "batch", ["OK3", "LIMITED2"])
    summary = ingest(
        path, tmp_path / "batch" / "images", gateway.url, poll_interval_s=0.01,
        retry=FAST_RETRY, progress=False,
    )  # fmt: skip
    assert summary.ok and summary.uploaded == 2
    assert gateway.batches[-3:] == [["OK3", "LIMITED2"]] * 3  # resent whole
    times = gateway.attempt_times["LIMITED2"]
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(times)), times


def test_persistent_429_becomes_a_rejection_and_long_retry_after_is_capped(
    gateway: StandIn, tmp_path: Path
) -> None:
    path = write_catalogue(tmp_path, ["THROTTLED1", "OK1"])
    policy = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.02, max_retry_after_s=0.2)
    started = time.monotonic()
    summary = ingest(
        path, tmp_path / "images", gateway.url, batch_size=1, retry=policy, progress=False,
        wait=False,
    )  # fmt: skip
    assert time.monotonic() - started < 10  # Retry-After: 30, capped at 0.2 s per wait
    assert gateway.attempts["THROTTLED1"] == policy.attempts
    times = gateway.attempt_times["THROTTLED1"]
    assert all(later - earlier >= 0.19 for earlier, later in itertools.pairwise(times)), times
    assert [(r.sku, r.status, r.reason) for r in summary.rejected] == [
        ("THROTTLED1", 429, "rate limit exceeded: 10 per 1 second")
    ]
    assert summary.uploaded == 1


def test_retry_after_as_seconds_or_http_date() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def answer(value: str | None) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value} if value is not None else {})

    assert retry_after_seconds(answer("7"), now) == 7.0
    assert retry_after_seconds(answer("Fri, 02 Jan 2026 03:04:15 GMT"), now) == 10.0
    assert retry_after_seconds(answer("Fri, 02 Jan 2026 03:00:00 GMT"), now) == 0.0  # past
    assert retry_after_seconds(answer("soon"), now) is None
    assert retry_after_seconds(answer(None), now) is None
