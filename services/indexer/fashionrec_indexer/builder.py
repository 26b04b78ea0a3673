"""Index builds: a consistent Postgres snapshot → Annoy + exact vectors → object storage."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from annoy import AnnoyIndex
from fashionrec_shared.files import file_sha256
from fashionrec_shared.limits import SETTLE_S
from fashionrec_shared.progress import progress_bar
from fashionrec_shared.storage import BlobStore
from fashionrec_shared.vectors import DTYPE
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.index_files import PROJECTION_FILE, publish
from fashionrec_indexer.manifest import DATA_FILES, METRIC, IndexManifest
from fashionrec_indexer.settings import ANN_DIM, ANN_PROJECTION, N_TREES

log = logging.getLogger("fashionrec.indexer.builder")

# Rows an uncentred PCA is fitted on (a 2048² Gram matrix of these: ~1-2 s) and rows projected
# per step while adding items to Annoy (bounds the extra memory).
PCA_SAMPLE = 8192
CHUNK = 4096


@dataclass(frozen=True)
class BuildResult:
    status: str  # "ready" | "skipped"
    detail: str
    index: IndexManifest | None = None  # the build's manifest, when one was built

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The manifest as published (JSON), for task results and the CLI."""
        return self.index.to_json() if self.index is not None else None


@contextmanager
def build_lock(engine: Engine):  # type: ignore[no-untyped-def]
    """Serialise builds across processes with a session advisory lock."""
    with engine.connect() as conn:
        repo.acquire_build_lock(conn)
        conn.commit()
        try:
            yield
        finally:
            repo.release_build_lock(conn)
            conn.commit()


def build_index(
    engine: Engine,
    store: BlobStore,
    *,
    n_trees: int = N_TREES,
    ann_dim: int = ANN_DIM,
    ann_projection: str = ANN_PROJECTION,
    force: bool = False,
    reason: str = "manual",
    progress: bool = False,
    settle_s: float = SETTLE_S,
    work_dir: Path | None = None,
    model_version: str | None = None,
) -> BuildResult:
    """Build and publish an index; skipped when nothing changed.

    `model_version`: the version to build (a model change asks for the new one once every item
    has a vector of it). None: the version served now, i.e. of the latest ready build (before
    the first build: the newest embedding's) — so timer and threshold builds never publish a
    version that is still being re-embedded.
    `ann_dim`/`ann_projection`: the space the trees are built in (see write_ann).
    """
    with build_lock(engine):
        with engine.connect() as conn:
            target = model_version or repo.active_model_version(conn)
            if target is None:
                return BuildResult("skipped", "no embeddings stored yet")
            dim = repo.model_dim(conn, target)
            if dim is None:
                return BuildResult("skipped", f"no embeddings of model {target} stored")
            model_version = target
            last = repo.latest_ready_manifest(conn)
            newest = repo.max_change_seq(conn)
            if (
                not force
                and last is not None
                and last.model_version == model_version
                and last.seen_change_seq == newest
            ):
                return BuildResult("skipped", "nothing changed since the last build")
            build_id = uuid.uuid4()
            repo.insert_build(conn, build_id, model_version)
            conn.commit()
        tmp = Path(tempfile.mkdtemp(prefix=f"build-{build_id}-", dir=work_dir))
        try:
            manifest = _write_build(
                engine,
                tmp,
                str(build_id),
                model_version,
                dim,
                settle_s,
                progress,
                lambda vectors, bar: write_ann(
                    tmp, vectors, n_trees, ann_dim, ann_projection, progress=bar
                ),
            )
            manifest = manifest.model_copy(update={"reason": reason})
            publish(store, tmp, manifest)
            with engine.begin() as conn:
                repo.finish_build(conn, build_id, manifest)
        except BaseException as exc:
            with engine.begin() as conn:
                repo.fail_build(conn, build_id, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("index build %s ready: %d items (%s)", build_id, manifest.item_count, reason)
    return BuildResult("ready", f"built {manifest.item_count} items", manifest)


def fit_projection(vectors: np.ndarray, ann_dim: int, kind: str, seed: int = 0) -> np.ndarray:
    """A (dim, ann_dim) matrix with orthonormal columns mapping vectors into the trees' space.

    "pca": the top right-singular vectors of (a sample of) the uncentred vectors, i.e. the
    subspace that keeps dot products best; lossless for the items when their rank ≤ ann_dim.
    "random": a seeded random orthogonal matrix (data-independent; Johnson-Lindenstrauss).
    """
    dim = vectors.shape[1]
    rng = np.random.default_rng(seed)
    if kind == "random":
        q, _ = np.linalg.qr(rng.standard_normal((dim, ann_dim)))
        return np.ascontiguousarray(q, dtype=np.float32)
    if kind != "pca":
        raise ValueError(f"unknown projection {kind!r}: pca or random")
    n = vectors.shape[0]
    rows = np.sort(rng.choice(n, size=PCA_SAMPLE, replace=False)) if n > PCA_SAMPLE else None
    sample = np.asarray(vectors if rows is None else vectors[rows], dtype=np.float64)
    if sample.shape[0] >= dim:
        _, eigvecs = np.linalg.eigh(sample.T @ sample)  # ascending eigenvalues
        return np.ascontiguousarray(eigvecs[:, ::-1][:, :ann_dim], dtype=np.float32)
    # Fewer vectors than dimensions: the thin SVD costs O(n² dim), where eigh of the dim x dim
    # Gram matrix costs O(dim³) (minutes at 4160-d for a catalogue of 40 items).
    _, _, vt = np.linalg.svd(sample, full_matrices=False)  # descending singular values
    basis = vt.T
    want = min(ann_dim, dim)
    if basis.shape[1] < want:  # complete the span with seeded orthonormal directions
        extra = rng.standard_normal((dim, want - basis.shape[1]))
        basis, _ = np.linalg.qr(np.concatenate([basis, extra], axis=1))
    return np.ascontiguousarray(basis[:, :want], dtype=np.float32)


def write_ann(
    out: Path,
    vectors: np.ndarray,
    n_trees: int,
    ann_dim: int = ANN_DIM,
    projection: str = ANN_PROJECTION,
    progress: Any = None,
) -> dict[str, Any]:
    """Build index.ann (and projection.npy) in `out` from the normalised (N, D) vectors.

    The trees are built over `vectors @ P` when 0 < ann_dim < D (P from fit_projection), else
    over the vectors themselves. Returns the manifest fields that describe it.
    """
    count, dim = vectors.shape
    matrix = None
    if 0 < ann_dim < dim and count > 0:
        matrix = fit_projection(vectors, ann_dim, projection)
        np.save(out / PROJECTION_FILE, matrix)
    space = dim if matrix is None else ann_dim
    annoy = AnnoyIndex(space, METRIC)
    for start in range(0, count, CHUNK):
        block = np.asarray(vectors[start : start + CHUNK], dtype=np.float32)
        if matrix is not None:
            block = block @ matrix
        for offset, row in enumerate(block):
            annoy.add_item(start + offset, row)
    if progress is not None:
        progress.add_task(f"building {n_trees} Annoy trees ({space}-d)", total=None)
    annoy.build(n_trees)
    annoy.save(str(out / "index.ann"))
    annoy.unload()
    files = list(DATA_FILES) + ([PROJECTION_FILE] if matrix is not None else [])
    return {
        "n_trees": n_trees,
        "ann_dim": space,
        "projection": None if matrix is None else projection,
        "files": files,
    }


def _write_build(
    engine: Engine,
    out: Path,
    build_id: str,
    model_version: str,
    dim: int,
    settle_s: float,
    progress: bool,
    make_ann: Any,
) -> IndexManifest:
    ids: list[str] = []
    categories: list[str | None] = []
    predicted_categories: list[str | None] = []
    prices: list[float | None] = []
    # One REPEATABLE READ snapshot: the rows and max_change_seq describe the same instant.
    with (
        engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn,
        conn.begin(),
    ):
        settled_seq, seen_seq = repo.settled_change_seq(conn, settle_s)
        count = repo.count_build_rows(conn, model_version, dim)
        vectors = np.lib.format.open_memmap(
            out / "vectors.npy", mode="w+", dtype=np.float32, shape=(count, dim)
        )
        with progress_bar(progress) as bar:
            task = bar.add_task("reading vectors", total=count)
            for i, row in enumerate(repo.build_rows(conn, model_version, dim)):
                vector = np.frombuffer(row.vector, dtype=DTYPE).astype(np.float32)
                norm = float(np.linalg.norm(vector))
                vectors[i] = vector / norm if norm > 0 else vector
                ids.append(str(row.id))
                categories.append(row.category)
                predicted_categories.append(row.predicted_category)
                prices.append(row.price)
                if i % 256 == 0:
                    bar.update(task, completed=i + 1)
            bar.update(task, completed=count)
            vectors.flush()
            ann = make_ann(vectors, bar)
    del vectors
    (out / "items.json").write_text(
        json.dumps(
            {
                "ids": ids,
                "categories": categories,
                "predicted_categories": predicted_categories,
                "prices": prices,
            }
        )
    )
    return IndexManifest(
        build_id=build_id,
        item_count=len(ids),
        dim=dim,
        model_version=model_version,
        metric=METRIC,
        **ann,
        checksums={name: file_sha256(out / name) for name in ann["files"]},
        max_change_seq=settled_seq,
        seen_change_seq=seen_seq,
        created_at=datetime.now(UTC),
    )
