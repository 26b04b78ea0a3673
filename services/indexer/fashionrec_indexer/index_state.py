"""The API process's view of the index: an immutable snapshot swapped atomically, plus a delta.

A `Snapshot` pairs one loaded build with the `Delta` of items changed since that build. The
refresher thread replaces `IndexState.current` (a single attribute store, atomic under the GIL)
when a newer build is ready; a query reads `current` once and keeps that snapshot to the end.
A build pins its model version, so after a model change's build is swapped in, searches and the
delta use only the new version's vectors; until then only the old one's.
The delta is refreshed on every query with one cheap probe, so writes are visible at once and
stale Annoy entries (deleted or re-imaged items) are masked. A change that leaves an item as the
build has it (same image, category, price and prediction: what a re-embed for a model change
or a repeated upload does) is not a delta entry, so the delta holds what really changed, never
the build's own rows.

What a probe costs is the number of rows it reads: those changed after the delta's floor (every
change at or below it is known). The floor advances two ways. By time: over a prefix of rows
changed at least `settle_s` ago (a writer commits within that; see
repository.settled_change_seq). And by the write horizon, usually within two probes: a probe
that saw change_seq H at clock t leaves a mark (t, H); once no transaction that started before
t is still in progress (pg_stat_activity, read before the probe's own snapshot), every writer
that took a sequence value below H has ended — values are taken in order, and a writer starts
before it takes one — so after that probe has read its rows, nothing at or below H can still
appear. Sessions whose state this role may not see, or a long transaction (an index build's
snapshot), leave only the time rule. So the rows a probe reads are the changes of the last
moments, not (as with the time rule alone) those of the last `settle_s`, which after a bulk
write or a rebuild right after one is the whole inventory. The probe must run in READ
COMMITTED (the engine's default): each statement its own snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fashionrec_shared.limits import SETTLE_S
from fashionrec_shared.storage import BlobStore
from fashionrec_shared.vectors import DTYPE
from sqlalchemy import Connection, Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.index_files import fetch, prune_cache
from fashionrec_indexer.item_arrays import image_key
from fashionrec_indexer.loaded_index import LoadedIndex, open_build

log = logging.getLogger("fashionrec.indexer.state")


@dataclass(frozen=True)
class DeltaEntry:
    change_seq: int
    vector: np.ndarray | None  # normalised; None when not searchable (deleted, not embedded)
    category: str | None
    price: float | None
    predicted_category: str | None = None  # of the delta's model version
    image_sha256: str | None = None  # the image `vector` is of (reused while it stays)


@dataclass(frozen=True)
class DeltaView:
    """Immutable state of the delta at one refresh; queries use it without locks."""

    model_version: str | None
    dim: int | None
    changed: frozenset[uuid.UUID]  # every changed id: their Annoy entries are stale
    masked_positions: np.ndarray  # positions in the build of `changed` ids (sorted, unique)
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


WARM_PROBES = 3  # probes before a new snapshot is served: the horizon advances in two


class Delta:
    """Items changed after a build's max_change_seq, kept current by `refresh` on each query."""

    def __init__(
        self,
        base_seq: int,
        model_version: str | None,
        dim: int | None,
        build: LoadedIndex | None = None,
        settle_s: float = SETTLE_S,
    ) -> None:
        # Without a build the model version follows the newest embedding (nothing is pinned
        # yet), except a version still being re-embedded for a model change.
        self._follow_model = model_version is None
        self._base_seq = base_seq
        self._model_version = model_version
        self._dim = dim
        self._build = build
        self._settle_s = settle_s
        self._lock = threading.Lock()
        self._entries: dict[uuid.UUID, DeltaEntry] = {}
        self._view = DeltaView.empty(model_version, dim)
        self._reset_floor()
        self.rows_read = 0  # by the last probe (tests, metrics)

    def _reset_floor(self) -> None:
        self._floor = self._base_seq  # every change at or below is known
        self._high = self._base_seq  # the newest change seen
        self._unstamped: int | None = None  # the last probe's high, stamped by the next probe
        self._marks: deque[tuple[Any, int]] = deque()  # (database clock, high seen before it)
        self._window: dict[uuid.UUID, int] = {}  # id → change_seq read above the floor

    def refresh(self, conn: Connection) -> DeltaView:
        with self._lock:
            if self._follow_model:
                latest = repo.unbuilt_model(conn)
                model, dim = latest if latest else (None, None)
                if model != self._model_version:
                    self._model_version, self._dim = model, dim
                    self._entries = {}
                    self._reset_floor()
                    self._view = DeltaView.empty(model, dim)
            # Read before the probe's snapshot; only needed while changes above the floor wait.
            horizon = repo.write_horizon(conn) if self._high > self._floor else None
            rows = repo.probe_changes(conn, self._floor, self._settle_s)
            self.rows_read = len(rows)
            if self._apply(conn, rows):
                self._view = self._make_view()
            self._advance(rows, horizon)
            return self._view

    def _as_built(self, position: int, row: Any, predicted: str | None) -> bool:
        """Whether the item's current state is what the build holds at `position`."""
        build = self._build
        if build is None or build.items.images is None or row.deleted:
            return False
        price = build.items.prices[position]
        return (
            image_key(row.image_sha256) == int(build.items.images[position])
            and row.category == build.items.categories.label(position)
            and predicted == build.items.predicted.label(position)
            and (np.isnan(price) if row.price is None else row.price == price)
        )

    def _apply(self, conn: Connection, rows: list[Any]) -> bool:
        """Bring the entries up to date with the probe's rows; True when any changed."""
        fresh = [r for r in rows if self._window.get(r.id) != r.change_seq]
        if not fresh:
            return False
        if self._build is not None:
            positions = self._build.ids.lookup([r.id for r in fresh])
        else:
            positions = np.full(len(fresh), -1, dtype=np.int64)
        # Predictions of the pinned model for the images (one key lookup per image).
        predicted: dict[str, str | None] = {}
        if self._model_version is not None:
            shas = {r.image_sha256 for r in fresh if not r.deleted}
            predicted = repo.predictions_of(conn, shas, self._model_version)
        dirty = False
        need: dict[str, list[Any]] = {}
        for row, position in zip(fresh, positions, strict=True):
            self._window[row.id] = row.change_seq
            label = predicted.get(row.image_sha256)
            if position >= 0 and self._as_built(int(position), row, label):
                dirty |= self._entries.pop(row.id, None) is not None
                continue
            entry = self._entries.get(row.id)
            if entry is not None and entry.change_seq == row.change_seq:
                continue
            dirty = True
            vector = None
            if not row.deleted and self._model_version is not None:
                if entry is not None and entry.image_sha256 == row.image_sha256:
                    vector = entry.vector  # the same image: the same vector
                if vector is None:
                    need.setdefault(row.image_sha256, []).append(row)
                    continue
            self._entries[row.id] = self._entry(row, vector, label)
        if need:
            assert self._model_version is not None
            found = repo.vectors_of(conn, list(need), self._model_version)
            for sha, waiting in need.items():
                vector = _normalised(found[sha]) if sha in found else None
                if vector is not None and self._dim is not None and vector.shape[0] != self._dim:
                    vector = None
                for row in waiting:
                    self._entries[row.id] = self._entry(row, vector, predicted.get(sha))
        return dirty

    @staticmethod
    def _entry(row: Any, vector: np.ndarray | None, predicted: str | None) -> DeltaEntry:
        return DeltaEntry(
            row.change_seq, vector, row.category, row.price, predicted, row.image_sha256
        )

    def _advance(self, rows: list[Any], horizon: repo.Horizon | None) -> None:
        """Move the floor up after a probe has read `rows` (see the module docstring).

        `horizon` None: none was read, as the floor was at the newest change seen."""
        floor = self._floor
        for row in rows:  # by time: a settled prefix
            if not row.settled:
                break
            floor = max(floor, row.change_seq)
        if horizon is not None:
            if self._unstamped is not None:  # the last probe's snapshot was before this clock
                self._marks.append((horizon.now, self._unstamped))
            since = horizon.since
            while self._marks and since is not None and self._marks[0][0] < since:
                floor = max(floor, self._marks.popleft()[1])
        if rows:
            self._high = max(self._high, rows[-1].change_seq)
        self._unstamped = self._high
        if floor > self._floor:
            self._floor = floor
            self._window = {i: seq for i, seq in self._window.items() if seq > floor}

    def _make_view(self) -> DeltaView:
        live = [(i, e) for i, e in self._entries.items() if e.vector is not None]
        dim = self._dim or 0
        matrix = np.empty((len(live), dim), dtype=np.float32)
        for row, (_, entry) in enumerate(live):
            matrix[row] = entry.vector
        masked = np.empty(0, dtype=np.int64)
        if self._build is not None and self._entries:
            found = self._build.ids.lookup(list(self._entries))
            masked = np.unique(found[found >= 0])
        return DeltaView(
            model_version=self._model_version,
            dim=self._dim,
            changed=frozenset(self._entries),
            masked_positions=masked,
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
                # Warm the delta before queries see the snapshot: the first probe reads what
                # changed since the build was taken, the next ones move the floor past it.
                for _ in range(WARM_PROBES):
                    snapshot.delta.refresh(conn)
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
            return Snapshot(None, Delta(0, None, None, None, self.settle_s))
        started = time.perf_counter()
        directory = fetch(self.store, build_id, self.cache_dir)
        fetched = time.perf_counter()
        build = open_build(directory)
        log.info(
            "index build %s: fetched and verified in %.2fs, opened in %.3fs (%d items)",
            build_id,
            fetched - started,
            time.perf_counter() - fetched,
            build.size,
        )
        delta = Delta(
            build.manifest.max_change_seq,
            build.manifest.model_version,
            build.dim,
            build,
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
                if not self.refresh() and self.current is not None:
                    # Keep the delta's floor moving while no query comes (see Delta).
                    with self.engine.connect() as conn:
                        self.current.delta.refresh(conn)
            except Exception:  # keep serving the old snapshot; retry next tick
                log.exception("index refresh failed")
            if self._stop.wait(interval_s):
                return
