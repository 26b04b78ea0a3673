"""`fashionrec-gateway serve` runs uvicorn with the factory app."""

from __future__ import annotations

from typing import Any

import pytest
from fashionrec_gateway import __main__ as cli
from typer.testing import CliRunner


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict[str, Any]]]:
    calls: list[tuple[tuple, dict[str, Any]]] = []
    monkeypatch.setattr(cli.uvicorn, "run", lambda *a, **kw: calls.append((a, kw)))
    for name in (
        "FASHIONREC_GATEWAY_PORT",
        "FASHIONREC_GATEWAY_HOST",
        "FASHIONREC_GATEWAY_WORKERS",
    ):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_serve_uses_the_factory(uvicorn_calls: list) -> None:
    result = CliRunner().invoke(cli.cli, ["serve", "--port", "8123", "--workers", "2"])
    assert result.exit_code == 0, result.output
    [(args, kwargs)] = uvicorn_calls
    assert args == ("fashionrec_gateway.app:create_app",)
    assert kwargs["factory"] is True
    assert (kwargs["host"], kwargs["port"], kwargs["workers"]) == ("127.0.0.1", 8123, 2)


def test_serve_reads_env(uvicorn_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASHIONREC_GATEWAY_PORT", "8200")
    assert CliRunner().invoke(cli.cli, ["serve"]).exit_code == 0
    assert uvicorn_calls[0][1]["port"] == 8200


def test_bad_configuration_fails_before_serving(
    uvicorn_calls: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASHIONREC_GATEWAY_ENVIRONMENT", "production")
    monkeypatch.delenv("FASHIONREC_GATEWAY_API_KEY", raising=False)
    result = CliRunner().invoke(cli.cli, ["serve"])
    assert result.exit_code != 0
    assert uvicorn_calls == []
