"""`fashionrec-embedder train`: read data, fine-tune the multi-task network, export the artifact."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fashionrec_embedder.artifact import export_artifact
from fashionrec_embedder.backbones import DEFAULT_BACKBONE
from fashionrec_embedder.model import resolve_device
from fashionrec_embedder.network import MultiTaskNet, resolve_head_weights
from fashionrec_embedder.training.data import DataError, TrainingData, read_training_data
from fashionrec_embedder.training.learner import (
    EpochTable,
    build_dataloaders,
    build_learner,
    fine_tune,
)
from fashionrec_embedder.weights import load_body, parse_weights

HISTORY_NAME = "history.csv"


@dataclass
class TrainOptions:
    epochs: int = 1  # unfrozen epochs (after the frozen ones)
    freeze_epochs: int = 1
    image_size: int | None = None  # None: the backbone's
    batch_size: int = 32
    backbone: str = DEFAULT_BACKBONE  # a model directory as `weights` names its own
    weights: str = "imagenet"  # initialises the body: imagenet | random:SEED | file | artifact
    embedding: str = "heads"
    # {head name: weight} in the served `heads` embedding; heads not named weigh 1.
    head_weights: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.5
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"
    num_workers: int | None = None  # None: 0 on CPU, up to 8 on CUDA
    augment: bool = True
    keep: str = "best"  # export the epoch with the lowest valid_loss ("best") or the "last"
    cache_dir: Path = Path("~/.cache/fashionrec")


@dataclass
class TrainResult:
    out: Path
    config: dict[str, Any]
    history: list[dict[str, object]]
    initial: dict[str, float]  # validation metrics before training
    model: MultiTaskNet
    data: TrainingData
    seconds_per_epoch: list[float] = field(default_factory=list)
    learn: Any = None  # the fastai Learner (optimizer state, recorder)


def _metrics(learn, values: list) -> dict[str, float]:  # type: ignore[no-untyped-def]
    names = ["valid_loss", *(m.name for m in learn.metrics)]
    return {n: float(v) for n, v in zip(names, values, strict=False) if v is not None}


def train(
    data_path: Path | str,
    out: Path | str,
    options: TrainOptions | None = None,
    echo: Callable[[str], object] = print,
) -> TrainResult:
    """Train on `data_path` and write history.csv and the artifact (config.json,
    model.safetensors) into `out`."""
    from fastai.torch_core import set_seed

    opts = options or TrainOptions()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    set_seed(opts.seed, reproducible=True)
    device = resolve_device(opts.device)
    data = read_training_data(data_path, seed=opts.seed)
    heads = data.heads()
    echo(
        f"data: {data.layout} {data.root}: {len(data.split('train'))} train / "
        f"{len(data.split('val'))} val images; heads: "
        + ", ".join(f"{h.name}({len(h.classes)})" for h in heads)
    )
    source = parse_weights(opts.weights, opts.backbone)
    arch = source.arch
    image_size = opts.image_size or arch.image_size
    echo(f"body: {arch.name} with weights {source.label} at {image_size} px")
    body = load_body(source, Path(opts.cache_dir).expanduser(), image_size)
    # Checked before training: a misspelt head name must not cost the training run.
    try:
        head_weights = resolve_head_weights(heads, opts.head_weights)
    except ValueError as exc:
        raise DataError(f"--head-weight: {exc}") from exc
    model = MultiTaskNet(body, heads, arch.name, head_weights=head_weights)
    workers = opts.num_workers
    if workers is None:
        workers = 0 if device.type == "cpu" else min(8, torch.get_num_threads())
    dls = build_dataloaders(
        data,
        norm=arch.norm,
        image_size=image_size,
        batch_size=opts.batch_size,
        device=device,
        num_workers=workers,
        augment=opts.augment,
    )
    table = EpochTable(out / HISTORY_NAME, echo=echo)
    learn = build_learner(dls, model, out=out, threshold=opts.threshold, table=table)
    if device.type == "cuda":
        learn.to_fp16()
    initial = _metrics(learn, list(learn.validate()))
    echo("before training: " + "  ".join(f"{k}={v:.4f}" for k, v in initial.items()))
    started = time.perf_counter()
    fine_tune(learn, opts.epochs, opts.freeze_epochs, opts.lr)
    seconds = time.perf_counter() - started
    best = learn.keep_best
    exported_epoch = len(table.rows) - 1 if table.rows else None
    if opts.keep == "best" and best.best_epoch is not None:
        best.restore()
        exported_epoch = best.best_epoch
        echo(f"exporting epoch {exported_epoch} (lowest valid_loss {best.best_loss:.4f})")
    n_epochs = opts.epochs + opts.freeze_epochs
    if device.type == "cuda":
        learn.to_fp32()
    model = learn.model.to("cpu").eval()
    chosen = table.rows[exported_epoch] if exported_epoch is not None else {}
    final = {k: v for k, v in chosen.items() if k != "epoch"}
    config = export_artifact(
        model,
        out,
        embedding=opts.embedding,
        image_size=image_size,
        attribute_threshold=opts.threshold,
        training={
            "epochs": n_epochs,
            "freeze_epochs": opts.freeze_epochs,
            "lr": opts.lr,
            "batch_size": opts.batch_size,
            "weights": opts.weights,
            "backbone": arch.name,
            "seed": opts.seed,
            "device": device.type,
            "data": {
                "layout": data.layout,
                "train_images": len(data.split("train")),
                "valid_images": len(data.split("val")),
            },
            "seconds": round(seconds, 1),
            "exported_epoch": exported_epoch,
            "metrics": final,
            "history": table.rows,
        },
    )
    echo(f"exported {config['model_version']} (dim {config['embedding']['dim']}) to {out}")
    return TrainResult(out, config, table.rows, initial, model, data, table.seconds, learn)
