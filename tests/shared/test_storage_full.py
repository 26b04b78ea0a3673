"""A full store: the write fails as a whole with StorageFull (a StorageUnavailable callers can
tell apart), nothing of it is kept, and it is not retried as if it were an outage."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import urllib3
from fashionrec_shared import storage
from fashionrec_shared.settings import StorageSettings
from fashionrec_shared.storage import (
    LocalBlobStore,
    S3BlobStore,
    StorageFull,
    StorageUnavailable,
    content_key,
)
from minio.error import S3Error

KEY = "inventory/" + "a" * 64 + ".jpg"


class FillsUp(io.FileIO):
    """A file that takes a few bytes of a write, then has no space (or quota) left."""

    error = errno.ENOSPC

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        super().write(bytes(data)[:3])
        raise OSError(self.error, os.strerror(self.error))


def full_open(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
    """`open`, but a file opened for writing runs out of space."""
    if "w" in mode:
        return FillsUp(path, "w")
    return open(path, mode, *args, **kwargs)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> type[FillsUp]:
    # `open` in the storage module only (the builtin everywhere else).
    monkeypatch.setattr(storage, "open", full_open, raising=False)
    return FillsUp


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_local_put_on_a_full_disk_is_storage_full_and_keeps_nothing(
    tmp_path: Path, full_disk: type[FillsUp], monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    monkeypatch.setattr(full_disk, "error", error)
    store = LocalBlobStore(tmp_path)
    with pytest.raises(StorageFull, match="is full") as raised:
        store.put(KEY, b"x" * 1000)
    assert isinstance(raised.value, StorageUnavailable)
    assert files_under(tmp_path) == []  # no partial object, no temporary file
    assert not store.exists(KEY)


def test_local_upload_file_on_a_full_disk_is_storage_full(
    tmp_path: Path, full_disk: type[FillsUp]
) -> None:
    source = tmp_path / "src" / "index.ann"
    source.parent.mkdir()
    source.write_bytes(b"y" * 5000)
    store = LocalBlobStore(tmp_path / "blobs")
    with pytest.raises(StorageFull):
        store.upload_file("indexes/b1/index.ann", source)
    assert files_under(tmp_path / "blobs") == []


def test_other_write_errors_are_not_storage_full(
    tmp_path: Path, full_disk: type[FillsUp], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(full_disk, "error", errno.EIO)
    with pytest.raises(OSError) as raised:
        LocalBlobStore(tmp_path).put(KEY, b"x")
    assert not isinstance(raised.value, StorageUnavailable)
    assert raised.value.errno == errno.EIO


def test_local_put_works_again_once_there_is_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path)
    key, _ = content_key("uploads", b"photo", "jpg")
    monkeypatch.setattr(storage, "open", full_open, raising=False)
    with pytest.raises(StorageFull):
        store.put(key, b"photo")
    monkeypatch.undo()
    store.put(key, b"photo")
    assert store.get(key) == b"photo"


def s3_error(code: str) -> S3Error:
    response = urllib3.HTTPResponse(status=507)
    return S3Error(response, code, "Storage backend has reached its minimum free drive", "", "", "")


@pytest.mark.parametrize("code", ["XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"])
def test_s3_full_is_storage_full_and_not_retried(
    monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    store = S3BlobStore(StorageSettings(backend="s3", s3_endpoint="127.0.0.1:1"))
    store._bucket_checked = True
    calls = []

    def full(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise s3_error(code)

    monkeypatch.setattr(store.client, "put_object", full)
    with pytest.raises(StorageFull, match="is full"):
        store.put(KEY, b"x")
    assert len(calls) == 1  # a full bucket stays full: no retry


def test_other_s3_errors_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    store = S3BlobStore(StorageSettings(backend="s3", s3_endpoint="127.0.0.1:1"))
    store._bucket_checked = True

    def denied(*args: object, **kwargs: object) -> None:
        raise s3_error("AccessDenied")

    monkeypatch.setattr(store.client, "put_object", denied)
    with pytest.raises(S3Error):
        store.put(KEY, b"x")
