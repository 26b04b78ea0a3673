"""A model change on the real stack: restart `fashionrec up` with another backbone and weights
(keeping the old model loaded) and watch the inventory being re-embedded and the new index
swapped in, while searches keep answering without a single failure. The change is from the
paper's ResNet50 (2048-d) to the packaged EfficientNet-Lite0 (regional pooling, 4160-d): another
dimension too."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from fashionrec_cli.infra import free_port
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb
from PIL import Image

from tests.e2e.conftest import clean_env, start_up, stop_up, wait_ready

pytestmark = pytest.mark.e2e

# Three re-embed batches for two embedder processes: a query is answered while the last batch
# still runs, so the stream sees the old version served during the change, then the new one.
ITEMS = 40
OLD, NEW = "resnet50-random-s0", "efficientnet-lite0-imagenet-57934424-reg3"


def jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def wait_until(what: str, predicate, timeout: float, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


class SearchStream(threading.Thread):
    """Searches over and over until stopped, recording every answer."""

    def __init__(self, url: str, photo: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.photo = url, photo
        self.answers: list[tuple[int, int, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                response = client.post(
                    "/v1/search", files={"image": ("q.jpg", self.photo, "image/jpeg")}
                )
                body = response.json()
                results = body.get("results") if response.status_code == 200 else None
                self.answers.append(
                    (response.status_code, len(results or []), body.get("model_version"))
                )


@pytest.mark.timeout(900)  # two stacks, an ingest, a re-embed and two builds
def test_model_change_reembeds_and_swaps_without_failed_searches(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--port", str(port), "--data-dir", str(data_dir)]
    env = clean_env()
    env.update(
        FASHIONREC_INDEXER_REBUILD_INTERVAL_S="1",
        FASHIONREC_INDEXER_REFRESH_INTERVAL_S="0.3",
    )
    specs = generate_catalog(ITEMS, seed=11, size=160)

    process = start_up(
        [*args, "--backbone", "resnet50", "--weights", "random:0"], env, tmp_path / "up1.log"
    )
    try:
        wait_ready(url, process, tmp_path / "up1.log", timeout=240)
        with httpx.Client(base_url=url, timeout=60) as client:
            job_id = client.post("/v1/jobs", json={"kind": "ingest"}).json()["job_id"]
            item_ids = []
            for spec in specs:
                metadata = {"sku": spec.sku, "title": spec.title, "category": spec.category}
                accepted = client.post(
                    "/v1/items",
                    params={"job_id": job_id},
                    files={"image": ("g.jpg", jpeg(make_garment(spec)), "image/jpeg")},
                    data={"metadata": json.dumps(metadata)},
                )
                assert accepted.status_code == 202, accepted.text
                item_ids.append(accepted.json()["item_id"])
            wait_until(
                "the ingest job",
                lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "completed",
                180,  # bounds on states, not sleeps: a loaded CI box is slow
            )
            wait_until(
                "the first index build",
                lambda: client.get("/v1/index").json()["items_in_index"] == ITEMS,
                120,
            )
            assert client.get("/v1/index").json()["model_version"] == OLD
    finally:
        assert stop_up(process) == 0

    # New backbone and weights; the served model stays loaded until the new index is in.
    env["FASHIONREC_EMBEDDER_PREVIOUS_WEIGHTS"] = "resnet50:random:0"
    process = start_up(
        [*args, "--backbone", "efficientnet-lite0", "--weights", "imagenet", "--embedders", "2"],
        env,
        tmp_path / "up2.log",
    )
    stream = SearchStream(url, jpeg(perturb(make_garment(specs[0]), seed=5)))
    try:
        wait_ready(url, process, tmp_path / "up2.log", timeout=240)
        stream.start()
        with httpx.Client(base_url=url, timeout=60) as client:
            info = wait_until(
                "the re-embed job to show in /v1/index",
                lambda: (i := client.get("/v1/index").json())["reembed_job_id"] and i,
                30,
            )
            assert info["model_version"] == OLD and info["pending_model_version"] == NEW
            job = wait_until(
                "the re-embed job to finish",
                lambda: (
                    (j := client.get(f"/v1/jobs/{info['reembed_job_id']}").json())["status"]
                    in ("completed", "failed")
                    and j
                ),
                180,
            )
            assert job["kind"] == "reembed" and job["status"] == "completed", job
            assert job["done"] == job["total"] == ITEMS and job["failed"] == 0
            wait_until(
                "the new index to be served",
                lambda: client.get("/v1/index").json()["model_version"] == NEW,
                120,
            )
            info = client.get("/v1/index").json()
            assert info["pending_model_version"] is None and info["items_in_index"] == ITEMS
            swapped = len(stream.answers)
            wait_until("searches after the swap", lambda: len(stream.answers) >= swapped + 3, 30)
            for item_id in item_ids:
                assert client.get(f"/v1/items/{item_id}").json()["model_version"] == NEW
    finally:
        stream.stop.set()
        stream.join(60)
        assert stop_up(process) == 0

    versions = [version for _, _, version in stream.answers]
    print(
        f"\nmodel change: {versions.count(OLD)} searches on {OLD}, {versions.count(NEW)} on {NEW}"
    )
    assert len(stream.answers) >= 5
    failed = [a for a in stream.answers if a[0] != 200 or a[1] != 5 or not a[2]]
    assert failed == [], f"{len(failed)} of {len(stream.answers)} searches failed: {failed[:5]}"
    assert set(versions) <= {OLD, NEW} and versions[-1] == NEW
    # Served by the old model, then the new one: never back.
    assert versions == sorted(versions, key=[OLD, NEW].index)
