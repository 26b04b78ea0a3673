"""Index builds: a consistent Postgres snapshot → Annoy + exact vectors → object storage."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from annoy import AnnoyIndex
from fashionrec_shared.storage import BlobStore
from fashionrec_shared.vectors import DTYPE
from sqlalchemy import Engine

from fashionrec_indexer import repository as repo
from fashionrec_indexer.index_files import DATA_FILES, METRIC, file_sha256, publish

log = logging.getLogger("fashionrec.indexer.builder")

# Writers' transactions are far shorter than this; see repository.settled_change_seq.
SETTLE_S = 30.0


@dataclass(frozen=True)
class BuildResult:
    status: str  # "ready" | "skipped"
    detail: str
    manifest: dict[str, Any] | None = None


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
    n_trees: int = 50,
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
            last = repo.latest_ready_build(conn)
            newest = repo.max_change_seq(conn)
            if (
                not force
                and last is not None
                and last.model_version == model_version
                and (last.manifest or {}).get("seen_change_seq") == newest
            ):
                return BuildResult("skipped", "nothing changed since the last build")
            build_id = uuid.uuid4()
            repo.insert_build(conn, build_id, model_version)
            conn.commit()
        tmp = Path(tempfile.mkdtemp(prefix=f"build-{build_id}-", dir=work_dir))
        try:
            manifest = _write_build(
                engine, tmp, str(build_id), model_version, dim, n_trees, settle_s, progress
            )
            manifest["reason"] = reason
            publish(store, tmp, manifest)
            with engine.begin() as conn:
                repo.finish_build(conn, build_id, manifest)
        except BaseException as exc:
            with engine.begin() as conn:
                repo.fail_build(conn, build_id, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("index build %s ready: %d items (%s)", build_id, manifest["item_count"], reason)
    return BuildResult("ready", f"built {manifest['item_count']} items", manifest)


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


def _write_build(
    engine: Engine,
    out: Path,
    build_id: str,
    model_version: str,
    dim: int,
    n_trees: int,
    settle_s: float,
    progress: bool,
) -> dict[str, Any]:
    annoy = AnnoyIndex(dim, METRIC)
    ids: list[str] = []
    categories: list[str | None] = []
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
        with _progress(progress) as bar:
            task = bar.add_task("reading vectors", total=count) if bar else None
            for i, row in enumerate(repo.build_rows(conn, model_version, dim)):
                vector = np.frombuffer(row.vector, dtype=DTYPE).astype(np.float32)
                norm = float(np.linalg.norm(vector))
                vectors[i] = vector / norm if norm > 0 else vector
                annoy.add_item(i, vectors[i])
                ids.append(str(row.id))
                categories.append(row.category)
                prices.append(row.price)
                if bar and i % 256 == 0:
                    bar.update(task, completed=i + 1)
            if bar:
                bar.update(task, completed=count)
                bar.add_task(f"building {n_trees} Annoy trees", total=None)
            annoy.build(n_trees)
    vectors.flush()
    del vectors
    annoy.save(str(out / "index.ann"))
    annoy.unload()
    (out / "items.json").write_text(
        json.dumps({"ids": ids, "categories": categories, "prices": prices})
    )
    return {
        "build_id": build_id,
        "item_count": len(ids),
        "dim": dim,
        "model_version": model_version,
        "metric": METRIC,
        "n_trees": n_trees,
        "files": list(DATA_FILES),
        "checksums": {name: file_sha256(out / name) for name in DATA_FILES},
        "max_change_seq": settled_seq,
        "seen_change_seq": seen_seq,
        "created_at": datetime.now(UTC).isoformat(),
    }
