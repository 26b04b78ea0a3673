"""`fashionrec up` with nothing configured: embedded Postgres, Redis and blob directory.

Ready within a bounded time, data survives a restart, Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from fashionrec_cli.infra import free_port
from PIL import Image

from tests.e2e.conftest import clean_env, start_up, stop_up, wait_ready

pytestmark = pytest.mark.e2e


def processes_using(path: Path) -> list[psutil.Process]:
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


def test_up_embedded_restart_and_clean_stop(tmp_path: Path, record_property) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--port", str(port), "--data-dir", str(data_dir), "--weights", "random:0"]
    env = clean_env()
    env["FASHIONREC_INDEXER_REBUILD_INTERVAL_S"] = "2"  # the timer builds even a single new item

    process = start_up(args, env, tmp_path / "up1.log")
    try:
        seconds = wait_ready(url, process, tmp_path / "up1.log", timeout=240)
        record_property("seconds_to_ready", seconds)
        print(f"\nfashionrec up: ready in {seconds:.1f}s")
        out = io.BytesIO()
        Image.new("RGB", (96, 96), (10, 120, 200)).save(out, "PNG")
        accepted = httpx.post(
            f"{url}/v1/items",
            files={"image": ("x.png", out.getvalue(), "image/png")},
            data={"metadata": json.dumps({"sku": "persist-1", "title": "kept"})},
            timeout=30,
        )
        assert accepted.status_code == 202, accepted.text
        item_id = accepted.json()["item_id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/items/{item_id}").json()["status"] == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        demo = subprocess.run(
            [sys.executable, "-m", "fashionrec_cli", "demo", "--count", "6", "--gateway", url,
             "--out", str(tmp_path / "demo")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert demo.returncode == 0, demo.stdout + demo.stderr
        cells = [
            [cell.strip() for cell in line.strip("│").split("│")]
            for line in (demo.stdout + demo.stderr).splitlines()
            if line.count("│") == 3
        ]
        rows = {cell[0]: cell[1] for cell in cells}
        assert rows.get("uploaded") == "6" and rows.get("indexed") == "6", demo.stderr
    finally:
        assert stop_up(process) == 0
    assert processes_using(data_dir) == []
    assert not (data_dir / "stack.env").exists()
    assert (data_dir / "postgres" / "PG_VERSION").exists()
    assert any((data_dir / "blobs" / "inventory").iterdir())

    process = start_up(args, env, tmp_path / "up2.log")
    try:
        wait_ready(url, process, tmp_path / "up2.log", timeout=240)
        item = httpx.get(f"{url}/v1/items/{item_id}", timeout=10)
        assert item.status_code == 200
        assert item.json()["status"] == "indexed" and item.json()["title"] == "kept"
        deadline = time.monotonic() + 60
        while True:
            search = httpx.post(
                f"{url}/v1/search", files={"image": ("q.png", out.getvalue())}, timeout=60
            ).json()
            assert search["results"][0]["item_id"] == item_id
            if search["index_version"] is not None:
                break  # the rebuild timer indexed it
            assert time.monotonic() < deadline, "the rebuild timer never built an index"
            time.sleep(0.5)
        # Operators' own commands reach the running stack through its data directory.
        exports = subprocess.run(
            [sys.executable, "-m", "fashionrec_cli", "env", "--data-dir", str(data_dir)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert exports.returncode == 0 and "export DATABASE_URL=" in exports.stdout
        report = tmp_path / "index-eval.json"
        evaluated = subprocess.run(
            [sys.executable, "-m", "fashionrec_cli", "evaluate", "--index", "--data-dir",
             str(data_dir), "--samples", "5", "--k", "3", "--json", str(report)],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
        figures = json.loads(report.read_text())
        assert 0.0 <= figures["recall"] <= 1.0 and figures["annoy_ms_median"] >= 0
    finally:
        assert stop_up(process) == 0
    assert processes_using(data_dir) == []
