"""The S3 store tuned for requests (the gateway's): it works like the other, and an outage is a
StorageUnavailable within seconds instead of after a minute of nested retries."""

from __future__ import annotations

import time
import uuid

import pytest
from fashionrec_shared.settings import StorageSettings
from fashionrec_shared.storage import (
    S3BlobStore,
    StorageUnavailable,
    content_key,
    make_blob_store,
)
from urllib3.exceptions import NewConnectionError

from tests.conftest import s3_settings

CLOSED = "127.0.0.1:1"  # nothing listens there
KEY = "uploads/" + "a" * 64 + ".jpg"


def test_request_store_round_trip(s3_endpoint: dict[str, str]) -> None:
    settings = s3_settings(s3_endpoint, f"test-{uuid.uuid4().hex[:12]}")
    store = make_blob_store(settings, for_requests=True)
    key, _ = content_key("uploads", b"photo", "jpg")
    store.put(key, b"photo")
    assert store.get(key) == b"photo"
    store.ping()


def test_unreachable_endpoint_fails_in_seconds() -> None:
    store = make_blob_store(StorageSettings(backend="s3", s3_endpoint=CLOSED), for_requests=True)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        store.put(KEY, b"x")
    # 3 attempts of one connection each; minio's own client made 6 tries with backoff per attempt.
    assert time.monotonic() - started < 3


def test_a_put_is_retried_once_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bucket check inside put was retried on its own too: 3 x 3 tries (with minio's 6
    connections each: about a minute) before an outage showed."""
    store = S3BlobStore(StorageSettings(backend="s3", s3_endpoint=CLOSED))
    calls = []

    def unreachable(bucket: str) -> bool:
        calls.append(bucket)
        raise NewConnectionError(None, "connection refused")  # type: ignore[arg-type]

    monkeypatch.setattr(store.client, "bucket_exists", unreachable)
    with pytest.raises(StorageUnavailable):
        store.put(KEY, b"x")
    assert len(calls) == 3
