"""deploy/healthcheck.py: the probes the images and compose use."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "deploy" / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def http_url() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/livez" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_probe(hc: ModuleType, http_url: str) -> None:
    assert hc.main(["http", f"{http_url}/livez"]) == 0
    assert hc.main(["http", f"{http_url}/readyz"]) == 1
    assert hc.main(["http", "http://127.0.0.1:9/livez"]) == 1


def test_usage_errors(hc: ModuleType) -> None:
    assert hc.main([]) == 2
    assert hc.main(["nope"]) == 2


def test_embedder_probe_finds_this_hosts_heartbeat(
    hc: ModuleType, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("FASHIONREC_BROKER_URL", raising=False)
    monkeypatch.setattr(hc.socket, "gethostname", lambda: "box1")
    client = redis.Redis.from_url(redis_url)
    assert hc.main(["embedder"]) == 1
    client.set("fashionrec:embedder:alive:box2:7", "{}", ex=30)
    assert hc.main(["embedder"]) == 1, "another host's heartbeat does not count"
    client.set("fashionrec:embedder:alive:box1:42", "{}", ex=30)
    assert hc.main(["embedder"]) == 0


def test_auto_picks_the_probe_from_the_command(
    hc: ModuleType, http_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = http_url.rsplit(":", 1)[1]
    cases = {
        ("/opt/venv/bin/fashionrec-gateway", "serve", "--port", port): True,
        ("/sbin/docker-init", "--", "fashionrec-indexer", "serve", f"--port={port}"): True,
        ("fashionrec-indexer", "serve", "--port", "9"): False,
        ("fashionrec-indexer", "migrate"): True,
        ("python", "-m", "something"): True,
    }
    for argv, healthy in cases.items():
        monkeypatch.setattr(hc, "_main_command", lambda argv=argv: hc._main_command_from(argv))
        assert hc.check_auto() is healthy, argv
    monkeypatch.setattr(hc, "_main_command", lambda: ["fashionrec-embedder", "worker"])
    monkeypatch.setattr(hc, "check_embedder", lambda: True)
    assert hc.check_auto() is True
    monkeypatch.setattr(hc, "_main_command", lambda: ["fashionrec-indexer", "worker", "--beat"])
    monkeypatch.setattr(hc, "check_celery", lambda: False)
    assert hc.check_auto() is False
