"""ASGI middleware: request body limit and per-route request metrics."""

from __future__ import annotations

import time

from fashionrec_shared.problems import problem_response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Multipart framing and the metadata field come on top of the image itself.
BODY_OVERHEAD = 256 * 1024
# Many images in one request: this route has its own, larger body limit.
BATCH_PATH = "/v1/items/batch"


class BodyLimitMiddleware:
    """Refuses bodies over max_upload_bytes (+ framing) before they are spooled to disk.

    Content-Length is checked up front; chunked bodies are counted as they arrive.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = scope["app"].state.settings
        if scope.get("path", "").rstrip("/").endswith(BATCH_PATH):
            limit = settings.max_batch_bytes
        else:
            limit = settings.max_upload_bytes + BODY_OVERHEAD
        detail = f"the request body is larger than the limit of {limit} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = problem_response(413, "Content Too Large", detail)
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside body parsing; FastAPI re-raises HTTPExceptions -> 413 problem.
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = scope["app"].state.metrics
        status = 500
        start = time.perf_counter()
        # Handlers time the "upload" stage (body received and parsed) from here.
        scope.setdefault("state", {})["started"] = start

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The route template, not the raw path, keeps label cardinality bounded.
            path = getattr(route, "path", "unmatched")
            metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)
            metrics.requests.labels(scope["method"], path, str(status)).inc()
