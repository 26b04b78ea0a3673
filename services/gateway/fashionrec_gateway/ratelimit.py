"""Per-client rate limits: the `limits` library, moving windows, counters in the broker's Redis.

Two scopes: `search` (POST /v1/search) and `writes` (the calls that need the API key), each off
unless its setting is set. A client is the valid API key when it sends one (every holder of the
key shares its limits), else its IP address (`client_ip`). An exceeded limit is a 429 problem
with Retry-After.

The limiter fails open: when its Redis cannot be reached the request goes through and a warning
is logged, since an outage of the counters must not take the shop's search down with it.
"""

from __future__ import annotations

import logging
import math
import time

import redis
from fashionrec_shared.problems import ProblemError
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.requests import Request

from fashionrec_gateway.auth import API_KEY_HEADER, key_fingerprint, key_matches
from fashionrec_gateway.settings import GatewaySettings

log = logging.getLogger("fashionrec.gateway.ratelimit")

SEARCH = "search"
WRITES = "writes"
KEY_PREFIX = "fashionrec:ratelimit"
# The limiter sits on every limited request: a Redis that hangs may cost each one this much.
REDIS_TIMEOUT_S = 0.5
# After a Redis failure the limiter stays open this long without trying: no timeout per request
# while Redis is down, and one warning per period instead of one per request.
FAIL_OPEN_S = 10.0


def client_ip(request: Request, trusted_proxies: int) -> str:
    """The client's address: the connection's peer, or with `trusted_proxies` N > 0 the
    X-Forwarded-For entry N places from the end (the address the outermost trusted proxy saw;
    entries further left are whatever the client sent)."""
    peer = request.client.host if request.client else "unknown"
    if trusted_proxies <= 0:
        return peer
    chain = ",".join(request.headers.getlist("x-forwarded-for"))
    entries = [entry.strip() for entry in chain.split(",") if entry.strip()]
    if not entries:
        return peer
    return entries[-trusted_proxies] if len(entries) >= trusted_proxies else entries[0]


def client_identity(request: Request, settings: GatewaySettings) -> str:
    key = request.headers.get(API_KEY_HEADER)
    if key_matches(settings, key):
        return f"key:{key_fingerprint(key or '')}"
    # A key that is not the valid one buys no limits of its own.
    return f"ip:{client_ip(request, settings.trusted_proxies)}"


class RateLimits:
    """The configured limits per scope; `check` raises the 429. Without any limit set it never
    touches Redis."""

    def __init__(self, redis_url: str, rates: dict[str, str | None]) -> None:
        self.limits: dict[str, list[RateLimitItem]] = {
            scope: parse_many(rate) for scope, rate in rates.items() if rate
        }
        self._pool: redis.ConnectionPool | None = None
        self._limiter: MovingWindowRateLimiter | None = None
        if self.limits:
            self._pool = redis.ConnectionPool.from_url(
                redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            storage = RedisStorage(
                redis_url, connection_pool=self._pool, key_prefix=KEY_PREFIX, wrap_exceptions=True
            )
            self._limiter = MovingWindowRateLimiter(storage)
        self._open_until = 0.0

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> RateLimits:
        rates = {SEARCH: settings.rate_limit_search, WRITES: settings.rate_limit_writes}
        return cls(settings.broker.url, rates)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.disconnect()

    def check(self, scope: str, client: str) -> None:
        """Counts one request of `client` in `scope`; a 429 ProblemError when over a limit."""
        items = self.limits.get(scope)
        if not items or self._limiter is None or time.monotonic() < self._open_until:
            return
        for item in items:
            try:
                allowed = self._limiter.hit(item, scope, client)
            except StorageError as exc:
                self._fail_open(exc)
                return
            if not allowed:
                # DEBUG: a flood would be a flood of lines; 429s are counted in the metrics.
                log.debug("rate limit %s of %s exceeded by %s", item, scope, client)
                retry_s = self._retry_after(item, scope, client)
                raise ProblemError(
                    429,
                    "Too Many Requests",
                    f"this client used up its {scope} rate limit ({item}); retry in {retry_s} s",
                    headers={"Retry-After": str(retry_s)},
                )

    def _retry_after(self, item: RateLimitItem, scope: str, client: str) -> int:
        """Seconds until the window has room again (the whole window if that is unknown)."""
        assert self._limiter is not None
        try:
            reset_at = self._limiter.get_window_stats(item, scope, client).reset_time
        except StorageError:
            return item.get_expiry()
        return max(1, math.ceil(reset_at - time.time()))

    def _fail_open(self, exc: StorageError) -> None:
        self._open_until = time.monotonic() + FAIL_OPEN_S
        log.warning(
            "rate limiter storage unavailable (%s); requests go unlimited for %.0f s",
            exc.storage_error,
            FAIL_OPEN_S,
        )
