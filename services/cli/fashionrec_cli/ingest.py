"""`fashionrec ingest`: upload a catalogue to the gateway and follow its embedding job.

One job is opened (`POST /v1/jobs`), the valid rows are posted in batches to
`POST /v1/items/batch?job_id=…` (one request and one embedding task per batch of up to
`batch_size` items; `batch_size=1` posts each row to `POST /v1/items`) by a small thread pool
(bounded concurrency keeps the gateway and the embed queue from being flooded), then the job is
polled until every accepted upload is done or failed. Only connection errors and 503 are retried
(a batch is resent whole: same sku = same item, same bytes = same blob): anything else is the
server's verdict on the row or the batch and is reported, not repeated. A gateway without the
batch route (404/405 naming no job) gets the rows one by one.
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from fashionrec_cli.catalog import CatalogError, CatalogRow, read_catalog

DEFAULT_GATEWAY = "http://127.0.0.1:8000"
DEFAULT_BATCH_SIZE = 32
# Kept under the gateway's default batch body limit (64 MiB) with room for multipart framing.
MAX_BATCH_BYTES = 32 * 1024 * 1024
_RETRY_STATUS = 503
# Connection-level failures where the request cannot have been processed: safe to resend.
_RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class IngestError(Exception):
    """The ingest cannot run at all (gateway unreachable, job refused, bad catalogue file)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    initial_wait_s: float = 0.5
    max_wait_s: float = 8.0


@dataclass(frozen=True)
class Rejection:
    """A row that never became an item: invalid in the catalogue or refused by the gateway."""

    sku: str | None
    reason: str
    line: int | None = None
    status: int | None = None
    source: Literal["catalogue", "gateway"] = "gateway"


@dataclass(frozen=True)
class Failure:
    """An accepted item whose processing failed (from the job's errors)."""

    sku: str | None
    item_id: str | None
    reason: str


@dataclass
class IngestSummary:
    job_id: str | None
    total_rows: int
    uploaded: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    done: int = 0
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)
    item_ids: dict[str, str] = field(default_factory=dict)  # sku -> item_id
    job_status: str | None = None
    waited: bool = False
    timed_out: bool = False
    elapsed_s: float = 0.0

    @property
    def pending(self) -> int:
        return max(self.uploaded - self.done - self.failed, 0)

    @property
    def ok(self) -> bool:
        """Every row uploaded and (when waited for) processed without failure."""
        return not self.rejected and not self.failed and not self.timed_out


class _Retryable(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def _retrying(policy: RetryPolicy) -> Retrying:
    return Retrying(
        retry=retry_if_exception(lambda e: isinstance(e, (*_RETRY_EXCEPTIONS, _Retryable))),
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential(multiplier=policy.initial_wait_s, max=policy.max_wait_s),
        reraise=True,
    )


def _send(policy: RetryPolicy, call: Callable[[], httpx.Response]) -> httpx.Response:
    """`call()` with retries on connection errors and 503; returns the last response."""
    try:
        for attempt in _retrying(policy):
            with attempt:
                response = call()
                if response.status_code == _RETRY_STATUS:
                    raise _Retryable(response)
                return response
    except _Retryable as exc:
        return exc.response
    raise AssertionError("unreachable")  # pragma: no cover


def problem_detail(response: httpx.Response) -> str:
    """The clearest reason in an error response: problem+json `detail`, else title, else text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "title"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
    text = response.text.strip()
    return text[:300] if text else f"HTTP {response.status_code}"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def _job_call(
    policy: RetryPolicy, request: Callable[[], httpx.Response], expected: int, what: str
) -> dict[str, Any]:
    """A job request with retries; any failure becomes an IngestError saying what was tried."""
    try:
        response = _send(policy, request)
    except httpx.HTTPError as exc:
        raise IngestError(f"cannot {what}: cannot reach the gateway ({exc})") from exc
    if response.status_code != expected:
        raise IngestError(
            f"cannot {what} (HTTP {response.status_code}): {problem_detail(response)}"
        )
    try:
        body = response.json()
        if not isinstance(body, dict) or "job_id" not in body:
            raise ValueError("no job_id")
        return body
    except ValueError as exc:
        raise IngestError(f"cannot {what}: unexpected answer {response.text[:200]}") from exc


def _open_job(client: httpx.Client, policy: RetryPolicy) -> str:
    body = _job_call(
        policy, lambda: client.post("/v1/jobs", json={"kind": "ingest"}), 201, "open a job"
    )
    return str(body["job_id"])


def _upload(
    client: httpx.Client, policy: RetryPolicy, job_id: str, row: CatalogRow
) -> Rejection | str:
    """Post one row; returns the item_id, or why it was refused."""
    read = _read_row(row)
    if isinstance(read, Rejection):
        return read
    data, content_type = read.data, read.content_type
    metadata = json.dumps(row.metadata())

    def call() -> httpx.Response:
        return client.post(
            "/v1/items",
            params={"job_id": job_id},
            files={"image": (row.image_path.name, data, content_type)},
            data={"metadata": metadata},
        )

    try:
        response = _send(policy, call)
    except httpx.HTTPError as exc:
        return Rejection(row.sku, f"upload failed: {exc!r}", row.line)
    if response.status_code == 202:
        try:
            return str(response.json()["item_id"])
        except (ValueError, KeyError, TypeError):
            return Rejection(row.sku, f"unexpected answer: {response.text[:200]}", row.line, 202)
    return Rejection(row.sku, problem_detail(response), row.line, response.status_code)


@dataclass(frozen=True)
class _Loaded:
    row: CatalogRow
    data: bytes
    content_type: str


def _read_row(row: CatalogRow) -> _Loaded | Rejection:
    try:
        data = row.image_path.read_bytes()
    except OSError as exc:
        return Rejection(row.sku, f"cannot read image: {exc}", row.line, source="catalogue")
    content_type = mimetypes.guess_type(row.image_path.name)[0] or "application/octet-stream"
    return _Loaded(row, data, content_type)


class _NoBatchRoute(Exception):
    """The gateway has no POST /v1/items/batch (an older one): fall back to single uploads."""


def batches(
    rows: list[CatalogRow], size: int, max_bytes: int = MAX_BATCH_BYTES
) -> list[list[CatalogRow]]:
    """Consecutive groups of at most `size` rows and (roughly) `max_bytes` of images."""
    out: list[list[CatalogRow]] = []
    current: list[CatalogRow] = []
    weight = 0
    for row in rows:
        try:
            nbytes = row.image_path.stat().st_size
        except OSError:
            nbytes = 0
        if current and (len(current) >= size or weight + nbytes > max_bytes):
            out.append(current)
            current, weight = [], 0
        current.append(row)
        weight += nbytes
    if current:
        out.append(current)
    return out


def _upload_batch(
    client: httpx.Client, policy: RetryPolicy, job_id: str, rows: list[CatalogRow]
) -> list[tuple[CatalogRow, Rejection | str]]:
    """Post rows in one request; per row the item_id, or why it was refused."""
    outcomes: list[tuple[CatalogRow, Rejection | str]] = []
    loaded: list[_Loaded] = []
    for row in rows:
        read = _read_row(row)
        if isinstance(read, Rejection):
            outcomes.append((row, read))
        else:
            loaded.append(read)
    if not loaded:
        return outcomes
    files = [("image", (x.row.image_path.name, x.data, x.content_type)) for x in loaded]
    metadata = json.dumps([x.row.metadata() for x in loaded])

    def call() -> httpx.Response:
        return client.post(
            "/v1/items/batch", params={"job_id": job_id}, files=files, data={"metadata": metadata}
        )

    try:
        response = _send(policy, call)
    except httpx.HTTPError as exc:
        reason = f"upload failed: {exc!r}"
        return outcomes + [(x.row, Rejection(x.row.sku, reason, x.row.line)) for x in loaded]
    detail = problem_detail(response) if response.status_code != 207 else ""
    if response.status_code in (404, 405) and "job" not in detail.lower():
        raise _NoBatchRoute(detail)
    if response.status_code != 207:
        return outcomes + [
            (x.row, Rejection(x.row.sku, detail, x.row.line, response.status_code)) for x in loaded
        ]
    try:
        results = {int(r["index"]): r for r in response.json()["results"]}
    except (ValueError, KeyError, TypeError):
        results = {}
    for n, x in enumerate(loaded):
        result = results.get(n)
        if result is None:
            reason = f"unexpected answer: {response.text[:200]}"
            outcomes.append((x.row, Rejection(x.row.sku, reason, x.row.line, 207)))
        elif result.get("status") == 202 and result.get("item_id"):
            outcomes.append((x.row, str(result["item_id"])))
        else:
            reason = str(result.get("detail") or result.get("title") or "rejected")
            outcomes.append((x.row, Rejection(x.row.sku, reason, x.row.line, result.get("status"))))
    return outcomes


def _upload_rows(
    client: httpx.Client, policy: RetryPolicy, job_id: str, rows: list[CatalogRow], batch: bool
) -> list[tuple[CatalogRow, Rejection | str]]:
    if batch:
        try:
            return _upload_batch(client, policy, job_id, rows)
        except _NoBatchRoute:
            pass
    return [(row, _upload(client, policy, job_id, row)) for row in rows]


def _progress(console: Console | None, enabled: bool) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _wait_for_job(
    client: httpx.Client,
    policy: RetryPolicy,
    summary: IngestSummary,
    progress: Progress,
    deadline: float,
    poll_interval_s: float,
) -> None:
    task = progress.add_task("embedding", total=summary.uploaded, note="")
    summary.waited = True
    while True:
        job = _job_call(
            policy,
            lambda: client.get(f"/v1/jobs/{summary.job_id}"),
            200,
            f"read job {summary.job_id}",
        )
        try:
            summary.done, summary.failed = int(job["done"]), int(job["failed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IngestError(f"cannot read job {summary.job_id}: unexpected answer {job}") from exc
        summary.job_status = job.get("status")
        skus = {item_id: sku for sku, item_id in summary.item_ids.items()}
        summary.failures = [
            Failure(
                e.get("sku") or skus.get(e.get("item_id")), e.get("item_id"), str(e.get("error"))
            )
            for e in job.get("errors") or []
        ]
        finished = summary.done + summary.failed
        progress.update(
            task, completed=min(finished, summary.uploaded), note=f"{summary.failed} failed"
        )
        if finished >= summary.uploaded:
            return
        if time.monotonic() >= deadline:
            summary.timed_out = True
            return
        time.sleep(poll_interval_s)


def ingest(
    catalog_path: Path | str,
    images_dir: Path | str | None,
    gateway_url: str = DEFAULT_GATEWAY,
    *,
    api_key: str | None = None,
    concurrency: int = 4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    wait: bool = True,
    timeout_s: float = 900.0,
    poll_interval_s: float = 1.0,
    retry: RetryPolicy = RetryPolicy(),
    progress: bool = True,
    console: Console | None = None,
    transport: httpx.BaseTransport | None = None,
) -> IngestSummary:
    """Upload every valid row of a catalogue into one job and (optionally) wait for it.

    `timeout_s` bounds the wait for processing after the uploads; on expiry the summary says
    `timed_out` and still carries the counts seen so far. Raises IngestError when the catalogue
    file is unusable or the gateway cannot be reached / refuses the job.
    """
    started = time.monotonic()
    try:
        catalog = read_catalog(catalog_path, images_dir)
    except CatalogError as exc:
        raise IngestError(str(exc)) from exc
    summary = IngestSummary(job_id=None, total_rows=catalog.total)
    summary.rejected.extend(
        Rejection(e.sku, e.message, e.line, source="catalogue") for e in catalog.errors
    )
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 1)
    timeout = httpx.Timeout(60.0, connect=10.0)
    with httpx.Client(
        base_url=gateway_url.rstrip("/"),
        headers=_headers(api_key),
        timeout=timeout,
        limits=limits,
        transport=transport,
    ) as client:
        summary.job_id = _open_job(client, retry)
        with _progress(console, progress) as bar:
            task = bar.add_task("uploading", total=len(catalog.rows), note="")
            pool = ThreadPoolExecutor(max_workers=max(concurrency, 1))
            size = max(batch_size, 1)
            groups = batches(catalog.rows, size) if size > 1 else [[r] for r in catalog.rows]
            try:
                futures = [
                    pool.submit(_upload_rows, client, retry, summary.job_id, group, size > 1)
                    for group in groups
                ]
                for future in as_completed(futures):
                    for row, result in future.result():
                        if isinstance(result, Rejection):
                            summary.rejected.append(result)
                        else:
                            summary.uploaded += 1
                            summary.item_ids[row.sku] = result
                        bar.update(task, advance=1, note=f"{len(summary.rejected)} rejected")
            finally:
                # On Ctrl-C do not wait for the queued uploads, only for those in flight.
                pool.shutdown(wait=True, cancel_futures=True)
            if wait and summary.uploaded:
                deadline = time.monotonic() + timeout_s
                _wait_for_job(client, retry, summary, bar, deadline, poll_interval_s)
    summary.rejected.sort(key=lambda r: (r.line is None, r.line or 0))
    summary.elapsed_s = time.monotonic() - started
    return summary


def print_summary(summary: IngestSummary, console: Console | None = None, limit: int = 20) -> None:
    """Counts, then the first `limit` rejected rows and failed items with their reasons."""
    console = console or Console()
    counts = Table(title="ingest summary", show_header=False)
    counts.add_column("what")
    counts.add_column("count", justify="right")
    counts.add_row("job", summary.job_id or "-")
    counts.add_row("rows", str(summary.total_rows))
    counts.add_row("uploaded", f"[green]{summary.uploaded}[/]")
    counts.add_row("rejected", f"[red]{len(summary.rejected)}[/]" if summary.rejected else "0")
    if summary.waited:
        counts.add_row("indexed", f"[green]{summary.done}[/]")
        counts.add_row("failed", f"[red]{summary.failed}[/]" if summary.failed else "0")
        if summary.timed_out:
            counts.add_row("still pending", f"[yellow]{summary.pending}[/] (timed out)")
    counts.add_row("elapsed", f"{summary.elapsed_s:.1f} s")
    console.print(counts)

    if summary.rejected:
        table = Table(title="rejected rows")
        for column in ("line", "sku", "status", "reason"):
            table.add_column(column)
        for r in summary.rejected[:limit]:
            status = str(r.status) if r.status else r.source
            table.add_row(str(r.line or "-"), r.sku or "-", status, r.reason)
        console.print(table)
        if len(summary.rejected) > limit:
            console.print(f"… and {len(summary.rejected) - limit} more rejected rows")
    if summary.failures:
        table = Table(title="failed items")
        for column in ("sku", "item_id", "reason"):
            table.add_column(column)
        for f in summary.failures[:limit]:
            table.add_row(f.sku or "-", f.item_id or "-", f.reason)
        console.print(table)
        if len(summary.failures) > limit:
            console.print(f"… and {len(summary.failures) - limit} more failures")
