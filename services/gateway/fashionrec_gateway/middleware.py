"""ASGI middleware: request body limit, per-route request metrics, Retry-After on outages."""

from __future__ import annotations

import time

from fashionrec_shared.problems import problem_response
from fashionrec_shared.schemas import MAX_RECOMMEND_PHOTOS
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Multipart framing and the metadata field come on top of the image itself.
BODY_OVERHEAD = 256 * 1024
# Many images in one request: these routes have their own, larger body limits.
BATCH_PATH = "/v1/items/batch"
RECOMMEND_PATH = "/v1/recommend"


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
        path = scope.get("path", "").rstrip("/")
        if path.endswith(BATCH_PATH):
            limit = settings.max_batch_bytes
        elif path.endswith(RECOMMEND_PATH):  # up to this many photos, each checked on its own
            limit = settings.max_upload_bytes * MAX_RECOMMEND_PHOTOS + BODY_OVERHEAD
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


# A dependency is down (503) or too slow (504): both are worth a retry later.
RETRYABLE = frozenset({503, 504})


class RetryAfterMiddleware:
    """503 and 504 answers carry `Retry-After: settings.retry_after_s` unless they set their own
    (one the indexer sent, say): every path to an outage answer gets it, problem or not."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        retry_after = str(scope["app"].state.settings.retry_after_s).encode()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in RETRYABLE:
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", retry_after)]}
            await send(message)

        await self.app(scope, receive, send_wrapper)
