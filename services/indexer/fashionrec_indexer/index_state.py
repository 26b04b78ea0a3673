"""The API process's view of the index: an immutable snapshot swapped atomically, plus a delta.

A `Snapshot` pairs one loaded build with the `Delta` of items changed since that build. The
refresher thread replaces `IndexState.current` (a single attribute store, atomic under the GIL)
when a newer build is ready; a query reads `current` once and keeps that snapshot to the end.
A build pins its model version, so after a model change's build is swapped in, searches and the
delta use only the new version's vectors; until then only the old one's.
The delta is refreshed on every query with one cheap probe, so writes are visible at once and
stale Annoy entries (deleted or re-imaged items) are masked.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fashionrec_shared.storage import BlobStore
from fashionrec_shared.vectors import DTYPE
from sqlalchemy import Connection, Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.builder import SETTLE_S
from fashionrec_indexer.index_files import LoadedIndex, fetch, open_build, prune_cache

log = logging.getLogger("fashionrec.indexer.state")


@dataclass(frozen=True)
class DeltaEntry:
    change_seq: int
    vector: np.ndarray | None  # normalised; None when not searchable (deleted, not embedded)
    category: str | None
    price: float | None
    predicted_category: str | None = None  # of the delta's model version


@dataclass(frozen=True)
class DeltaView:
    """Immutable state of the delta at one refresh; queries use it without locks."""

    model_version: str | None
    dim: int | None
    changed: frozenset[uuid.UUID]  # every changed id: their Annoy entries are stale
    masked_positions: np.ndarray  # positions in the build of `changed` ids
    ids: list[uuid.UUID]  # searchable delta items
    vectors: np.ndarray  # (M, D) normalised, C-contiguous float32: one matvec scores them all
    categories: np.ndarray
    prices: np.ndarray
    positions: dict[uuid.UUID, int] = field(default_factory=dict)  # id → row of `vectors`
    predicted_categories: np.ndarray | None = None  # object array like `categories`; None: none

    @classmethod
    def empty(cls, model_version: str | None, dim: int | None) -> DeltaView:
        return cls(
            model_version=model_version,
            dim=dim,
            changed=frozenset(),
            masked_positions=np.empty(0, dtype=np.int64),
            ids=[],
            vectors=np.empty((0, dim or 0), dtype=np.float32),
            categories=np.empty(0, dtype=object),
            prices=np.empty(0, dtype=np.float64),
            predicted_categories=np.empty(0, dtype=object),
        )


def _normalised(raw: bytes) -> np.ndarray:
    vector = np.frombuffer(raw, dtype=DTYPE).astype(np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class Delta:
    """Items changed after a build's max_change_seq, kept current by `refresh` on each query."""

    def __init__(
        self,
        base_seq: int,
        model_version: str | None,
        dim: int | None,
        positions: dict[uuid.UUID, int],
        settle_s: float = SETTLE_S,
    ) -> None:
        # Without a build the model version follows the newest embedding (nothing is pinned
        # yet), except a version still being re-embedded for a model change.
        self._follow_model = model_version is None
        self._base_seq = base_seq
        self._model_version = model_version
        self._dim = dim
        self._positions = positions
        self._settle_s = settle_s
        self._lock = threading.Lock()
        self._watermark = base_seq
        self._entries: dict[uuid.UUID, DeltaEntry] = {}
        self._view = DeltaView.empty(model_version, dim)

    def refresh(self, conn: Connection) -> DeltaView:
        with self._lock:
            if self._follow_model:
                latest = repo.unbuilt_model(conn)
                model, dim = latest if latest else (None, None)
                if model != self._model_version:
                    self._model_version, self._dim = model, dim
                    self._watermark, self._entries = self._base_seq, {}
                    self._view = DeltaView.empty(model, dim)
            rows = repo.changes_since(conn, self._watermark, self._settle_s)
            stale = [
                r.id
                for r in rows
                if r.id not in self._entries or self._entries[r.id].change_seq != r.change_seq
            ]
            if stale:
                for row in repo.delta_rows(conn, stale, self._model_version):
                    vector = None
                    if row.deleted_at is None and row.vector is not None:
                        vector = _normalised(row.vector)
                        if self._dim is not None and vector.shape[0] != self._dim:
                            vector = None
                    self._entries[row.id] = DeltaEntry(
                        row.change_seq, vector, row.category, row.price, row.predicted_category
                    )
                self._view = self._make_view()
            # Advance only over a settled prefix: a lower sequence value may still be in flight.
            for row in rows:
                if not row.settled:
                    break
                self._watermark = max(self._watermark, row.change_seq)
            return self._view

    def _make_view(self) -> DeltaView:
        live = [(i, e) for i, e in self._entries.items() if e.vector is not None]
        dim = self._dim or 0
        matrix = np.empty((len(live), dim), dtype=np.float32)
        for row, (_, entry) in enumerate(live):
            matrix[row] = entry.vector
        masked = [self._positions[i] for i in self._entries if i in self._positions]
        return DeltaView(
            model_version=self._model_version,
            dim=self._dim,
            changed=frozenset(self._entries),
            masked_positions=np.array(masked, dtype=np.int64),
            ids=[i for i, _ in live],
            vectors=matrix,
            categories=np.array([e.category for _, e in live], dtype=object),
            prices=np.array(
                [np.nan if e.price is None else e.price for _, e in live], dtype=np.float64
            ),
            positions={item_id: row for row, (item_id, _) in enumerate(live)},
            predicted_categories=np.array([e.predicted_category for _, e in live], dtype=object),
        )


@dataclass(frozen=True)
class Snapshot:
    build: LoadedIndex | None
    delta: Delta = field(compare=False)

    @property
    def index_version(self) -> str | None:
        return self.build.build_id if self.build else None

    @property
    def build_model_version(self) -> str | None:
        return self.build.manifest.model_version if self.build else None

    def view(self, conn: Connection) -> SnapshotView:
        """The snapshot with its delta refreshed now: what one request reads."""
        return SnapshotView(self, self.delta.refresh(conn))


@dataclass(frozen=True)
class SnapshotView:
    """A snapshot and its delta as one request saw them (both immutable)."""

    snapshot: Snapshot
    delta: DeltaView

    @property
    def build(self) -> LoadedIndex | None:
        return self.snapshot.build

    @property
    def index_version(self) -> str | None:
        return self.snapshot.index_version

    @property
    def model_version(self) -> str | None:
        """The version queries are answered with: the build's; before the first build the
        delta's (the newest embedding's)."""
        if self.build is not None:
            return self.build.manifest.model_version
        return self.delta.model_version

    @property
    def dim(self) -> int | None:
        return self.build.dim if self.build is not None else self.delta.dim


class IndexState:
    """Holds the current snapshot; a background thread swaps in newer ready builds."""

    def __init__(
        self,
        engine: Engine,
        store: BlobStore,
        cache_dir: Path,
        settle_s: float = SETTLE_S,
    ) -> None:
        self.engine = engine
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.settle_s = settle_s
        self.current: Snapshot | None = None
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the latest ready build if it is not the current one; True when swapped."""
        with self._swap_lock:
            with self.engine.connect() as conn:
                latest = repo.latest_ready_build(conn)
            current = self.current
            latest_id = str(latest.id) if latest else None
            if current is not None and current.index_version == latest_id:
                return False
            snapshot = self._load(latest_id)
            with self.engine.connect() as conn:
                snapshot.delta.refresh(conn)  # warm the delta before queries see the snapshot
            self.current = snapshot  # the atomic swap
            log.info("index snapshot now %s", latest_id or "<no build>")
            if snapshot.build is not None:
                keep = {snapshot.build.build_id}
                if current is not None and current.build is not None:
                    keep.add(current.build.build_id)
                prune_cache(self.cache_dir, keep)
            return True

    def _load(self, build_id: str | None) -> Snapshot:
        if build_id is None:
            return Snapshot(None, Delta(0, None, None, {}, self.settle_s))
        build = open_build(fetch(self.store, build_id, self.cache_dir))
        delta = Delta(
            build.manifest.max_change_seq,
            build.manifest.model_version,
            build.dim,
            build.positions,
            self.settle_s,
        )
        return Snapshot(build, delta)

    def start(self, interval_s: float) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="index-refresher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self, interval_s: float) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # keep serving the old snapshot; retry next tick
                log.exception("index refresh failed")
            if self._stop.wait(interval_s):
                return
