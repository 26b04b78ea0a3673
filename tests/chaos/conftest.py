"""Fault injection against the real `fashionrec up`: kills, outages, corruption, a full disk.

Each test module gets one stack (`chaos_stack`): the real `fashionrec up` with embedded
Postgres, Redis and blob directory (never the session's shared servers: they are killed here),
random:0 weights at a small input size (the fastest model the stack serves) and short timers,
so that what the faults break comes back within a test: the pending sweep re-queues an item
pending for 6 s, the rebuild timer runs every 3 s, the supervisor restarts after 0.2 s.

The faults are real: SIGKILL/SIGSTOP of the processes `up` runs (found through psutil as its
children, or through postmaster.pid), files overwritten under the running indexer, and a blob
directory on a small tmpfs where this user may mount one (root); elsewhere the blob store's
writes fail with ENOSPC through `inject/sitecustomize.py` (FASHIONREC_CHAOS_DISK=inject forces
that mode; `tmpfs` forces the mount). FASHIONREC_CHAOS_KEEP_LOGS=DIR keeps every stack's logs.

Every test ends with the invariant (`ChaosStack.assert_invariant`): every item accepted so far
ends `indexed`, or `failed` with a reason, and searches answer again within a bound. The module
teardown stops the stack and checks that no process is left behind. Tests wait for states (poll
with a deadline), never for fixed times.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from fashionrec_cli.infra import free_port
from fashionrec_cli.ingest import IngestSummary, RetryPolicy, ingest
from fashionrec_cli.stack import read_stack_env
from fashionrec_cli.synthetic import generate_catalog, write_catalog
from PIL import Image

from tests.conftest import private_dir
from tests.e2e.conftest import clean_env, processes_using, start_up, stop_up, wait_ready

INJECT_DIR = Path(__file__).parent / "inject"
BLOBS_TMPFS_MB = 64

# Short settings: lost tasks are re-sent within seconds, and the stack serves the fastest model.
CHAOS_ENV = {
    "FASHIONREC_EMBEDDER_POOLING": "global",
    "FASHIONREC_EMBEDDER_IMAGE_SIZE": "160",
    "FASHIONREC_EMBEDDER_RUNTIME": "torch",
    "FASHIONREC_INDEXER_PENDING_TIMEOUT_S": "6",
    "FASHIONREC_INDEXER_PENDING_SWEEP_INTERVAL_S": "1",
    "FASHIONREC_INDEXER_PENDING_MAX_REQUEUES": "3",
    "FASHIONREC_INDEXER_REBUILD_INTERVAL_S": "3",
    "FASHIONREC_INDEXER_REFRESH_INTERVAL_S": "0.5",
    "FASHIONREC_INDEXER_SETTLE_S": "1",
    "FASHIONREC_UP_RESTART_BACKOFF_S": "0.2",
    "FASHIONREC_GATEWAY_INDEXER_TIMEOUT_S": "3",
    "FASHIONREC_GATEWAY_EMBED_TIMEOUT_S": "10",
    "FASHIONREC_GATEWAY_RETRY_AFTER_S": "1",
}
# An answer to any request: the slowest honest one is the embed timeout (10 s) plus a little.
ANSWER_WITHIN_S = 15.0
# What a client may see while a dependency is down: an answer, never a 500 or a 502.
OUTAGE_STATUSES = {503, 504}
# Patient enough for an ingest to outlive a Redis restart (the default gives up after ~8 s).
INGEST_RETRY = RetryPolicy(attempts=10, initial_wait_s=0.25, max_wait_s=2.0)
# Items per ingest of the tests that kill mid-batch: one embed task (they hold up to 32).
N = 30


def wait_for(
    condition: Callable[[], object], timeout: float, what: str | Callable[[], str], poll=0.05
) -> object:
    """Poll `condition` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(what() if callable(what) else what)
        time.sleep(poll)


def is_problem(response: httpx.Response, status: int) -> bool:
    return response.status_code == status and response.headers.get("content-type", "").startswith(
        "application/problem+json"
    )


def noisy_png(side: int, seed: int) -> bytes:
    """A PNG that does not compress: side * side * 3 bytes, for writes that must not fit."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    """A small tmpfs at `path` if this user may mount one (Linux, root); else False."""
    wanted = os.environ.get("FASHIONREC_CHAOS_DISK", "auto")
    if wanted == "inject" or sys.platform != "linux":
        return False
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        if wanted == "tmpfs":
            pytest.fail(f"cannot mount a tmpfs at {path}: {done.stderr if done else 'no mount'}")
        return False
    return True


@dataclass
class ChaosStack:
    url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    work: Path
    disk_mode: str  # "tmpfs": the blob directory is a small tmpfs; "inject": ENOSPC injected
    full_flag: Path  # inject mode: blob writes fail while this file exists
    accepted: dict[str, str] = field(default_factory=dict)  # item_id -> sku, every test's
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=ANSWER_WITHIN_S))

    # ---- the processes -------------------------------------------------------------------

    @property
    def up(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def child(self, marker: str) -> psutil.Process | None:
        """The live direct child of `up` whose command line contains `marker`."""
        for proc in self.up.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if marker in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                    return proc
        return None

    def embedder(self) -> psutil.Process:
        return wait_for(lambda: self.child("fashionrec_embedder"), 60, "no embedder")  # type: ignore[return-value]

    def pool_child(self) -> psutil.Process:
        def live_child() -> psutil.Process | None:
            children = [p for p in self.embedder().children() if p.is_running()]
            return children[0] if children else None

        return wait_for(live_child, 60, "the embedder has no pool child")  # type: ignore[return-value]

    def postmaster(self) -> psutil.Process:
        pid = int((self.data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        return psutil.Process(pid)

    def supervisor_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def service_log(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def stack_env(self) -> dict[str, str]:
        return read_stack_env(self.data_dir)

    # ---- the API -------------------------------------------------------------------------

    def search(self, image: bytes, k: int = 10) -> httpx.Response:
        return self.http.post(
            f"{self.url}/v1/search",
            params={"k": k},
            files={"image": ("q.jpg", image, "image/jpeg")},
        )

    def index(self) -> dict:
        response = self.http.get(f"{self.url}/v1/index")
        response.raise_for_status()
        return response.json()

    def item(self, item_id: str) -> dict:
        response = self.http.get(f"{self.url}/v1/items/{item_id}")
        response.raise_for_status()
        return response.json()

    def catalogue(self, seed: int, n: int = 30, size: int = 384) -> tuple[Path, Path, list]:
        folder = self.work / f"catalogue-{seed}"
        specs = generate_catalog(n, seed=seed, size=size)
        return write_catalog(specs, folder, fmt="csv"), folder, specs

    def ingest(self, catalog: Path, folder: Path, **options) -> IngestSummary:  # type: ignore[no-untyped-def]
        options = {"retry": INGEST_RETRY, "poll_interval_s": 0.1, "timeout_s": 240, **options}
        summary = ingest(catalog, folder, self.url, progress=False, **options)
        self.accepted.update({item_id: sku for sku, item_id in summary.item_ids.items()})
        return summary

    def ingest_in_background(self, catalog: Path, folder: Path, **options) -> Future[IngestSummary]:  # type: ignore[no-untyped-def]
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chaos-ingest")
        future = pool.submit(self.ingest, catalog, folder, **options)
        pool.shutdown(wait=False)
        return future

    # ---- waiting for states --------------------------------------------------------------

    def embed_task_running(self, log_offset: int) -> str | None:
        """The id of an embed_items task the embedder took (after `log_offset` of its log) and
        has not finished: with prefetch 1 and one pool process, the one it is embedding."""
        text = self.service_log("embedder-0").read_bytes()[log_offset:].decode(errors="replace")
        received = re.findall(r"embed_items\[([0-9a-f-]{36})\] received", text)
        done = r"embed_items\[([0-9a-f-]{36})\] (?:succeeded|raised|retry)"
        finished = set(re.findall(done, text))
        running = [task for task in received if task not in finished]
        return running[-1] if running else None

    def wait_serving(self, image: bytes, timeout: float = 60) -> httpx.Response:
        """Poll searches until one answers 200; meanwhile only outage answers are allowed."""

        def answered() -> httpx.Response | None:
            try:
                response = self.search(image)
            except httpx.TransportError:
                return None  # the gateway itself restarting
            assert response.status_code == 200 or response.status_code in OUTAGE_STATUSES, (
                response.status_code,
                response.text,
            )
            return response if response.status_code == 200 else None

        return wait_for(answered, timeout, "searches never answered 200 again", poll=0.2)  # type: ignore[return-value]

    def assert_invariant(self, probe: bytes, timeout: float = 90) -> dict[str, int]:
        """Every accepted item ends indexed (or failed with a reason); searches answer."""
        statuses: dict[str, dict] = {}

        def settled() -> bool:
            for item_id in self.accepted:
                if statuses.get(item_id, {}).get("status") not in ("indexed", "failed"):
                    try:
                        statuses[item_id] = self.item(item_id)
                    except httpx.HTTPError:
                        return False
            return all(s["status"] in ("indexed", "failed") for s in statuses.values())

        wait_for(
            settled,
            timeout,
            lambda: (
                "items still pending: "
                + ", ".join(i for i, s in statuses.items() if s.get("status") == "pending")
            ),
            poll=0.25,
        )
        failed = {i: s for i, s in statuses.items() if s["status"] == "failed"}
        assert all(s.get("error") for s in failed.values()), failed
        self.wait_serving(probe)
        return {"indexed": len(statuses) - len(failed), "failed": len(failed)}


def image_sha_ok(path: Path) -> bool:
    """A content-addressed blob is whole: its name is the sha256 of its bytes."""
    return path.stem == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chaos_stack(request: pytest.FixtureRequest) -> Iterator[ChaosStack]:
    with private_dir("fashionrec-chaos-") as work:
        data_dir = work / "data"
        blobs = data_dir / "blobs"
        mounted = _mount_tmpfs(blobs, BLOBS_TMPFS_MB)
        full_flag = work / "disk-full"
        env = clean_env()
        env.update(CHAOS_ENV)
        env.update(getattr(request.module, "STACK_ENV", {}))  # a module's own settings
        if not mounted:
            env["FASHIONREC_CHAOS_DISK_FULL"] = str(full_flag)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(INJECT_DIR), env.get("PYTHONPATH", "")) if p
            )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = work / "up.log"
        args = ["--port", str(port), "--data-dir", str(data_dir), "--weights", "random:0"]
        started = time.monotonic()
        process = start_up(args, env, log_path)
        stack = ChaosStack(
            url, data_dir, log_path, process, work, "tmpfs" if mounted else "inject", full_flag
        )
        try:
            try:
                seconds = wait_ready(url, process, log_path, timeout=240)
                print(f"\nchaos stack ({stack.disk_mode} disk) ready in {seconds:.1f}s")
                yield stack
            finally:
                stack.http.close()
                code = stop_up(process)
            print(f"chaos stack: {time.monotonic() - started:.1f}s from start to stopped")
            assert code == 0, stack.supervisor_log()[-4000:]
            assert processes_using(data_dir) == [], "processes left behind"
        finally:
            if process.poll() is None:
                process.kill()
            keep = os.environ.get("FASHIONREC_CHAOS_KEEP_LOGS")  # a folder: logs kept there
            if keep:
                target = Path(keep) / f"{request.module.__name__.rsplit('.', 1)[-1]}-{port}"
                shutil.copytree(data_dir / "logs", target / "logs", dirs_exist_ok=True)
                shutil.copy(log_path, target / "up.log")
            if mounted:
                subprocess.run(["umount", "-l", str(blobs)], capture_output=True, timeout=30)


def start_ingest_and_wait_mid_batch(
    stack: ChaosStack, seed: int, **options: object
) -> tuple[Future[IngestSummary], str, int, bytes]:
    """Start ingesting N items; return once the embedder is embedding one of their tasks."""
    catalog, folder, specs = stack.catalogue(seed, N)
    offset = stack.service_log("embedder-0").stat().st_size
    future = stack.ingest_in_background(catalog, folder, **options)
    task = wait_for(
        lambda: stack.embed_task_running(offset) or future.done(),
        120,
        "the embedder never took the catalogue's embed task",
        poll=0.02,
    )
    assert isinstance(task, str), f"the ingest ended before any embedding: {future.result()}"
    probe = (Path(folder) / "images" / specs[0].image_name).read_bytes()
    return future, task, offset, probe


def assert_ingested(summary: IngestSummary) -> None:
    """All N accepted (outage answers were retried), and the job saw every one finish."""
    assert summary.uploaded == N and not summary.rejected, summary.rejected[:3]
    assert not summary.timed_out and summary.done + summary.failed == N, summary


def assert_found(stack: ChaosStack, probe: bytes, summary: IngestSummary, sku: str) -> None:
    response = stack.wait_serving(probe)
    assert summary.item_ids[sku] in [hit["item_id"] for hit in response.json()["results"]]
