"""Start `fashionrec up` (embedded services, temporary data dir) for a benchmark, and stop it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fashionrec_cli.infra import free_port


@dataclass
class BenchStack:
    url: str
    work: Path
    env: dict[str, str]
    seconds_to_ready: float


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHIONREC_")}
    for key in ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


@contextmanager
def running_stack(
    weights: str, extra_env: dict[str, str] | None = None, embedders: int = 1
) -> Iterator[BenchStack]:
    work = Path(tempfile.mkdtemp(prefix="fashionrec-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(extra_env)
    log = open(work / "up.log", "wb")  # noqa: SIM115 - the child's log for its lifetime
    started = time.monotonic()
    up = subprocess.Popen(
        [sys.executable, "-m", "fashionrec_cli", "up", "--port", str(port),
         "--data-dir", str(work / "data"), "--weights", weights, "--embedders", str(embedders)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while True:
            if up.poll() is not None:
                sys.exit(f"fashionrec up exited; see {work / 'up.log'}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield BenchStack(url, work, env, time.monotonic() - started)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
        log.close()


def ingest(stack: BenchStack, catalog: Path, images: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "fashionrec_cli", "ingest", str(catalog), "--images", str(images),
         "--gateway", stack.url],
        check=True, env=stack.env, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def jpeg_bytes(img, quality: int = 85) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
