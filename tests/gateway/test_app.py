"""The app as a whole: no torch, OpenAPI with documented errors, the demo page."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.gateway.conftest import Gateway


def test_gateway_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import fashionrec_gateway.app, fashionrec_gateway.__main__\n"
        "fashionrec_gateway.app.create_app()\n"
        "heavy = {'torch', 'torchvision', 'fashionrec_embedder', 'fashionrec_indexer', 'annoy'}\n"
        "loaded = heavy & {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_openapi_documents_the_public_api(gateway: Gateway) -> None:
    spec = gateway.client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/v1/search",
        "/v1/items",
        "/v1/items/{item_id}",
        "/v1/items/{item_id}/similar",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/images/inventory/{name}",
        "/livez",
        "/readyz",
    }
    search = paths["/v1/search"]["post"]
    assert {"413", "415", "422", "429", "503", "504"} <= set(search["responses"])
    assert "application/problem+json" in search["responses"]["504"]["content"]
    assert "SearchResponse" in str(search["responses"]["200"])
    assert paths["/v1/items"]["post"]["responses"].keys() >= {"202", "401", "429"}
    assert gateway.client.get("/docs").status_code == 200


def test_demo_page(gateway: Gateway) -> None:
    response = gateway.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/v1/search" in response.text and "/v1/recommend" in response.text
    # Everything it needs is inline or served by the gateway: no CDN, no build step.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", response.text)
    assert "<script src" not in response.text and "<link" not in response.text


def test_unknown_route_is_a_problem(gateway: Gateway) -> None:
    response = gateway.client.get("/nope")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
