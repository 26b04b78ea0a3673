"""The BlobStore contract, run against the local directory and an S3 server alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from fashionrec_shared.storage import BlobNotFound, BlobStore, content_key


def test_put_get_roundtrip(blob_store: BlobStore) -> None:
    key, digest = content_key("inventory", b"hello", "jpg")
    assert key == f"inventory/{digest}.jpg"
    blob_store.put(key, b"hello")
    assert blob_store.exists(key)
    assert blob_store.get(key) == b"hello"


def test_put_is_idempotent(blob_store: BlobStore) -> None:
    key, _ = content_key("uploads", b"same bytes", "png")
    blob_store.put(key, b"same bytes")
    blob_store.put(key, b"same bytes")
    assert blob_store.get(key) == b"same bytes"


def test_missing_key(blob_store: BlobStore) -> None:
    assert not blob_store.exists("inventory/missing.jpg")
    with pytest.raises(BlobNotFound):
        blob_store.get("inventory/missing.jpg")


def test_delete(blob_store: BlobStore) -> None:
    blob_store.put("inventory/abc.jpg", b"x")
    blob_store.delete("inventory/abc.jpg")
    assert not blob_store.exists("inventory/abc.jpg")
    blob_store.delete("inventory/abc.jpg")  # deleting twice is fine


def test_files_roundtrip(blob_store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "index.ann"
    source.write_bytes(bytes(range(256)) * 100)
    blob_store.upload_file("indexes/b1/index.ann", source)
    target = tmp_path / "out" / "index.ann"
    blob_store.download_file("indexes/b1/index.ann", target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(BlobNotFound):
        blob_store.download_file("indexes/b1/missing.ann", tmp_path / "missing")


@pytest.mark.parametrize("key", ["../etc/passwd", "inventory/../../x", "/abs/path", "noprefix", ""])
def test_rejects_unsafe_keys(blob_store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        blob_store.put(key, b"x")


def test_ping(blob_store: BlobStore) -> None:
    blob_store.ping()
