"""Object storage behind one small interface: a local directory or any S3 endpoint (minio SDK).

Keys are content addressed (`content_key`), so a put of the same bytes is idempotent and a
client's file name never reaches storage.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential
from urllib3.exceptions import HTTPError as Urllib3Error

from fashionrec_shared.files import atomic_path
from fashionrec_shared.settings import StorageSettings

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)+$")

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "json": "application/json",
}


_MISSING = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket"})


class BlobNotFound(KeyError):
    """The key does not exist in the store."""


class StorageUnavailable(ConnectionError):
    """The store cannot be reached; callers treat this as transient."""


class StorageFull(StorageUnavailable):
    """The store has no space (or quota) left for a write; nothing of it was kept."""


# A full disk or an exhausted quota: the write failed as a whole (atomic_path removed the part).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# The same from an S3 endpoint (MinIO's codes: its drives full, a bucket quota reached).
_FULL_S3_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(prefix: str, data: bytes, ext: str) -> tuple[str, str]:
    """(key, sha256) for `data` stored under `prefix`, e.g. ('inventory/ab12….jpg', 'ab12…')."""
    digest = sha256_hex(data)
    return f"{prefix}/{digest}.{ext}", digest


def content_type_for(key: str) -> str:
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key:
        raise ValueError(f"invalid object key: {key!r}")
    return key


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def upload_file(self, key: str, path: Path) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def ping(self) -> None: ...


class LocalBlobStore:
    """Objects as files under one directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_atomic(self, key: str, write) -> None:  # type: ignore[no-untyped-def]
        try:
            with atomic_path(self._path(key)) as tmp, open(tmp, "wb") as out:
                write(out)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise StorageFull(f"blob directory {self.root} is full: {exc.strerror}") from exc
            raise

    def put(self, key: str, data: bytes) -> None:
        self._write_atomic(key, lambda out: out.write(data))

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise BlobNotFound(key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def upload_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self._write_atomic(key, lambda out: shutil.copyfileobj(src, out))

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise BlobNotFound(key)
        with atomic_path(path) as tmp:
            shutil.copyfile(source, tmp)

    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageUnavailable(f"blob directory {self.root} is not writable")


def _is_transient(exc: BaseException) -> bool:
    # A full store stays full for the next try: only an operator frees space.
    return isinstance(exc, StorageUnavailable) and not isinstance(exc, StorageFull)


_transient = retry(
    retry=retry_if_exception(_is_transient),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.1, max=2),
    reraise=True,
)


class S3BlobStore:
    """Objects in an S3 bucket through the minio SDK (MinIO, AWS S3, moto, …)."""

    def __init__(self, settings: StorageSettings, *, for_requests: bool = False) -> None:
        assert settings.s3_endpoint
        self.bucket = settings.s3_bucket
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key.get_secret_value()
            if settings.s3_access_key
            else None,
            secret_key=settings.s3_secret_key.get_secret_value()
            if settings.s3_secret_key
            else None,
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=_request_http_client() if for_requests else None,
        )
        self._create_bucket = settings.s3_create_bucket
        self._bucket_checked = False

    def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kwargs)
        except (Urllib3Error, OSError) as exc:
            raise StorageUnavailable(f"S3 endpoint unreachable: {exc}") from exc
        except S3Error as exc:
            if exc.code in _FULL_S3_CODES:
                raise StorageFull(f"bucket {self.bucket!r} is full: {exc.message}") from exc
            raise

    @_transient
    def ensure_bucket(self) -> None:
        self._check_bucket()

    def _check_bucket(self) -> None:
        # Not retried itself: callers are, and nested retries multiply (9 tries, a minute).
        if self._bucket_checked:
            return
        if not self._call(self.client.bucket_exists, self.bucket):
            if not self._create_bucket:
                raise StorageUnavailable(f"bucket {self.bucket!r} does not exist")
            try:
                self._call(self.client.make_bucket, self.bucket)
            except S3Error as exc:  # created by a concurrent process
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_checked = True

    @_transient
    def put(self, key: str, data: bytes) -> None:
        self._check_bucket()
        self._call(
            self.client.put_object,
            self.bucket,
            check_key(key),
            io.BytesIO(data),
            len(data),
            content_type=content_type_for(key),
        )

    @_transient
    def get(self, key: str) -> bytes:
        try:
            response = self._call(self.client.get_object, self.bucket, check_key(key))
        except S3Error as exc:
            if exc.code in _MISSING:
                raise BlobNotFound(key) from exc
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    @_transient
    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.stat_object, self.bucket, check_key(key))
            return True
        except S3Error as exc:
            if exc.code in _MISSING:
                return False
            raise

    @_transient
    def delete(self, key: str) -> None:
        self._call(self.client.remove_object, self.bucket, check_key(key))

    @_transient
    def upload_file(self, key: str, path: Path) -> None:
        self._check_bucket()
        self._call(
            self.client.fput_object,
            self.bucket,
            check_key(key),
            str(path),
            content_type=content_type_for(key),
        )

    @_transient
    def download_file(self, key: str, path: Path) -> None:
        with atomic_path(path) as tmp:
            try:
                self._call(self.client.fget_object, self.bucket, check_key(key), str(tmp))
            except S3Error as exc:
                if exc.code in _MISSING:
                    raise BlobNotFound(key) from exc
                raise

    def ping(self) -> None:
        self._bucket_checked = False
        self.ensure_bucket()


def _request_http_client() -> urllib3.PoolManager:
    """minio's client, but failing in seconds: its own (5 min timeouts, 5 retries with backoff,
    under our 3 attempts) keeps a caller waiting a minute or more before the outage shows."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3.0, read=30.0),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        # Redirects as minio's own; failures not retried here (the 3 attempts above are).
        retries=urllib3.Retry(
            total=5, connect=0, read=0, other=0, status=0, status_forcelist=[500, 502, 503, 504]
        ),
    )


def make_blob_store(settings: StorageSettings, *, for_requests: bool = False) -> BlobStore:
    """`for_requests`: an S3 store tuned for a waiting HTTP client (short timeouts, no HTTP
    retries under the 3 attempts), so that an outage is a prompt StorageUnavailable."""
    if settings.backend == "s3":
        return S3BlobStore(settings, for_requests=for_requests)
    return LocalBlobStore(settings.local_dir)
