"""Dependencies: everything a handler needs comes from app.state, built in the lifespan."""

from __future__ import annotations

from typing import Annotated, Any

import redis
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.storage import BlobStore
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from fashionrec_gateway.auth import API_KEY_HEADER, expected_key, key_matches
from fashionrec_gateway.embedding import QueryEmbedder, QueryVectorCache, ServingVersion
from fashionrec_gateway.indexer_client import IndexerClient
from fashionrec_gateway.metrics import GatewayMetrics
from fashionrec_gateway.ratelimit import SEARCH, WRITES, RateLimits, client_identity
from fashionrec_gateway.settings import GatewaySettings


def get_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def get_blob_store(request: Request) -> BlobStore:
    return request.app.state.blob_store


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_indexer(request: Request) -> IndexerClient:
    return request.app.state.indexer


def get_query_embedder(request: Request) -> QueryEmbedder:
    return request.app.state.query_embedder


def get_query_cache(request: Request) -> QueryVectorCache:
    return request.app.state.query_cache


def get_serving_version(request: Request) -> ServingVersion:
    return request.app.state.serving_version


def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


def get_rate_limits(request: Request) -> RateLimits:
    return request.app.state.rate_limits


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
BlobStoreDep = Annotated[BlobStore, Depends(get_blob_store)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
IndexerDep = Annotated[IndexerClient, Depends(get_indexer)]
QueryEmbedderDep = Annotated[QueryEmbedder, Depends(get_query_embedder)]
QueryCacheDep = Annotated[QueryVectorCache, Depends(get_query_cache)]
ServingVersionDep = Annotated[ServingVersion, Depends(get_serving_version)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
RateLimitsDep = Annotated[RateLimits, Depends(get_rate_limits)]

_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="needed on POST/DELETE when the gateway has a key",
)


def require_api_key(
    settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)]
) -> None:
    if expected_key(settings) and not key_matches(settings, key):
        raise ProblemError(401, "Unauthorized", "a valid X-API-Key header is required")


ApiKeyDep = Depends(require_api_key)


def _rate_limited(scope: str) -> Any:
    def check(request: Request, settings: SettingsDep, limits: RateLimitsDep) -> None:
        limits.check(scope, client_identity(request, settings))

    return Depends(check)


# Before ApiKeyDep in a route's dependencies: guessing keys counts against the guesser's limit.
SearchLimitDep = _rate_limited(SEARCH)
WriteLimitDep = _rate_limited(WRITES)
