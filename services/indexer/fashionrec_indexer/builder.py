"""Index builds: a consistent Postgres snapshot → Annoy + exact vectors → object storage."""

from __future__ import annotations

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
from fashionrec_indexer.index_eval import calibrate_search_k
from fashionrec_indexer.index_files import PROJECTION_FILE, publish
from fashionrec_indexer.item_arrays import (
    ITEMS_FILE,
    SCALES_FILE,
    VECTORS_FILE,
    ItemArrays,
    ItemIds,
    LabelEncoder,
    Labels,
    StoredVectors,
    encode_vectors,
    image_key,
)
from fashionrec_indexer.loaded_index import open_build
from fashionrec_indexer.manifest import FORMAT, METRIC, IndexManifest
from fashionrec_indexer.settings import (
    ANN_CANDIDATES,
    ANN_DIM,
    ANN_PROJECTION,
    CALIBRATION_QUERIES,
    N_TREES,
    TARGET_RECALL,
    VECTOR_DTYPE,
)

log = logging.getLogger("fashionrec.indexer.builder")

# Rows an uncentred PCA is fitted on (a 2048² Gram matrix of these: ~1-2 s) and rows projected
# per step while adding items to Annoy (bounds the extra memory).
PCA_SAMPLE = 8192
CHUNK = 4096
# Rows fetched from Postgres per step of a build (a server-side cursor): with the item arrays,
# what a build holds in memory besides Annoy's file-backed trees.
FETCH_ROWS = 2048


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
    vector_dtype: str = VECTOR_DTYPE,
    target_recall: float = TARGET_RECALL,
    calibration_queries: int = CALIBRATION_QUERIES,
    ann_candidates: int = ANN_CANDIDATES,
) -> BuildResult:
    """Build and publish an index; skipped when nothing changed.

    `model_version`: the version to build (a model change asks for the new one once every item
    has a vector of it). None: the version served now, i.e. of the latest ready build (before
    the first build: the newest embedding's) — so timer and threshold builds never publish a
    version that is still being re-embedded.
    `ann_dim`/`ann_projection`: the space the trees are built in (see write_ann).
    `vector_dtype`: how vectors.npy stores the vectors re-scored per query (float32, float16, or
    int8 with a scale per row; see item_arrays).
    `target_recall`: the build calibrates the Annoy search_k queries use to reach this recall@5
    on `calibration_queries` of its items with `ann_candidates` candidates (0: it does not; see
    index_eval.calibrate_search_k).
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
                vector_dtype,
                lambda vectors, bar: write_ann(
                    tmp, vectors, n_trees, ann_dim, ann_projection, progress=bar
                ),
            )
            if target_recall > 0:
                manifest = _calibrated(
                    tmp, manifest, target_recall, calibration_queries, ann_candidates, progress
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


def _calibrated(
    directory: Path,
    manifest: IndexManifest,
    target: float,
    samples: int,
    candidates: int,
    progress: bool,
) -> IndexManifest:
    """The manifest with the search_k the written build calibrated (see index_eval)."""
    with progress_bar(progress) as bar:
        found = calibrate_search_k(
            open_build(directory, manifest), target, samples, candidates, progress=bar
        )
    if not found.samples:
        return manifest
    level = logging.INFO if found.recall >= target else logging.WARNING
    log.log(
        level,
        "index build %s: search_k %d gives recall@5 %.3f on %d of its items (target %.2f; %.1f s)",
        manifest.build_id,
        found.search_k,
        found.recall,
        found.samples,
        target,
        found.seconds,
    )
    return manifest.model_copy(
        update={"search_k": found.search_k, "calibrated_recall": round(found.recall, 4)}
    )


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
    sample = np.asarray(vectors[:n] if rows is None else vectors[rows], dtype=np.float32)
    if sample.shape[0] >= dim:
        gram = np.zeros((dim, dim), dtype=np.float64)
        for start in range(0, len(sample), 1024):  # float64 sums without a float64 copy
            block = sample[start : start + 1024].astype(np.float64)
            gram += block.T @ block
        del sample
        _, eigvecs = np.linalg.eigh(gram)  # ascending eigenvalues
        return np.ascontiguousarray(eigvecs[:, ::-1][:, :ann_dim], dtype=np.float32)
    # Fewer vectors than dimensions: the thin SVD costs O(n² dim), where eigh of the dim x dim
    # Gram matrix costs O(dim³) (minutes at 4160-d for a catalogue of 40 items).
    _, _, vt = np.linalg.svd(sample.astype(np.float64), full_matrices=False)  # descending
    basis = vt.T
    want = min(ann_dim, dim)
    if basis.shape[1] < want:  # complete the span with seeded orthonormal directions
        extra = rng.standard_normal((dim, want - basis.shape[1]))
        basis, _ = np.linalg.qr(np.concatenate([basis, extra], axis=1))
    return np.ascontiguousarray(basis[:, :want], dtype=np.float32)


def write_ann(
    out: Path,
    vectors: Any,
    n_trees: int,
    ann_dim: int = ANN_DIM,
    projection: str = ANN_PROJECTION,
    progress: Any = None,
) -> dict[str, Any]:
    """Build index.ann (and projection.npy) in `out` from the normalised (N, D) vectors (an
    array, or anything with `shape` whose slices and sorted row arrays are float32 arrays).

    The trees are built over `vectors @ P` when 0 < ann_dim < D (P from fit_projection), else
    over the vectors themselves, in the file itself (Annoy's on-disk build: the index lives in
    the page cache, not in this process's heap). Returns the manifest fields that describe it.
    """
    count, dim = vectors.shape
    matrix = None
    if 0 < ann_dim < dim and count > 0:
        matrix = fit_projection(vectors, ann_dim, projection)
        np.save(out / PROJECTION_FILE, matrix)
    space = dim if matrix is None else ann_dim
    annoy = AnnoyIndex(space, METRIC)
    annoy.on_disk_build(str(out / "index.ann"))
    for start in range(0, count, CHUNK):
        block = np.asarray(vectors[start : start + CHUNK], dtype=np.float32)
        if matrix is not None:
            block = block @ matrix
        for offset, row in enumerate(block):
            annoy.add_item(start + offset, row)
    if progress is not None:
        progress.add_task(f"building {n_trees} Annoy trees ({space}-d)", total=None)
    annoy.build(n_trees)
    annoy.unload()
    return {
        "n_trees": n_trees,
        "ann_dim": space,
        "projection": None if matrix is None else projection,
        "files": ["index.ann"] + ([PROJECTION_FILE] if matrix is not None else []),
    }


class VectorFile:
    """Rows of a vectors.npy being built, decoded to float32; every read maps the file afresh
    and unmaps it after, so reading a build's vectors back never keeps them resident in the
    builder (they stay in the page cache)."""

    def __init__(self, path: Path, shape: tuple[int, int], scales: np.ndarray | None) -> None:
        self.path = path
        self.shape = shape
        self.scales = scales

    def __getitem__(self, rows: Any) -> np.ndarray:
        data = np.load(self.path, mmap_mode="r")
        try:
            return np.array(StoredVectors(data, self.scales)[rows], dtype=np.float32)
        finally:
            del data


def _write_header(fh: Any, dtype: np.dtype, shape: tuple[int, int]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(fh, header)


def _write_build(
    engine: Engine,
    out: Path,
    build_id: str,
    model_version: str,
    dim: int,
    settle_s: float,
    progress: bool,
    vector_dtype: str,
    make_ann: Any,
) -> IndexManifest:
    """Stream the build's rows from Postgres (a server-side cursor, FETCH_ROWS at a time) into
    vectors.npy (appended, never mapped) and the item arrays, then build the trees."""
    stored_dtype = np.dtype({"float32": np.float32, "float16": np.float16, "int8": np.int8}[
        vector_dtype
    ])  # fmt: skip
    categories, predicted = LabelEncoder(), LabelEncoder()
    # One REPEATABLE READ snapshot: the rows and max_change_seq describe the same instant.
    with (
        engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn,
        conn.begin(),
    ):
        repo.plan_for_whole_tables(conn)
        settled_seq, seen_seq = repo.settled_change_seq(conn, settle_s)
        count = repo.count_build_rows(conn, model_version, dim)
        ids = np.empty(count, dtype="S16")
        category_codes = np.empty(count, dtype=np.int32)
        predicted_codes = np.empty(count, dtype=np.int32)
        prices = np.empty(count, dtype=np.float64)
        images = np.empty(count, dtype=np.uint64)
        scales = np.empty(count, dtype=np.float32) if vector_dtype == "int8" else None
        with progress_bar(progress) as bar, open(out / VECTORS_FILE, "wb") as fh:
            task = bar.add_task("reading vectors", total=count)
            _write_header(fh, stored_dtype, (count, dim))
            at = 0
            for rows in repo.build_chunks(conn, model_version, dim, FETCH_ROWS):
                m = len(rows)
                if at + m > count:
                    raise RuntimeError("more build rows than counted in the same snapshot")
                block = np.frombuffer(b"".join(r.vector for r in rows), dtype=DTYPE)
                block = block.reshape(m, dim).astype(np.float32)
                norms = np.linalg.norm(block, axis=1, keepdims=True)
                norms[norms == 0] = 1.0
                encoded, row_scales = encode_vectors(block / norms, vector_dtype)
                fh.write(np.ascontiguousarray(encoded, dtype=stored_dtype).tobytes())
                if scales is not None and row_scales is not None:
                    scales[at : at + m] = row_scales
                part = slice(at, at + m)
                ids[part] = [r.id.bytes for r in rows]
                category_codes[part] = [categories.code(r.category) for r in rows]
                predicted_codes[part] = [predicted.code(r.predicted_category) for r in rows]
                prices[part] = [np.nan if r.price is None else r.price for r in rows]
                images[part] = [image_key(r.image_sha256) for r in rows]
                at += m
                bar.update(task, completed=at)
            if at != count:
                raise RuntimeError(f"counted {count} build rows, read {at}")
    # The trees are built after the snapshot's transaction has ended (it would hold back
    # vacuum and the delta's horizon; see index_state).
    if scales is not None:
        np.save(out / SCALES_FILE, scales)
    with progress_bar(progress) as bar:
        ann = make_ann(VectorFile(out / VECTORS_FILE, (count, dim), scales), bar)
    items = ItemArrays(
        ids=ItemIds(ids),
        categories=Labels(category_codes, categories.vocab),
        predicted=Labels(predicted_codes, predicted.vocab),
        prices=prices,
        images=images,
    )
    items.save(out / ITEMS_FILE)
    files = [ann["files"][0], VECTORS_FILE, ITEMS_FILE, *ann["files"][1:]]
    if scales is not None:
        files.append(SCALES_FILE)
    ann = {**ann, "files": files}
    return IndexManifest(
        build_id=build_id,
        item_count=count,
        dim=dim,
        model_version=model_version,
        metric=METRIC,
        **ann,
        format=FORMAT,
        vector_dtype=vector_dtype,
        checksums={name: file_sha256(out / name) for name in ann["files"]},
        max_change_seq=settled_seq,
        seen_change_seq=seen_seq,
        created_at=datetime.now(UTC),
    )
