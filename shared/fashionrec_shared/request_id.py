"""The request id: made (or taken) by the gateway, carried to every process a request reaches.

One contextvar holds it while a request or a task runs. It travels:
- HTTP: the `X-Request-ID` header. `install_request_id(app)` (a FastAPI/Starlette app) takes it
  from the request, or makes one, and echoes it in the response; `propagate_request_id` is an
  httpx request hook that adds it to outgoing calls (gateway -> indexer).
- Celery: a message header. `install_celery_request_id()` connects before_task_publish (the
  current id into the message), task_prerun / task_postrun (the message's id around the task).
Log records get it from `logging_setup.RequestIdFilter`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
# The Celery message header (protocol 2 headers become attributes of `task.request`).
CELERY_HEADER = "fashionrec_request_id"
# An incoming id is used only when it is this tame (it lands in every log line).
_VALID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

_request_id: ContextVar[str | None] = ContextVar("fashionrec_request_id", default=None)


def current_request_id() -> str | None:
    return _request_id.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """`value` when it is a usable id, else a new one."""
    return value if value is not None and _VALID.match(value) else new_request_id()


@contextlib.contextmanager
def request_id_scope(value: str | None) -> Iterator[str | None]:
    """`value` is the current request id inside the block."""
    token = _request_id.set(value)
    try:
        yield value
    finally:
        _request_id.reset(token)


# ---- HTTP -----------------------------------------------------------------------------------


class RequestIdMiddleware:
    """ASGI middleware: the request's `X-Request-ID` (or a new id) is current while it is served
    and comes back in the response's `X-Request-ID`; one DEBUG line per request on `log_name`."""

    def __init__(self, app: Any, log_name: str = "fashionrec.http") -> None:
        self.app = app
        self.log = logging.getLogger(log_name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.lower().encode()
        incoming = next((v for k, v in scope.get("headers", ()) if k == header), None)
        request_id = accept_request_id(incoming.decode("latin-1") if incoming else None)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != header]
                message = {**message, "headers": [*headers, (header, request_id.encode())]}
            await send(message)

        with request_id_scope(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self.log.debug(
                    "%s %s -> %d in %.1f ms",
                    scope.get("method"),
                    scope.get("path"),
                    status,
                    (time.perf_counter() - started) * 1000,
                )


def install_request_id(app: Any, service: str) -> None:
    """Request ids on an HTTP service (its request lines on `fashionrec.<service>.http`); the
    Celery tasks it sends carry the id."""
    app.add_middleware(RequestIdMiddleware, log_name=f"fashionrec.{service}.http")
    install_celery_request_id()


def propagate_request_id(request: Any) -> None:
    """httpx request event hook: the current request id goes out as `X-Request-ID`."""
    request_id = current_request_id()
    if request_id is not None and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = request_id


# ---- Celery ---------------------------------------------------------------------------------

_task_tokens: dict[str, Token[str | None]] = {}


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = current_request_id()
    if request_id is not None and headers is not None:
        headers.setdefault(CELERY_HEADER, request_id)


def task_request_id(task: Any) -> str | None:
    """The request id a task's message carries (a worker's request, or `apply(headers=…)`)."""
    request = getattr(task, "request", None)
    value = getattr(request, CELERY_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(CELERY_HEADER)
    return value if isinstance(value, str) else None


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id is not None:
        _task_tokens[task_id] = _request_id.set(task_request_id(task))


def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    token = _task_tokens.pop(task_id, None) if task_id is not None else None
    if token is not None:
        with contextlib.suppress(ValueError, RuntimeError):  # set in another context
            _request_id.reset(token)


def install_celery_request_id() -> None:
    """Connect the three Celery signals (process-wide; connecting again changes nothing)."""
    from celery import signals

    signals.before_task_publish.connect(_on_publish, weak=False, dispatch_uid=CELERY_HEADER)
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid=CELERY_HEADER)
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid=CELERY_HEADER)
