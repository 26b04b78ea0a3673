"""`fashionrec up` with nothing configured: embedded Postgres, Redis and blob directory.

Ready within a bounded time, data survives a restart, Ctrl-C leaves no process behind, a killed
child is restarted, and one that keeps dying stops everything with a message naming it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
from fashionrec_cli.infra import free_port
from PIL import Image

from tests.e2e.conftest import clean_env, processes_using, start_up, stop_up, wait_ready

pytestmark = pytest.mark.e2e


def wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.2)


def index_size(url: str) -> int:
    return int(httpx.get(f"{url}/v1/index", timeout=10).json()["items_in_index"])


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 96), colour).save(out, "PNG")
    return out.getvalue()


def add_item(url: str, image: bytes, sku: str) -> str:
    accepted = httpx.post(
        f"{url}/v1/items",
        files={"image": ("x.png", image, "image/png")},
        data={"metadata": json.dumps({"sku": sku, "title": sku})},
        timeout=30,
    )
    assert accepted.status_code == 202, accepted.text
    return str(accepted.json()["item_id"])


def item_status(url: str, item_id: str) -> str:
    return str(httpx.get(f"{url}/v1/items/{item_id}", timeout=10).json()["status"])


def child_of(up: psutil.Process, marker: str) -> psutil.Process | None:
    """The direct child of `fashionrec up` whose command line contains `marker`."""
    for child in up.children():
        try:
            if marker in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                return child
        except psutil.NoSuchProcess:
            continue
    return None


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
        # `evaluate --index` below needs a build of all 7 items; "some index" is not enough:
        # the first run's timer may have built one holding only the first item.
        wait_for(lambda: index_size(url) == 7, 60, "the rebuild timer never built all 7 items")
        search = httpx.post(
            f"{url}/v1/search", files={"image": ("q.png", out.getvalue())}, timeout=60
        ).json()
        assert search["results"][0]["item_id"] == item_id and search["index_version"] is not None
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


def test_up_restarts_killed_children_and_serves_again(tmp_path: Path) -> None:
    """The issue's defect: SIGKILL of the embedder's main process (and of embedded Redis) made
    `up` exit and take everything down; now both come back and the stack serves again."""
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "up.log"
    env = clean_env()
    env["FASHIONREC_UP_RESTART_BACKOFF_S"] = "0.2"
    args = ["--port", str(port), "--data-dir", str(data_dir), "--weights", "random:0"]
    process = start_up(args, env, log_path)
    try:
        wait_ready(url, process, log_path, timeout=240)
        up = psutil.Process(process.pid)
        embedder, redis_server = child_of(up, "fashionrec_embedder"), child_of(up, "redis-server")
        assert embedder is not None and redis_server is not None
        embedder.kill()  # the main process only: its pool child lingers in its group
        redis_server.kill()

        def replaced(marker: str, old: psutil.Process) -> bool:
            new = child_of(up, marker)
            return new is not None and new.pid != old.pid

        wait_for(
            lambda: (
                process.poll() is None
                and replaced("fashionrec_embedder", embedder)
                and replaced("redis-server", redis_server)
            ),
            120,
            lambda: f"not restarted:\n{log_path.read_text()[-4000:]}",
        )
        wait_ready(url, process, log_path, timeout=120)
        # Serves: the restarted embedder embeds a new item and a search finds it.
        image = png((200, 40, 90))
        item_id = add_item(url, image, "after-restart")
        wait_for(lambda: item_status(url, item_id) == "indexed", 120, "item never indexed")
        search = httpx.post(f"{url}/v1/search", files={"image": ("q.png", image)}, timeout=60)
        assert search.status_code == 200, search.text
        assert search.json()["results"][0]["item_id"] == item_id
        text = log_path.read_text()
        assert "embedder-0 was killed by SIGKILL; restarting it" in text
        assert "redis was killed by SIGKILL; restarting it" in text
    finally:
        assert stop_up(process) == 0
    assert processes_using(data_dir) == []  # the killed embedder's pool child included


def test_up_stops_everything_when_a_child_crash_loops(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log_path = tmp_path / "up.log"
    env = clean_env()
    env.update(FASHIONREC_UP_RESTART_LIMIT="2", FASHIONREC_UP_RESTART_BACKOFF_S="0.1")
    missing = tmp_path / "no-such-weights.pt"
    args = ["--port", str(free_port()), "--data-dir", str(data_dir), "--weights", str(missing)]
    process = start_up(args, env, log_path)
    try:
        code = process.wait(240)
    finally:
        if process.poll() is None:
            stop_up(process)
    text = log_path.read_text()
    assert code == 1, text[-4000:]
    assert "embedder-0 keeps dying (last: it exited with code 1)" in text
    assert "restarted 2 times" in text
    assert "no-such-weights.pt' does not exist" in text  # its log tail
    assert processes_using(data_dir) == []
