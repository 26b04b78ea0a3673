"""The embedder processes that are alive, from their heartbeat keys in Redis.

Each embedder process refreshes its heartbeat key (`fashionrec_shared.keys`; JSON, TTL 30 s) with
what it serves: model version, dimension, device, loaded versions and, from newer embedders,
backbone, weights, runtime and precision. A key that vanished or cannot be read is skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis
from fashionrec_shared.keys import EMBEDDER_ALIVE_PATTERN
from fashionrec_shared.schemas import EmbedderInfo
from pydantic import ValidationError

log = logging.getLogger("fashionrec.gateway.embedders")

SCAN_COUNT = 100


def alive_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(match=EMBEDDER_ALIVE_PATTERN, count=SCAN_COUNT))


def parse_heartbeat(key: bytes | str, raw: bytes | str | None) -> EmbedderInfo | None:
    """One heartbeat value; None when it expired meanwhile or is not an embedder's JSON."""
    if raw is None:
        return None
    try:
        return EmbedderInfo.model_validate_json(raw)
    except ValidationError as exc:
        log.warning("ignoring unreadable embedder heartbeat %r: %s", key, exc.errors()[:2])
        return None


def group_key(info: EmbedderInfo) -> tuple[str | None, ...]:
    """What makes processes serve the same thing."""
    return (info.model_version, info.backbone, info.weights, info.runtime, info.precision)


def _merge(group: list[EmbedderInfo]) -> EmbedderInfo:
    versions = list(dict.fromkeys(v for info in group for v in info.model_versions))
    devices = sorted({info.device for info in group if info.device})
    return group[0].model_copy(
        update={
            "model_versions": versions,
            "device": ", ".join(devices) or None,
            "processes": sum(info.processes for info in group),
        }
    )


def group_embedders(infos: Iterable[EmbedderInfo]) -> list[EmbedderInfo]:
    """One entry per (model_version, backbone, weights, runtime, precision), most processes
    first; loaded versions and devices of a group are merged."""
    groups: dict[tuple[str | None, ...], list[EmbedderInfo]] = {}
    for info in infos:
        groups.setdefault(group_key(info), []).append(info)
    merged = [_merge(group) for group in groups.values()]
    return sorted(merged, key=lambda e: (-e.processes, *(part or "" for part in group_key(e))))


def read_embedders(client: redis.Redis) -> list[EmbedderInfo]:
    """The alive embedders, grouped; raises redis.RedisError when Redis cannot be read."""
    keys = alive_keys(client)
    if not keys:
        return []
    values = client.mget(keys)
    infos = (parse_heartbeat(key, raw) for key, raw in zip(keys, values, strict=True))
    return group_embedders(info for info in infos if info is not None)
