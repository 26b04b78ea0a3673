"""The served model: images → L2-normalised float32 embeddings.

Either a backbone's pooled features (backbones.py: EfficientNet-Lite or ResNet50; weights
imagenet/random/file) or a trained multi-task artifact (artifact.py), which fixes its own
backbone, embedding kind, dimension, input size and model version, and also predicts category
and attributes (predictions.py). The network runs on the configured runtime (runtimes.py):
torch, or the ONNX export of the same network on ONNX Runtime / OpenVINO, fp32 or static int8
(quantize.py).

Decoding and preprocessing of the next batch run on a small thread pool while the current batch
is inferred (Pillow and numpy release the GIL); `stage_seconds` accumulates the time spent in
each stage (decode and preprocess summed over threads, inference as wall time).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from fashionrec_shared.tasks import Predicted
from PIL import Image
from torch import nn

from fashionrec_embedder.artifact import ArtifactConfig, load_artifact, load_config
from fashionrec_embedder.network import HeadSpec
from fashionrec_embedder.predictions import decode_predictions
from fashionrec_embedder.preprocess import ImageDecodeError, decode_image, image_to_array
from fashionrec_embedder.runtimes import (
    Runtime,
    TorchRuntime,
    cpu_cores,
    ensure_onnx,
    onnx_path,
    onnx_runtime,
    resolve_runtime,
)
from fashionrec_embedder.settings import EmbedderSettings
from fashionrec_embedder.weights import (
    WeightsError,
    WeightsSource,
    load_body,
    model_version,
    parse_weights,
)

log = logging.getLogger("fashionrec.embedder.model")

STAGES: tuple[str, ...] = ("decode", "preprocess", "inference")
Source = Callable[[], Image.Image]


class ModelNotLoaded(RuntimeError):
    pass


def resolve_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    return torch.device("cuda" if available else "cpu")


class _ArtifactEmbedding(nn.Module):
    """A trained MultiTaskNet as (embeddings of its embedding kind, head probabilities)."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.embed_and_predict(x, self.kind)


class Embedded(NamedTuple):
    """One image's embedding, and what the model's heads predict of it (None without heads)."""

    vector: np.ndarray
    predicted: Predicted | None


class Embedder:
    """Holds one model; `load()` once per process (after fork), then `embed()` many times."""

    def __init__(self, settings: EmbedderSettings) -> None:
        self.settings = settings
        self.source: WeightsSource = parse_weights(settings.weights, settings.backbone)
        self.config: ArtifactConfig | None = None
        self.heads: list[HeadSpec] = []  # a trained model's heads: it predicts as it embeds
        self.attribute_threshold = 0.5
        self.backbone = self.source.arch
        # Pooling applies to plain backbones; an artifact's config fixes its embedding.
        self.pooling: str = (
            "global"
            if self.source.kind == "artifact"
            else self.backbone.pooling_for(settings.pooling)
        )
        self.dim: int = self.backbone.embedding_dim(self.pooling)
        # The input size the model expects: an artifact's config overrides the setting.
        self.image_size: int = settings.image_size or self.backbone.default_image_size(self.pooling)
        if self.source.kind == "artifact":
            assert self.source.path is not None
            config = load_config(self.source.path)
            self.config = config
            self.backbone = config.arch
            self.heads = config.head_specs
            self.attribute_threshold = config.attribute_threshold
            self.dim = config.embedding.dim
            self.image_size = config.preprocessing.image_size
            version = config.model_version
            if settings.image_size not in (None, self.image_size):
                log.info(
                    "model %s fixes image_size=%d (setting image_size=%d is ignored)",
                    version,
                    self.image_size,
                    settings.image_size,
                )
        else:
            version = model_version(self.source, self.image_size, self.pooling)
        self.norm = self.backbone.norm
        # fp32 runtimes give the same vectors (cosine ≥ 0.999), so they share the version; int8
        # vectors differ slightly and get their own, so one index never mixes the two.
        self.fp32_version: str = version
        self.precision: str = settings.precision
        if self.precision == "int8":
            from fashionrec_embedder.quantize import calibration_tag

            version += calibration_tag(settings.calibration_dir, settings.calibration_images)
        self.model_version: str = version
        self.device: torch.device | None = None
        self.runtime: str | None = None  # the resolved runtime name, after load()
        self.load_seconds: float | None = None
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.images_embedded = 0
        self._model: Runtime | None = None
        self._lock = threading.Lock()
        self._infer_lock = threading.Lock()  # runtimes hold one inference request each
        self._stats_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    # ---- model building -----------------------------------------------------------------

    def build_module(self) -> nn.Module:
        """The torch network on CPU in eval mode (outputs L2-normalised or raw pooled rows)."""
        if self.source.kind == "artifact":
            assert self.source.path is not None and self.config is not None
            net, config = load_artifact(self.source.path)  # checks the content hash
            if config.model_version != self.fp32_version:
                raise WeightsError(
                    f"model artifact {self.source.path} changed while loading "
                    f"({self.fp32_version} → {config.model_version}); restart"
                )
            return _ArtifactEmbedding(net, config.embedding.kind).eval()
        return load_body(self.source, self.settings.cache_dir, self.image_size, self.pooling).eval()

    def onnx_file(self, precision: str | None = None) -> Path:
        """The cache path of this model's ONNX file (fp32, or the int8 one)."""
        precision = precision or self.precision
        variant = self.model_version.removeprefix(self.fp32_version) if precision == "int8" else ""
        return onnx_path(self.settings.cache_dir, self.fp32_version, self.image_size, variant)

    def prepare(self) -> Path | None:
        """Export (and quantise) the ONNX files this model's runtime needs; cached per version.

        Cheap when the files exist. Run it once before starting worker processes (see
        `prepare_in_subprocess`), else the first process to load does it.
        """
        device = resolve_device(self.settings.device)
        name = resolve_runtime(self.settings.runtime, device, self.precision)
        if name == "torch":
            return None
        fp32, _ = ensure_onnx(self.onnx_file("fp32"), self.build_module, self.image_size)
        if self.precision != "int8":
            return fp32
        int8 = self.onnx_file("int8")
        if not int8.is_file():
            from fashionrec_embedder.quantize import calibration_batch, quantize_onnx

            log.info("quantising %s to int8 (static QDQ): %s", self.fp32_version, int8)
            calibration = calibration_batch(
                self.image_size,
                self.norm,
                self.settings.calibration_images,
                self.settings.calibration_dir,
                self.settings.max_image_pixels,
            )
            quantize_onnx(fp32, int8, calibration)
        return int8

    def load(self) -> None:
        """Build the model on its runtime and run one warm-up pass. Idempotent."""
        with self._lock:
            if self._model is not None:
                return
            started = time.perf_counter()
            if self.settings.threads:
                torch.set_num_threads(self.settings.threads)
            threads = self.settings.threads or cpu_cores()
            device = resolve_device(self.settings.device)
            name = resolve_runtime(self.settings.runtime, device, self.precision)
            model: Runtime
            if name == "torch":
                model = TorchRuntime(self.build_module(), device)
            else:
                path = self.prepare()
                assert path is not None
                model = onnx_runtime(name, path, threads=threads, device=device)
            self._model, self.device, self.runtime = model, device, name
            # The first pass allocates buffers and picks kernels; do it now, not on a request.
            self._infer(np.zeros((1, 3, self.image_size, self.image_size), dtype=np.float32))
            self.reset_stages()
            self.load_seconds = time.perf_counter() - started
            log.info(
                "model %s (backbone %s, weights %s, %s pooling, %d-d) loaded on %s/%s %s in "
                "%.2fs (threads=%d, batch_size=%d, image_size=%d, decode_threads=%d)",
                self.model_version,
                self.backbone.name,
                self.source.label,
                self.pooling,
                self.dim,
                device,
                name,
                self.precision,
                self.load_seconds,
                threads,
                self.settings.batch_size,
                self.image_size,
                self.settings.decode_threads,
            )

    # ---- inference ------------------------------------------------------------------------

    def _run(self, batch: np.ndarray) -> list[Embedded]:
        if self._model is None:
            raise ModelNotLoaded("call load() before embed()")
        started = time.perf_counter()
        with self._infer_lock:
            vectors, probs = self._model.run(batch)
        with self._stats_lock:
            self.stage_seconds["inference"] += time.perf_counter() - started
            self.images_embedded += len(batch)
        if probs is None or not self.heads:
            return [Embedded(v, None) for v in vectors]
        predicted = decode_predictions(self.heads, probs, self.attribute_threshold)
        return [Embedded(v, p) for v, p in zip(vectors, predicted, strict=True)]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([e.vector for e in self._run(batch)])

    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        return self._infer(batch.numpy())

    def embed_tensors(self, tensors: list[torch.Tensor]) -> np.ndarray:
        """Preprocessed (3, S, S) tensors → (N, dim) float32 unit vectors, in batches."""
        if not tensors:
            return np.empty((0, self.dim), dtype=np.float32)
        size = self.settings.batch_size
        parts = [
            self._forward(torch.stack(tensors[i : i + size])) for i in range(0, len(tensors), size)
        ]
        return np.concatenate(parts, axis=0)

    # ---- the decode → preprocess → inference pipeline --------------------------------------

    def reset_stages(self) -> None:
        with self._stats_lock:
            self.stage_seconds = dict.fromkeys(STAGES, 0.0)
            self.images_embedded = 0

    def stage_shares(self) -> dict[str, float]:
        """Each stage's fraction of the time spent so far (decode + preprocess + inference)."""
        total = sum(self.stage_seconds.values())
        return {k: (v / total if total else 0.0) for k, v in self.stage_seconds.items()}

    def _decode_pool(self) -> ThreadPoolExecutor | None:
        if self.settings.decode_threads == 0:
            return None
        # Threads do not survive fork: a process that inherited an Embedder makes its own pool.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(
                self.settings.decode_threads, thread_name_prefix="embedder-decode"
            )
            self._pool_pid = os.getpid()
        return self._pool

    def _prepare_one(
        self, source: Source, catch: tuple[type[BaseException], ...]
    ) -> np.ndarray | BaseException:
        t0 = time.perf_counter()
        try:
            img = source()
        except catch as exc:
            return exc
        finally:
            t1 = time.perf_counter()
            with self._stats_lock:
                self.stage_seconds["decode"] += t1 - t0
        array = image_to_array(img, self.image_size, norm=self.norm)
        with self._stats_lock:
            self.stage_seconds["preprocess"] += time.perf_counter() - t1
        return array

    def embed_sources(
        self,
        sources: Sequence[Source],
        *,
        catch: tuple[type[BaseException], ...] = (ValueError,),
    ) -> list[np.ndarray | BaseException]:
        """Embed images produced by `sources` (callables that fetch/decode one image each).

        Returns one entry per source, in order: its (dim,) unit vector, or the exception of a
        type in `catch` it raised (e.g. ImageDecodeError); other exceptions propagate. While a
        batch is inferred, the next one is decoded and preprocessed on the decode threads.
        """
        return [
            e.vector if isinstance(e, Embedded) else e
            for e in self.embed_and_predict(sources, catch=catch)
        ]

    def embed_and_predict(
        self,
        sources: Sequence[Source],
        *,
        catch: tuple[type[BaseException], ...] = (ValueError,),
        run: Callable[[np.ndarray], list[Embedded]] | None = None,
    ) -> list[Embedded | BaseException]:
        """`embed_sources`, with each image's predictions (a trained model's heads) too.

        `run` infers one stacked batch (default: this model, now); the worker's dynamic
        batching passes one that shares the model call with other tasks' images
        (batching.py)."""
        if self._model is None:
            raise ModelNotLoaded("call load() before embed()")
        run = run or self._run
        results: list[Embedded | BaseException] = [None] * len(sources)  # type: ignore[list-item]
        size = self.settings.batch_size
        chunks = [range(i, min(i + size, len(sources))) for i in range(0, len(sources), size)]
        # One image has nothing to overlap with: prepare it on the calling thread.
        pool = self._decode_pool() if len(sources) > 1 else None
        prepare = functools.partial(self._prepare_one, catch=catch)

        def start(chunk: range) -> list[Future[np.ndarray | BaseException]]:
            assert pool is not None
            return [pool.submit(prepare, sources[i]) for i in chunk]

        pending = start(chunks[0]) if pool is not None and chunks else None
        for k, chunk in enumerate(chunks):
            if pool is None:
                prepared = [prepare(sources[i]) for i in chunk]
            else:
                assert pending is not None
                current = pending
                # Queue the next batch before waiting: it decodes while this one is inferred.
                pending = start(chunks[k + 1]) if k + 1 < len(chunks) else None
                prepared = [future.result() for future in current]
            good = [
                (i, a) for i, a in zip(chunk, prepared, strict=True) if isinstance(a, np.ndarray)
            ]
            for i, a in zip(chunk, prepared, strict=True):
                if not isinstance(a, np.ndarray):
                    results[i] = a
            if good:
                embedded = run(np.stack([a for _, a in good]))
                for (i, _), one in zip(good, embedded, strict=True):
                    results[i] = one
        return results

    def embed_bytes(
        self, blobs: Sequence[bytes], *, max_pixels: int | None = None
    ) -> list[np.ndarray | ImageDecodeError]:
        """Encoded images → one unit vector or ImageDecodeError each (JPEG draft decoding)."""
        limit = max_pixels or self.settings.max_image_pixels
        sources = [
            functools.partial(decode_image, b, max_pixels=limit, draft_size=self.image_size)
            for b in blobs
        ]
        return self.embed_sources(sources, catch=(ImageDecodeError,))  # type: ignore[return-value]

    def embed(self, batch: list[Image.Image]) -> np.ndarray:
        """RGB PIL images → (N, dim) float32 L2-normalised embeddings."""
        if not batch:
            return np.empty((0, self.dim), dtype=np.float32)
        if self._model is None:
            raise ModelNotLoaded("call load() before embed()")
        rows = self.embed_sources([functools.partial(_same, img) for img in batch], catch=())
        return np.stack(rows).astype(np.float32, copy=False)  # type: ignore[arg-type]

    def embed_image(self, img: Image.Image) -> Embedded:
        """One decoded image → its embedding and predictions."""
        (embedded,) = self.embed_and_predict([functools.partial(_same, img)], catch=())
        assert isinstance(embedded, Embedded)
        return embedded

    def describe(self) -> dict[str, object]:
        return {
            "model_version": self.model_version,
            "dim": self.dim,
            "device": str(self.device) if self.device else None,
            "backbone": self.backbone.name,
            "weights": self.source.public_label,
            "pooling": self.pooling,
            "runtime": self.runtime,
            "precision": self.precision,
        }


def _same(img: Image.Image) -> Image.Image:
    return img


def _prepare_settings(settings: EmbedderSettings) -> str | None:
    path = Embedder(settings).prepare()
    return str(path) if path else None


def prepare_in_subprocess(settings: EmbedderSettings) -> Path | None:
    """`Embedder(settings).prepare()` in a fresh (spawned) process, for a forking parent.

    Exporting runs torch in the caller; doing it in a child keeps the parent's torch/OpenMP
    thread pools unstarted, so the worker processes it forks later start clean.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        path = pool.apply(_prepare_settings, (settings,))
    return Path(path) if path else None
