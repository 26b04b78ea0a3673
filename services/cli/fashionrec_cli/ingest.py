"""`fashionrec ingest`: upload a catalogue to the gateway and follow its embedding job.

One job is opened (`POST /v1/jobs`), the valid rows are posted in batches to
`POST /v1/items/batch?job_id=…` (one request and one embedding task per batch of up to
`batch_size` items; `batch_size=1` posts each row to `POST /v1/items`) by a small thread pool
(bounded concurrency keeps the gateway and the embed queue from being flooded), then the job is
polled until every accepted upload is done or failed. Only connection errors, 503 (a dependency
down) and 429 (over the gateway's rate limit) are retried, after the answer's Retry-After where
it has one (a batch is resent whole: same sku = same item, same bytes = same blob): anything
else is the server's verdict on the row or the batch and is reported, not repeated. All calls
go through `fashionrec_cli.client`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from fashionrec_shared.progress import progress_bar
from fashionrec_shared.schemas import BatchItemResult
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fashionrec_cli.catalog import CatalogError, CatalogRow, read_catalog
from fashionrec_cli.client import (
    DEFAULT_GATEWAY,
    GatewayClient,
    GatewayError,
    RetryPolicy,
    Upload,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_GATEWAY",
    "Failure",
    "IngestError",
    "IngestSummary",
    "Rejection",
    "RetryPolicy",
    "batches",
    "ingest",
    "print_summary",
]

DEFAULT_BATCH_SIZE = 32
# Kept under the gateway's default batch body limit (64 MiB) with room for multipart framing.
MAX_BATCH_BYTES = 32 * 1024 * 1024


class IngestError(Exception):
    """The ingest cannot run at all (gateway unreachable, job refused, bad catalogue file)."""


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


Outcome = Rejection | str  # why the row was refused, or its item_id


def _refused(row: CatalogRow, exc: GatewayError) -> Rejection:
    return Rejection(row.sku, exc.reason, row.line, exc.status)


def _read_row(row: CatalogRow) -> Upload | Rejection:
    try:
        return Upload.from_path(row.image_path)
    except OSError as exc:
        return Rejection(row.sku, f"cannot read image: {exc}", row.line, source="catalogue")


def _upload(client: GatewayClient, job_id: str, row: CatalogRow) -> Outcome:
    """Post one row; returns the item_id, or why it was refused."""
    image = _read_row(row)
    if isinstance(image, Rejection):
        return image
    try:
        return client.add_item(image, row.metadata(), job_id).item_id
    except GatewayError as exc:
        return _refused(row, exc)


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


def _batch_outcome(row: CatalogRow, result: BatchItemResult | None) -> Outcome:
    if result is None:
        return Rejection(row.sku, "the gateway's answer has no result for this row", row.line, 207)
    if result.status == 202 and result.item_id:
        return result.item_id
    return Rejection(row.sku, result.detail or result.title or "rejected", row.line, result.status)


def _upload_batch(
    client: GatewayClient, job_id: str, rows: list[CatalogRow]
) -> list[tuple[CatalogRow, Outcome]]:
    """Post rows in one request; per row the item_id, or why it was refused."""
    outcomes: list[tuple[CatalogRow, Outcome]] = []
    loaded: list[tuple[CatalogRow, Upload]] = []
    for row in rows:
        image = _read_row(row)
        if isinstance(image, Rejection):
            outcomes.append((row, image))
        else:
            loaded.append((row, image))
    if not loaded:
        return outcomes
    try:
        answer = client.add_items(
            [image for _, image in loaded], [row.metadata() for row, _ in loaded], job_id
        )
    except GatewayError as exc:
        return outcomes + [(row, _refused(row, exc)) for row, _ in loaded]
    results = {result.index: result for result in answer.results}
    return outcomes + [
        (row, _batch_outcome(row, results.get(n))) for n, (row, _) in enumerate(loaded)
    ]


def _upload_rows(
    client: GatewayClient, job_id: str, rows: list[CatalogRow], batch: bool
) -> list[tuple[CatalogRow, Outcome]]:
    if batch:
        return _upload_batch(client, job_id, rows)
    return [(row, _upload(client, job_id, row)) for row in rows]


def _wait_for_job(
    client: GatewayClient,
    job_id: str,
    summary: IngestSummary,
    progress: Progress,
    deadline: float,
    poll_interval_s: float,
) -> None:
    task = progress.add_task("embedding", total=summary.uploaded, note="")
    summary.waited = True
    skus = {item_id: sku for sku, item_id in summary.item_ids.items()}
    while True:
        try:
            job = client.job(job_id)
        except GatewayError as exc:
            raise IngestError(f"cannot read job {job_id}: {exc}") from exc
        summary.done, summary.failed, summary.job_status = job.done, job.failed, job.status
        summary.failures = [
            Failure(e.sku or skus.get(e.item_id or ""), e.item_id, e.error) for e in job.errors
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
    workers = max(concurrency, 1)
    with GatewayClient(
        gateway_url,
        api_key=api_key,
        max_connections=workers + 1,
        retry=retry,
        transport=transport,
    ) as client:
        try:
            job_id = summary.job_id = client.open_job("ingest").job_id
        except GatewayError as exc:
            raise IngestError(f"cannot open a job: {exc}") from exc
        with progress_bar(progress, console=console, note=True) as bar:
            task = bar.add_task("uploading", total=len(catalog.rows), note="")
            pool = ThreadPoolExecutor(max_workers=workers)
            size = max(batch_size, 1)
            groups = batches(catalog.rows, size) if size > 1 else [[r] for r in catalog.rows]
            try:
                futures = [
                    pool.submit(_upload_rows, client, job_id, group, size > 1) for group in groups
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
                _wait_for_job(client, job_id, summary, bar, deadline, poll_interval_s)
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
