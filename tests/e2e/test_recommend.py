"""POST /v1/recommend through the whole running stack: every input mix, variants collapse,
explanations, bad input, and `fashionrec recommend` (the real CLI) against it."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fashionrec_cli.synthetic import generate_catalog, make_garment, perturb
from fashionrec_shared.schemas import MAX_RECOMMEND_PHOTOS
from PIL import Image

from tests.e2e.conftest import IngestedCatalog, RunningStack, ingest_with_cli
from tests.e2e.test_bad_input import assert_problem

pytestmark = pytest.mark.e2e

GROUP = "E2E-VARIANTS"
VARIANTS = 3


def jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def part(name: str, data: bytes) -> tuple[str, tuple[str, bytes, str]]:
    return (name, (f"{name}.jpg", data, "image/jpeg"))


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    ids = [r["item_id"] for r in body["results"]]
    assert len(ids) == len(set(ids))
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    return body


def ids_of(body: dict[str, Any]) -> list[str]:
    return [r["item_id"] for r in body["results"]]


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> httpx.Client:
    with httpx.Client(base_url=stack.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def catalog(ingested_catalog: IngestedCatalog) -> IngestedCatalog:
    return ingested_catalog


def item_id(client: httpx.Client, catalog: IngestedCatalog, n: int) -> str:
    """The id of the catalogue's item n: the top hit of a search with its own image."""
    spec = catalog.specs[n]
    files = [("image", ("q.jpg", catalog.image(spec).read_bytes()))]
    top = ok(client.post("/v1/search", params={"k": 1}, files=files))
    hit = top["results"][0]
    assert hit["sku"] == spec.sku
    return hit["item_id"]


def photo(catalog: IngestedCatalog, n: int, seed: int = 1) -> bytes:
    """A new photo of the catalogue's item n."""
    return jpeg(perturb(make_garment(catalog.specs[n]), seed=seed))


@pytest.fixture(scope="module")
def variants(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three variants of one product (one `group`), ingested by the CLI from a catalogue with a
    group column; their skus."""
    out = tmp_path_factory.mktemp("variants")
    (out / "images").mkdir()
    base = generate_catalog(1, seed=4242)[0]
    rows = []
    for n in range(VARIANTS):
        spec = dataclasses.replace(base, sku=f"E2E-VAR-{n}", title=f"variant {n}")
        perturb(make_garment(spec), seed=n).convert("RGB").save(out / "images" / spec.image_name)
        rows.append([spec.sku, spec.title, spec.category, "20", f"images/{spec.image_name}", GROUP])
    path = out / "catalog.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sku", "title", "category", "price", "image", "group"])
        writer.writerows(rows)
    ingest_with_cli(stack, path, out)
    return [row[0] for row in rows]


# ---- the input mixes --------------------------------------------------------------------------


def test_photos_only(client: httpx.Client, catalog: IngestedCatalog) -> None:
    files = [part("like", photo(catalog, 0)), part("like", photo(catalog, 1))]
    body = ok(client.post("/v1/recommend", params={"k": 5}, files=files))
    results = body["results"]
    assert len(results) == 5 and body["predicted"] is None
    skus = {r["sku"] for r in results}
    # Each liked photo's own item is among the closest.
    assert {catalog.specs[0].sku, catalog.specs[1].sku} <= skus
    for r in results:
        assert r["reasons"]["score"] == pytest.approx(r["score"])
        assert r["reasons"]["like"] in (0, 1)
        assert r["image_url"].startswith(f"{client.base_url}/v1/images/inventory/")
    # Dominant colours are computed at embed time and stored with every item.
    assert all(r["colours"] for r in results)


def test_item_ids_only_as_json(client: httpx.Client, catalog: IngestedCatalog) -> None:
    liked = item_id(client, catalog, 2)
    body = ok(client.post("/v1/recommend", json={"like_items": [liked]}))
    assert len(body["results"]) == 5 and liked not in ids_of(body)
    # One liked item is its stored vector as the query: much the same items as similar gives
    # (both approximate nearest neighbours).
    similar = ok(client.get(f"/v1/items/{liked}/similar", params={"k": 5}))
    assert len(set(ids_of(body)) & set(ids_of(similar))) >= 3


def test_a_mix_of_photos_and_ids_in_one_form(
    client: httpx.Client, catalog: IngestedCatalog
) -> None:
    liked, disliked = item_id(client, catalog, 3), item_id(client, catalog, 4)
    files = [part("like", photo(catalog, 5)), part("dislike", photo(catalog, 6))]
    data = {"like_item": liked, "dislike_item": disliked}
    body = ok(client.post("/v1/recommend", params={"k": 5}, files=files, data=data))
    assert len(body["results"]) == 5
    assert not {liked, disliked} & set(ids_of(body))
    assert {r["reasons"]["like"] for r in body["results"]} <= {0, 1}


@pytest.mark.parametrize("strategy", ["average", "best_score"])
def test_a_disliked_photo_pushes_its_look_out(
    client: httpx.Client, catalog: IngestedCatalog, strategy: str
) -> None:
    liked = [part("like", photo(catalog, 7))]
    before = ok(client.post("/v1/recommend", params={"strategy": strategy}, files=liked))
    # The closest other item, disliked by a photo of it (not by id: ids never answer anyway).
    neighbour = next(r for r in before["results"] if r["sku"] != catalog.specs[7].sku)
    n = next(i for i, s in enumerate(catalog.specs) if s.sku == neighbour["sku"])
    params = {"strategy": strategy, "negative_weight": 1.0}
    after = ok(client.post("/v1/recommend", params=params,
                           files=[*liked, part("dislike", photo(catalog, n, seed=2))]))  # fmt: skip
    scores = {r["item_id"]: r["score"] for r in after["results"]}
    if strategy == "average":  # the query moved away from it: it scores below zero
        assert neighbour["item_id"] not in scores
    else:  # penalised by how much closer it is to the disliked photo than to the liked one
        assert scores.get(neighbour["item_id"], -2.0) < neighbour["score"]
    assert catalog.specs[7].sku in {r["sku"] for r in after["results"]}


def test_exclude_items_already_shown(client: httpx.Client, catalog: IngestedCatalog) -> None:
    liked = item_id(client, catalog, 8)
    first = ok(client.post("/v1/recommend", json={"like_items": [liked]}, params={"k": 4}))
    shown = ids_of(first)
    nxt = ok(client.post("/v1/recommend", json={"like_items": [liked], "exclude": shown},
                         params={"k": 4}))  # fmt: skip
    assert len(nxt["results"]) == 4 and not set(shown) & set(ids_of(nxt))
    # The next page continues where the first ended: its scores are no higher.
    assert nxt["results"][0]["score"] <= first["results"][-1]["score"] + 1e-6


def test_min_score_cuts_the_tail(client: httpx.Client, catalog: IngestedCatalog) -> None:
    liked = {"like_items": [item_id(client, catalog, 9)]}
    full = ok(client.post("/v1/recommend", json=liked, params={"k": 10}))
    threshold = full["results"][2]["score"]
    cut = ok(client.post("/v1/recommend", json=liked, params={"k": 10, "min_score": threshold}))
    assert 1 <= len(cut["results"]) <= 3
    assert all(r["score"] >= threshold - 1e-6 for r in cut["results"])


def test_variants_collapse_to_one_per_group(client: httpx.Client, variants: list[str]) -> None:
    query = {"k": 5}
    with_group = [("like", ("v.jpg", _variant_photo(), "image/jpeg"))]
    collapsed = ok(client.post("/v1/recommend", params=query, files=with_group))
    grouped = [r for r in collapsed["results"] if r["group"] == GROUP]
    assert len(grouped) == 1 and grouped[0]["sku"] in variants
    every = ok(client.post("/v1/recommend", params={**query, "collapse": "false"},
                           files=with_group))  # fmt: skip
    assert {r["sku"] for r in every["results"] if r["group"] == GROUP} == set(variants)
    # Search collapses the same way.
    searched = ok(client.post("/v1/search", params=query, files=[("image", with_group[0][1])]))
    assert len([r for r in searched["results"] if r["group"] == GROUP]) == 1


def _variant_photo() -> bytes:
    base = generate_catalog(1, seed=4242)[0]
    return jpeg(perturb(make_garment(base), seed=99))


def test_explain_false_leaves_reasons_out(client: httpx.Client, catalog: IngestedCatalog) -> None:
    files = [part("like", photo(catalog, 10))]
    body = ok(client.post("/v1/recommend", params={"explain": "false"}, files=files))
    assert body["results"] and all(r["reasons"] is None for r in body["results"])


# ---- bad input --------------------------------------------------------------------------------


def test_bad_input_is_a_problem(client: httpx.Client, catalog: IngestedCatalog) -> None:
    good = part("like", photo(catalog, 0))
    unknown = str(uuid.uuid4())
    cases = {
        "no liked example": {"files": [part("dislike", photo(catalog, 1))]},
        "no example at all": {"json": {}},
        "unknown id": {"json": {"like_items": [unknown]}},
        "malformed id": {"json": {"like_items": ["12; DROP TABLE items"]}},
        "too many photos": {
            "files": [
                part("like", photo(catalog, 0, seed=s)) for s in range(MAX_RECOMMEND_PHOTOS + 1)
            ]
        },
        "k 0": {"files": [good], "params": {"k": 0}},
        "k 51": {"files": [good], "params": {"k": 51}},
        "not an image": {"files": [good, ("like", ("x.jpg", b"not an image" * 20, "image/jpeg"))]},
        "min_score 2": {"files": [good], "params": {"min_score": 2}},
        "plain text": {"content": b"like", "headers": {"content-type": "text/plain"}},
    }
    for name, request in cases.items():
        body = assert_problem(client.post("/v1/recommend", **request))
        assert body["instance"] == "/v1/recommend", name
    assert unknown in assert_problem(client.post("/v1/recommend", **cases["unknown id"]))["detail"]
    assert client.get("/readyz").status_code == 200


# ---- the CLI ----------------------------------------------------------------------------------


def test_cli_recommend(stack: RunningStack, catalog: IngestedCatalog, tmp_path: Path) -> None:
    client = httpx.Client(base_url=stack.url, timeout=60)
    liked_id = item_id(client, catalog, 11)
    client.close()
    liked, disliked = tmp_path / "liked.jpg", tmp_path / "disliked.jpg"
    liked.write_bytes(photo(catalog, 12))
    disliked.write_bytes(photo(catalog, 13))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # A wide terminal: the table's cells are not cut.
        return subprocess.run(
            [sys.executable, "-m", "fashionrec_cli", "recommend", *args, "--gateway", stack.url],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"},
        )  # fmt: skip

    answer = cli("--like", str(liked), "--like", liked_id, "--dislike", str(disliked), "--json")
    assert answer.returncode == 0, answer.stderr
    body = json.loads(answer.stdout)
    assert len(body["results"]) == 5 and liked_id not in ids_of(body)
    ids_only = ("--like", liked_id, "-k", "3", "--strategy", "best_score")
    as_json = json.loads(cli(*ids_only, "--json").stdout)
    table = cli(*ids_only)
    assert table.returncode == 0, table.stderr
    assert len(as_json["results"]) == 3
    for hit in as_json["results"]:
        assert hit["sku"] in table.stdout and f"{hit['score']:.3f}" in table.stdout

    missing = cli("--like", str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2 and "no such file and not an item id" in missing.stderr
    unknown = cli("--like", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "HTTP 422" in unknown.stderr
