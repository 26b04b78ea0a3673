"""Indexer settings (env prefix FASHIONREC_INDEXER_; the database URL also as DATABASE_URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fashionrec_shared.limits import SETTLE_S
from fashionrec_shared.settings import ServiceSettings
from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

# Nearest-neighbour defaults, measured with benchmarks/ann.py (100k clustered unit vectors,
# 2-core EPYC shared with other jobs, medians of single queries through search.search).
# Annoy over the 2048-d vectors is slow per query: a leaf holds ~2k items (leaves are sized
# like a node), so a query scores >= 1-2k 2048-d vectors; 50 trees gave recall@5 0.96 at
# 1.7 ms with 50 candidates, 0.99 at 3.0 ms with 100; build 25 s, index.ann 840 MB.
# So the trees are built over a 256-d uncentred-PCA projection of the vectors and only *find
# candidates*: the search re-scores ANN_CANDIDATES of them exactly in the full dimension from
# vectors.npy (scores stay exact cosines of the served embedding). 50 trees x 100 candidates
# (Annoy search_k = 100 x 50): recall@5 0.997 at 0.8 ms, build 6.7 s, index.ann 160 MB. The
# candidate count matters more than search_k (50 candidates: 0.81). A random orthogonal
# projection is the data-independent alternative (0.98); PCA also adapts to real embeddings,
# whose intrinsic dimension is far below 2048. 512-d embeddings: 0.999 at 0.7 ms the same way.
N_TREES = 50
ANN_DIM = 256  # 0: trees over the full vectors (no projection)
ANN_PROJECTION = "pca"
ANN_CANDIDATES = 100
SEARCH_K = -1  # SEARCH_K_PER_CANDIDATE x the candidates asked for
# Annoy scores every distinct item of the leaves it visits (up to search_k of them) in the
# trees' space: with Annoy's own default (candidates x n_trees = 5000) that work grows with the
# inventory until it holds ~5000 items, then stays (a 100k build: 0.70 ms of a 1.03 ms search,
# a 1k one: 0.25 of 0.53). 20 per candidate (2000): 0.34 ms at 100k, recall@5 0.9973 -> 0.9967
# (1k: 0.999 both; benchmarks/scale.py mixtures, PCA 256, 50 trees, 100 candidates).
# A fixed search_k keeps the query cost flat but not the recall: at 1M items of the isotropic
# 1280-d mixture, recall@5 is 0.44 at 2000, 0.83 at 20000, 0.94 at 50000 (7.5 ms in process)
# and 0.98 at 100000 (15 ms). So each build calibrates its own search_k (index_eval): the
# smallest from this floor up whose recall@5 on CALIBRATION_QUERIES of its own items reaches
# TARGET_RECALL; -1 searches with that (never below the floor for the candidates asked).
SEARCH_K_PER_CANDIDATE = 20
# 0.96 on the sample, so that new queries (whose recall varies around it) stay at >= 0.95.
TARGET_RECALL = 0.96
CALIBRATION_QUERIES = 200
# How a build stores the vectors it re-scores per query (benchmarks/scale.py: recall@5 against
# exact float32 search the same for all three; float16 halves the files and the page cache a
# query touches, int8 quarters them).
VECTOR_DTYPE = "float16"


def normalise_database_url(url: str) -> str:
    """Point plain Postgres URLs at the psycopg2 driver; socket URLs (`?host=/dir`) pass as is."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    raise ValueError(f"database_url must be a postgresql:// URL, got {url.split(':', 1)[0]}://…")


class IndexerSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="FASHIONREC_INDEXER_",
        extra="ignore",
        env_nested_delimiter="__",
        populate_by_name=True,
    )

    database_url: str = Field(
        validation_alias=AliasChoices(
            "FASHIONREC_INDEXER_DATABASE_URL", "DATABASE_URL", "database_url"
        ),
    )
    host: str = "127.0.0.1"
    port: int = 8001
    index_dir: Path = Path("data/index-cache")
    n_trees: int = Field(default=N_TREES, ge=1)
    # Annoy nodes inspected per query; -1 = the build's calibrated one, at least
    # SEARCH_K_PER_CANDIDATE x the candidates asked.
    search_k: int = SEARCH_K
    # What a build calibrates its search_k to (recall@5 on its own items; 0: no calibration).
    target_recall: float = Field(default=TARGET_RECALL, ge=0, le=1)
    calibration_queries: int = Field(default=CALIBRATION_QUERIES, ge=10)
    # Dimension of the space the Annoy trees are built in (0 or ≥ the embedding dim: none).
    ann_dim: int = Field(default=ANN_DIM, ge=0)
    ann_projection: Literal["pca", "random"] = ANN_PROJECTION
    # Annoy candidates re-scored exactly per query (at least; more when filters need it).
    ann_candidates: int = Field(default=ANN_CANDIDATES, ge=1)
    # How builds store the vectors queries re-score (see builder.build_index).
    vector_dtype: Literal["float32", "float16", "int8"] = VECTOR_DTYPE
    # Candidates a collapsing query (one result per variant group) or a recommendation looks
    # at, at most: a catalogue of a few huge groups answers fewer than k rather than scan more.
    max_candidates: int = Field(default=1000, ge=1)
    rebuild_min_new: int = Field(default=1000, ge=1)
    rebuild_interval_s: float = Field(default=600, gt=0)
    refresh_interval_s: float = Field(default=1.0, gt=0)
    # How long a writer's transaction may take to commit; see repository.settled_change_seq.
    settle_s: float = Field(default=SETTLE_S, ge=0)
    # The pending sweep (sweep.py), every pending_sweep_interval_s from the worker's beat: an
    # item pending for pending_timeout_s since its upsert (or last re-queue) gets its embed
    # task again, at most pending_max_requeues times, then fails with a reason. The timeout
    # exceeds the broker's visibility timeout (600 s), after which Redis itself redelivers the
    # task of a worker that died holding it.
    pending_timeout_s: float = Field(default=900, gt=0)
    pending_sweep_interval_s: float = Field(default=60, gt=0)
    pending_max_requeues: int = Field(default=3, ge=0)

    @field_validator("database_url")
    @classmethod
    def _driver(cls, value: str) -> str:
        return normalise_database_url(value)
