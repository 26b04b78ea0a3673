"""Wire format of embedding vectors: base64 of little-endian float32."""

from __future__ import annotations

import base64

import numpy as np

DTYPE = np.dtype("<f4")


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype=DTYPE).tobytes()).decode("ascii")


def decode_vector(data: str, dim: int | None = None) -> np.ndarray:
    """Decode a vector; raises ValueError on bad base64, a wrong length or non-finite values."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"vector is not valid base64: {exc}") from exc
    if len(raw) % DTYPE.itemsize:
        raise ValueError("vector byte length is not a multiple of 4")
    vector = np.frombuffer(raw, dtype=DTYPE).astype(np.float32)
    if dim is not None and vector.shape[0] != dim:
        raise ValueError(f"vector has {vector.shape[0]} dimensions, expected {dim}")
    if vector.size == 0 or not np.all(np.isfinite(vector)):
        raise ValueError("vector is empty or holds non-finite values")
    return vector
