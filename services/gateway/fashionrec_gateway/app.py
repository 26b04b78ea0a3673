"""Gateway app factory: the public REST API in front of the embedder (Celery) and indexer (HTTP)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from anyio import to_thread
from fashionrec_shared.celery_app import make_celery
from fashionrec_shared.problems import install_problem_handlers
from fashionrec_shared.request_id import install_request_id
from fashionrec_shared.storage import make_blob_store
from fastapi import FastAPI

from fashionrec_gateway.cors import SettingsCORSMiddleware
from fashionrec_gateway.embedding import (
    CeleryQueryEmbedder,
    QueryVectorCache,
    ServingVersion,
    tune_for_requests,
)
from fashionrec_gateway.indexer_client import IndexerClient
from fashionrec_gateway.metrics import GatewayMetrics
from fashionrec_gateway.middleware import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RetryAfterMiddleware,
)
from fashionrec_gateway.ratelimit import RateLimits
from fashionrec_gateway.routers import (
    demo,
    health,
    images,
    index,
    items,
    jobs,
    recommend,
    search,
)
from fashionrec_gateway.settings import GatewaySettings

log = logging.getLogger("fashionrec.gateway")

THREADPOOL_SIZE = 200

DESCRIPTION = """
Visual fashion recommendations: upload a photo, get the most similar inventory items; like and
dislike photos and items for a personal feed (`POST /v1/recommend`).
Errors are `application/problem+json` (RFC 9457) with a `detail`.
"""


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = settings or GatewaySettings()
        # Sync handlers wait on the embedder for up to embed_timeout_s each; AnyIO's default of
        # 40 threads would let a burst of searches starve every other sync endpoint.
        to_thread.current_default_thread_limiter().total_tokens = THREADPOOL_SIZE
        logging.getLogger("fashionrec").setLevel(config.log_level.upper())
        redis_client = redis.Redis.from_url(
            config.broker.url, socket_connect_timeout=3, socket_timeout=5, health_check_interval=30
        )
        celery = tune_for_requests(make_celery("fashionrec-gateway", config.broker))
        indexer = IndexerClient.create(config.indexer_url, config.indexer_timeout_s)
        rate_limits = RateLimits.from_settings(config)
        app.state.settings = config
        # for_requests: a storage outage is a 503 within seconds, not after a minute of retries.
        app.state.blob_store = make_blob_store(config.storage, for_requests=True)
        app.state.redis = redis_client
        app.state.celery = celery
        app.state.indexer = indexer
        app.state.query_embedder = CeleryQueryEmbedder(celery)
        app.state.query_cache = QueryVectorCache(redis_client, config.query_cache_ttl_s)
        app.state.serving_version = ServingVersion()
        app.state.rate_limits = rate_limits
        log.info("gateway ready to serve; indexer at %s", config.indexer_url)
        try:
            yield
        finally:
            indexer.close()
            rate_limits.close()
            redis_client.close()
            celery.close()

    app = FastAPI(
        title="fashionrec",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    # Built here, not from the environment: a registry per app keeps test apps apart.
    app.state.metrics = GatewayMetrics()
    install_problem_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RetryAfterMiddleware)
    app.add_middleware(MetricsMiddleware)
    install_request_id(app, "gateway")  # answers and log lines carry the id
    # Outermost: error answers of the middleware inside (413, say) carry CORS headers too,
    # or a browser page could not read them.
    app.add_middleware(SettingsCORSMiddleware)
    for module in (search, recommend, items, jobs, index, images, health, demo):
        app.include_router(module.router)
    return app
