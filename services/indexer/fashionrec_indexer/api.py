"""Indexer app factory: the internal HTTP API (the gateway is its client). Errors are problem+json.

The lifespan builds every resource once onto app.state (deps.py hands them to the handlers);
one router module per resource lives under routers/.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fashionrec_shared.celery_app import make_celery
from fashionrec_shared.problems import install_problem_handlers, problem_response
from fashionrec_shared.request_id import install_request_id
from fashionrec_shared.storage import make_blob_store
from fastapi import FastAPI, Request, Response
from sqlalchemy.exc import OperationalError

from fashionrec_indexer.db import QUERY_PATH_OPTIONS, make_engine
from fashionrec_indexer.deps import TaskSender
from fashionrec_indexer.index_state import IndexState
from fashionrec_indexer.metrics import make_metrics
from fashionrec_indexer.routers import health, index, items, jobs, recommend, search
from fashionrec_indexer.settings import IndexerSettings

log = logging.getLogger("fashionrec.indexer.api")


def create_app(settings: IndexerSettings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or IndexerSettings()  # type: ignore[call-arg]
        engine = make_engine(resolved.database_url, options=QUERY_PATH_OPTIONS)
        state = IndexState(
            engine, make_blob_store(resolved.storage), resolved.index_dir, resolved.settle_s
        )
        celery = make_celery("fashionrec-indexer-api", resolved.broker)
        app.state.settings = resolved
        app.state.engine = engine
        app.state.tasks = TaskSender(celery)
        app.state.index_state = state
        app.state.metrics = make_metrics()
        state.start(resolved.refresh_interval_s)
        try:
            yield
        finally:
            state.stop()
            celery.close()
            engine.dispose()

    app = FastAPI(title="fashionrec indexer", version="0.1.0", lifespan=lifespan)
    install_problem_handlers(app)
    install_request_id(app, "indexer")  # X-Request-ID from the gateway, in every log line

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> Response:
        log.warning("database unavailable on %s: %s", request.url.path, exc)
        return problem_response(503, "Service Unavailable", "database unavailable", request)

    for module in (health, items, search, recommend, jobs, index):
        app.include_router(module.router)
    return app
