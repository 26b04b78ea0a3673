"""Local file helpers every service needs once: atomic writes, JSON reports, sha256 of a file.

A write goes to a temporary file next to its target and is renamed onto it only when complete,
so a reader (another process, a crash restart) sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path next to `final`, renamed onto it only when the block succeeds.

    The temporary file exists (empty) when the block starts and is removed if the block raises.
    It keeps `final`'s suffix unless `suffix` says otherwise (some writers pick the format by it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        dir=final.parent,
        prefix=f".{final.stem}.",
        suffix=final.suffix if suffix is None else suffix,
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(result: Any, path: Path | str) -> None:
    """A report as indented JSON (one trailing newline), written atomically."""
    write_atomic(path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))


def file_sha256(path: Path | str) -> str:
    """sha256 hex digest of a file, read in chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
