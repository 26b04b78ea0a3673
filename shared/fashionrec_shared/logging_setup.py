"""One logging setup for every entry point (the services' commands and the `fashionrec` CLI).

`configure_logging(service, level)` puts one handler on the root logger: text lines by default,
or with `FASHIONREC_LOG_FORMAT=json` one JSON object per line (time, level, logger, message,
request_id, service; exception when there is one). Every record gets `request_id` (the current
one, `-` when none; see `request_id.py`) and `service` from `RequestIdFilter`.

uvicorn takes the same setup as `uvicorn_log_config(...)` (its worker processes are spawned and
configure logging themselves); Celery workers keep it (a `setup_logging` receiver tells Celery
that logging is configured, so it adds no handlers of its own), and the Celery request-id signals
are connected, so tasks a process sends or runs carry their request's id.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from fashionrec_shared.request_id import current_request_id, install_celery_request_id

LOG_FORMAT_ENV = "FASHIONREC_LOG_FORMAT"
LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(service)s %(name)s [%(request_id)s] %(message)s"
NO_REQUEST = "-"
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current request id, `-` when none) and `record.service`."""

    def __init__(self, service: str = NO_REQUEST) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id() or NO_REQUEST
        if getattr(record, "service", None) is None:
            record.service = self.service
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id() or "-",
            "service": getattr(record, "service", NO_REQUEST),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record comes (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def log_format(fmt: str | None = None) -> LogFormat:
    """`fmt`, else FASHIONREC_LOG_FORMAT, else text."""
    value = (fmt or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"{LOG_FORMAT_ENV} must be text or json, not {value!r}")
    return value  # type: ignore[return-value]


def log_handler(service: str, fmt: str | None = None) -> logging.Handler:
    """The handler of every fashionrec process: stderr, request ids, text or JSON."""
    handler = _StderrHandler()
    handler.addFilter(RequestIdFilter(service))
    if log_format(fmt) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.fashionrec = True  # type: ignore[attr-defined]
    return handler


def configure_logging(
    service: str,
    level: str | int = "INFO",
    *,
    fmt: str | None = None,
    root_level: str | int | None = None,
) -> None:
    """Log to stderr as this service. `level` is fashionrec's own loggers'; `root_level`
    (default: the same) the libraries'. Calling it again replaces the earlier setup."""
    level = _level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "fashionrec", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(log_handler(service, fmt))
    root.setLevel(level if root_level is None else _level(root_level))
    logging.getLogger("fashionrec").setLevel(level)
    for name in _UVICORN_LOGGERS:  # through the root handler, like everything else
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    _keep_logging_in_celery()
    install_celery_request_id()  # tasks this process sends or runs carry their request's id


def uvicorn_log_config(service: str, level: str | int = "INFO") -> dict[str, Any]:
    """`log_config` for uvicorn.run: the setup of configure_logging, for each worker process."""
    level_name = logging.getLevelName(_level(level))
    passthrough = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "fashionrec": {
                "()": "fashionrec_shared.logging_setup.log_handler",
                "service": service,
                "fmt": log_format(),
            }
        },
        "root": {"level": level_name, "handlers": ["fashionrec"]},
        "loggers": {
            "fashionrec": {"level": level_name},
            **{name: dict(passthrough) for name in _UVICORN_LOGGERS},
        },
    }


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    return value


def _celery_setup_logging(**_: Any) -> None:
    """Celery's setup_logging receiver: logging is configured already (configure_logging)."""


def _keep_logging_in_celery() -> None:
    from celery import signals

    signals.setup_logging.connect(
        _celery_setup_logging, weak=False, dispatch_uid="fashionrec-logging"
    )
