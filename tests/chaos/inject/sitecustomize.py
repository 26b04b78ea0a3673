"""A full disk for the local blob store, where no small filesystem can be mounted (not root).

The chaos stack puts this directory on PYTHONPATH, so every Python process of `fashionrec up`
imports it at start. While the file named by FASHIONREC_CHAOS_DISK_FULL exists, each write of
`LocalBlobStore` fails the way a full disk fails it: the first half of the bytes reach the
temporary file, then the write raises OSError(ENOSPC). What the store and its callers make of
that is their own code, unchanged. Without the variable this module does nothing.
"""

from __future__ import annotations

import errno
import os

_FLAG = os.environ.get("FASHIONREC_CHAOS_DISK_FULL")


class _FillsUp:
    """A file object that takes half of what it is given, then has no space left."""

    def __init__(self, out):  # type: ignore[no-untyped-def]
        self._out = out

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        self._out.write(bytes(data)[: max(len(data) // 2, 1)])
        self._out.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _install() -> None:
    from fashionrec_shared import storage

    original = storage.LocalBlobStore._write_atomic

    def _write_atomic(self, key, write):  # type: ignore[no-untyped-def]
        if not os.path.exists(_FLAG):  # type: ignore[arg-type]
            return original(self, key, write)
        return original(self, key, lambda out: write(_FillsUp(out)))

    storage.LocalBlobStore._write_atomic = _write_atomic  # type: ignore[method-assign]


if _FLAG:
    _install()
