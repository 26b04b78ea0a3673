"""Public URLs of stored images (only the gateway knows how images are served)."""

from __future__ import annotations

from fastapi import Request

from fashionrec_gateway.settings import GatewaySettings

IMAGES_PATH = "/v1/images"


def public_base(request: Request, settings: GatewaySettings) -> str:
    return settings.public_url or str(request.base_url).rstrip("/")


def image_url(base: str, key: str) -> str:
    return f"{base}{IMAGES_PATH}/{key}"
