"""The API key of writes: checked in constant time, never logged or stored as such."""

from __future__ import annotations

import hashlib
import hmac

from fashionrec_gateway.settings import GatewaySettings

API_KEY_HEADER = "X-API-Key"


def expected_key(settings: GatewaySettings) -> str:
    """The configured key; empty when writes are open (no key set)."""
    return settings.api_key.get_secret_value() if settings.api_key else ""


def key_matches(settings: GatewaySettings, key: str | None) -> bool:
    """Whether `key` is the configured key (False when none is configured)."""
    expected = expected_key(settings)
    if not expected or key is None:
        return False
    # Constant time: how long a wrong key takes must not tell how much of it was right.
    return hmac.compare_digest(key.encode(), expected.encode())


def key_fingerprint(key: str) -> str:
    """A stand-in for the key where one must be named (rate-limit counters in Redis)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]
