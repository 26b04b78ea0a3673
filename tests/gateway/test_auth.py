"""The API key: compared in constant time, never in a log line."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import pytest
from fashionrec_gateway import auth
from fashionrec_gateway.settings import GatewaySettings

from tests.gateway.conftest import Gateway
from tests.gateway.images import jpeg

KEY = "k3y-that-must-never-be-logged"


@pytest.mark.parametrize(
    ("configured", "sent", "ok"),
    [
        (KEY, KEY, True),
        (KEY, KEY + "x", False),
        (KEY, "", False),
        (KEY, None, False),
        ("ключ", "ключ", True),  # non-ASCII keys compare as UTF-8
        (None, "anything", False),  # no key configured: nothing matches (writes are open)
    ],
)
def test_key_matches(configured: str | None, sent: str | None, ok: bool) -> None:
    assert auth.key_matches(GatewaySettings(api_key=configured), sent) is ok


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert not auth.key_matches(GatewaySettings(api_key=KEY), "wrong")
    assert calls == [(b"wrong", KEY.encode())]


def test_the_key_is_never_logged(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = make_gateway(api_key=KEY, log_level="DEBUG", rate_limit_writes="2/minute")
    headers = {"X-API-Key": KEY}
    files = {"image": ("x.jpg", jpeg(), "image/jpeg")}
    form = {"files": files, "data": {"metadata": '{"sku": "a"}'}}
    assert gw.client.post("/v1/items", headers=headers, **form).status_code == 202
    assert gw.client.post("/v1/jobs", headers=headers).status_code == 201
    assert gw.client.post("/v1/jobs", headers=headers).status_code == 429  # logged, by key
    assert gw.client.post("/v1/jobs", headers={"X-API-Key": KEY[:-1]}).status_code == 401
    gw.indexer.faults.down = True  # warnings and failures on the way, with the key sent
    assert gw.client.delete("/v1/items/x", headers={"X-API-Key": KEY + "!"}).status_code == 401
    assert gw.client.post("/v1/search", headers=headers, files=files).status_code == 503
    assert any(r.name == "fashionrec.gateway.ratelimit" for r in caplog.records)
    assert any(r.name == "fashionrec.gateway.http" for r in caplog.records)  # request lines
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert KEY[:-1] not in logged
