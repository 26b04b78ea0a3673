"""A build's per-item data as flat arrays: ids, metadata codes, image hashes, stored vectors.

Nothing here is a Python object per item, so a build of a million items loads in milliseconds
and a query's work never depends on the build's size: an id is found by binary search over the
sorted ids, a filter compares integer codes, a candidate's vector is one row of a memory map.

items.npz (format 2; uncompressed, read whole at load: ~60 bytes per item) holds, in Annoy
order: `ids` (16-byte UUIDs, "S16"), `id_order` (the permutation that sorts them), `categories`
and `predicted` (int32 codes into `category_vocab` / `predicted_vocab`, -1 = none), `prices`
(float64, NaN = none) and `images` (uint64: the first 8 bytes of each image's sha256, so the
delta can tell an item whose change left its searchable state as the build has it).

vectors.npy holds the L2-normalised vectors as float32, float16 or int8 (then with
vector_scales.npy, float32 per row: vector ~ int8 row * scale); `StoredVectors` decodes rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ITEMS_FILE = "items.npz"
LEGACY_ITEMS_FILE = "items.json"
VECTORS_FILE = "vectors.npy"
SCALES_FILE = "vector_scales.npy"
NO_LABEL = -1
SCAN_BYTES = 32 << 20  # float32 rows decoded per step of an exact scan (bounded extra memory)


def image_key(sha256_hex: str | None) -> int:
    """The first 8 bytes of an image's sha256 as an integer (0 for none)."""
    return int(sha256_hex[:16], 16) if sha256_hex else 0


class ItemIds(Sequence[uuid.UUID]):
    """The build's item ids in Annoy order; `position` finds one by binary search."""

    def __init__(self, raw: np.ndarray, order: np.ndarray | None = None) -> None:
        self.raw = np.asarray(raw, dtype="S16")
        self._order = np.argsort(self.raw, kind="stable") if order is None else np.asarray(order)
        self._sorted = self.raw[self._order]

    @classmethod
    def of(cls, ids: Iterable[uuid.UUID]) -> ItemIds:
        return cls(np.array([i.bytes for i in ids], dtype="S16"))

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        # numpy strips trailing NUL bytes from "S" items; a UUID has exactly 16.
        return uuid.UUID(bytes=bytes(self.raw[int(index)]).ljust(16, b"\0"))

    def __iter__(self) -> Iterator[uuid.UUID]:
        for i in range(len(self)):
            yield self[i]

    @property
    def order(self) -> np.ndarray:
        return self._order

    def lookup(self, item_ids: Sequence[uuid.UUID]) -> np.ndarray:
        """Positions of `item_ids` (int64, -1 where not in the build)."""
        if not len(item_ids) or not len(self.raw):
            return np.full(len(item_ids), -1, dtype=np.int64)
        keys = np.array([i.bytes for i in item_ids], dtype="S16")
        at = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        found = self._sorted[at] == keys
        return np.where(found, self._order[at], -1).astype(np.int64)

    def position(self, item_id: uuid.UUID) -> int | None:
        found = int(self.lookup([item_id])[0])
        return None if found < 0 else found


class ItemPositions:
    """id → position in the build, as a read-only mapping over `ItemIds` (no dict per item)."""

    def __init__(self, ids: ItemIds) -> None:
        self._ids = ids

    def get(self, item_id: uuid.UUID, default: int | None = None) -> int | None:
        found = self._ids.position(item_id)
        return default if found is None else found

    def __getitem__(self, item_id: uuid.UUID) -> int:
        found = self._ids.position(item_id)
        if found is None:
            raise KeyError(item_id)
        return found

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, uuid.UUID) and self._ids.position(item_id) is not None

    def __len__(self) -> int:
        return len(self._ids)


class Labels:
    """Optional string labels per item as int32 codes into a vocabulary."""

    def __init__(self, codes: np.ndarray, vocab: Sequence[str]) -> None:
        self.codes = np.asarray(codes, dtype=np.int32)
        self.vocab = tuple(str(v) for v in vocab)
        self._code = {label: i for i, label in enumerate(self.vocab)}

    @classmethod
    def of(cls, values: Sequence[str | None]) -> Labels:
        encoder = LabelEncoder()
        return cls(np.array([encoder.code(v) for v in values], dtype=np.int32), encoder.vocab)

    def code(self, label: str | None) -> int | None:
        """The code of `label` (NO_LABEL for None); None when no item has it."""
        return NO_LABEL if label is None else self._code.get(label)

    def label(self, position: int) -> str | None:
        code = int(self.codes[position])
        return None if code == NO_LABEL else self.vocab[code]

    def matches(self, label: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Whether the rows carry `label` (never for rows without a label)."""
        code = self._code.get(label)
        codes = self.codes[rows]
        return np.zeros(len(codes), dtype=bool) if code is None else codes == code

    def tolist(self) -> list[str | None]:
        return [self.label(i) for i in range(len(self.codes))]


class LabelEncoder:
    """Codes for labels as a build meets them (the vocabulary in first-seen order)."""

    def __init__(self) -> None:
        self._codes: dict[str, int] = {}

    def code(self, label: str | None) -> int:
        if label is None:
            return NO_LABEL
        found = self._codes.get(label)
        if found is None:
            found = self._codes[label] = len(self._codes)
        return found

    @property
    def vocab(self) -> list[str]:
        return list(self._codes)


@dataclass(frozen=True)
class ItemArrays:
    """Per-item data of a build, in Annoy order."""

    ids: ItemIds
    categories: Labels
    predicted: Labels
    prices: np.ndarray  # float64, NaN where unset
    images: np.ndarray | None  # uint64 image keys; None for builds older than format 2

    def save(self, path: Path) -> None:
        np.savez(
            path,
            ids=self.ids.raw,
            id_order=self.ids.order,
            categories=self.categories.codes,
            category_vocab=np.array(self.categories.vocab, dtype=str),
            predicted=self.predicted.codes,
            predicted_vocab=np.array(self.predicted.vocab, dtype=str),
            prices=self.prices,
            images=self.images if self.images is not None else np.zeros(0, dtype=np.uint64),
        )

    @classmethod
    def load(cls, path: Path) -> ItemArrays:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                ids=ItemIds(data["ids"], data["id_order"]),
                categories=Labels(data["categories"], data["category_vocab"].tolist()),
                predicted=Labels(data["predicted"], data["predicted_vocab"].tolist()),
                prices=data["prices"],
                images=data["images"],
            )

    @classmethod
    def from_legacy(cls, meta: dict[str, Any]) -> ItemArrays:
        """items.json of a format-1 build (builds older than predictions lack them)."""
        n = len(meta["ids"])
        return cls(
            ids=ItemIds.of(uuid.UUID(i) for i in meta["ids"]),
            categories=Labels.of(meta["categories"]),
            predicted=Labels.of(meta.get("predicted_categories") or [None] * n),
            prices=np.array(
                [np.nan if p is None else float(p) for p in meta["prices"]], dtype=np.float64
            ),
            images=None,
        )


def encode_vectors(block: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised float32 rows as stored: (rows, per-row scales for int8 else None)."""
    if dtype == "float32":
        return block, None
    if dtype == "float16":
        return block.astype(np.float16), None
    if dtype == "int8":
        scales = np.abs(block).max(axis=1) / 127.0
        scales[scales == 0] = 1.0
        codes = np.rint(block / scales[:, None]).clip(-127, 127).astype(np.int8)
        return codes, scales.astype(np.float32)
    raise ValueError(f"unknown vector dtype {dtype!r}: float32, float16 or int8")


class StoredVectors:
    """vectors.npy (memory-mapped) decoded to float32 on access, row by row or in slices."""

    def __init__(self, data: np.ndarray, scales: np.ndarray | None = None) -> None:
        self.data = data
        self.scales = scales

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows: Any) -> np.ndarray:
        """Rows (an index array, preferably sorted: sequential reads, or a slice) as float32."""
        block = np.asarray(self.data[rows], dtype=np.float32)
        if self.scales is not None:
            scale = np.asarray(self.scales[rows], dtype=np.float32)
            block = block * (scale[..., None] if block.ndim > 1 else scale)
        return block

    def scores(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Cosines of `query` with the given rows (float32)."""
        scores = np.asarray(self.data[rows], dtype=np.float32) @ query
        if self.scales is not None:
            scores *= self.scales[rows]
        return scores

    def scan(self, query: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Cosines with every row (or the given rows), SCAN_BYTES of float32 at a time."""
        n = len(self.data) if rows is None else len(rows)
        step = max(256, SCAN_BYTES // (4 * max(1, self.data.shape[1])))
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, step):
            part = slice(start, min(n, start + step))
            out[part] = self.scores(part if rows is None else rows[part], query)
        return out
