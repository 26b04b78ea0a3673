"""CORS from the settings: Starlette's CORSMiddleware for `cors_origins`, or nothing at all."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

# No X-API-Key: writes carry a secret, which belongs on servers, not in a page's script.
ALLOW_HEADERS = ["Content-Type", "X-Request-ID"]
EXPOSE_HEADERS = ["Retry-After", "X-Request-ID", "Server-Timing"]


class SettingsCORSMiddleware:
    """Built on the first request (the settings exist from the lifespan on). Without origins no
    CORS headers are sent, so browsers allow same-origin pages only (the demo at / is one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._handler: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan too: no settings yet
            await self.app(scope, receive, send)
            return
        if self._handler is None:
            origins = scope["app"].state.settings.cors_origins
            self._handler = (
                CORSMiddleware(
                    self.app,
                    allow_origins=origins,
                    allow_methods=["GET", "HEAD", "POST", "DELETE"],
                    allow_headers=ALLOW_HEADERS,
                    expose_headers=EXPOSE_HEADERS,
                    max_age=600,
                )
                if origins
                else self.app
            )
        await self._handler(scope, receive, send)
