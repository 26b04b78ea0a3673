"""Dependencies: everything a handler needs comes from app.state, built in the lifespan."""

from __future__ import annotations

import secrets
from typing import Annotated

import redis
from fashionrec_shared.problems import ProblemError
from fashionrec_shared.storage import BlobStore
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from fashionrec_gateway.embedding import QueryEmbedder, QueryVectorCache, ServingVersion
from fashionrec_gateway.indexer_client import IndexerClient
from fashionrec_gateway.metrics import GatewayMetrics
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


SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
BlobStoreDep = Annotated[BlobStore, Depends(get_blob_store)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
IndexerDep = Annotated[IndexerClient, Depends(get_indexer)]
QueryEmbedderDep = Annotated[QueryEmbedder, Depends(get_query_embedder)]
QueryCacheDep = Annotated[QueryVectorCache, Depends(get_query_cache)]
ServingVersionDep = Annotated[ServingVersion, Depends(get_serving_version)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]

_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="needed on POST/DELETE when the gateway has a key",
)


def require_api_key(
    settings: SettingsDep, key: Annotated[str | None, Security(_api_key_header)]
) -> None:
    expected = settings.api_key.get_secret_value() if settings.api_key else ""
    if not expected:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.encode()):
        raise ProblemError(401, "Unauthorized", "a valid X-API-Key header is required")


ApiKeyDep = Depends(require_api_key)
