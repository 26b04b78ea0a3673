"""GatewaySettings: env prefix, defaults from the spec, production needs an API key."""

from __future__ import annotations

import pytest
from fashionrec_gateway.settings import GatewaySettings
from pydantic import ValidationError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FASHIONREC_") or name in ("REDIS_URL", "S3_ENDPOINT"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = GatewaySettings()
    assert (s.host, s.port, s.indexer_url) == ("127.0.0.1", 8000, "http://127.0.0.1:8001")
    assert s.public_url is None
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.max_image_pixels == 40_000_000
    assert s.embed_timeout_s == 30
    assert s.query_cache_ttl_s == 86400
    assert s.api_key is None
    assert s.workers == 1
    assert s.storage.backend == "local"
    assert s.retry_after_s == 5
    assert (s.rate_limit_search, s.rate_limit_writes) == (None, None)  # off
    assert s.trusted_proxies == 0
    assert s.cors_origins == []  # off


def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_GATEWAY_PORT", "9000")
    monkeypatch.setenv("FASHIONREC_GATEWAY_API_KEY", "sekrit-123")
    monkeypatch.setenv("FASHIONREC_GATEWAY_PUBLIC_URL", "https://shop.example/")
    monkeypatch.setenv("FASHIONREC_GATEWAY_ENVIRONMENT", "production")
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("FASHIONREC_STORAGE_S3_ENDPOINT", "http://minio:9000")
    s = GatewaySettings()
    assert s.port == 9000
    assert s.api_key is not None and s.api_key.get_secret_value() == "sekrit-123"
    assert "sekrit" not in repr(s)
    assert s.public_url == "https://shop.example"
    assert s.broker.url == "redis://redis:6379/0"
    assert s.storage.backend == "s3"


@pytest.mark.parametrize("key", [None, ""])
def test_production_needs_an_api_key(key: str | None) -> None:
    with pytest.raises(ValidationError, match="API_KEY"):
        GatewaySettings(environment="production", api_key=key)
    GatewaySettings(environment="production", api_key="k")


def test_limits_and_cors_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_GATEWAY_RATE_LIMIT_SEARCH", " 60/minute ")
    monkeypatch.setenv("FASHIONREC_GATEWAY_RATE_LIMIT_WRITES", "10/second;300/hour")
    monkeypatch.setenv("FASHIONREC_GATEWAY_TRUSTED_PROXIES", "1")
    monkeypatch.setenv("FASHIONREC_GATEWAY_RETRY_AFTER_S", "2")
    monkeypatch.setenv(
        "FASHIONREC_GATEWAY_CORS_ORIGINS", "https://shop.example/, https://b.example"
    )
    s = GatewaySettings()
    assert (s.rate_limit_search, s.rate_limit_writes) == ("60/minute", "10/second;300/hour")
    assert (s.trusted_proxies, s.retry_after_s) == (1, 2)
    assert s.cors_origins == ["https://shop.example", "https://b.example"]


@pytest.mark.parametrize(
    "field", [{"rate_limit_search": "lots"}, {"rate_limit_writes": "5 per fortnight"}]
)
def test_a_bad_rate_fails_at_startup(field: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="rate_limit_"):
        GatewaySettings(**field)
