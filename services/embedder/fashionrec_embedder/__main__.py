"""`fashionrec-embedder` command: run the Celery worker, or embed local files (operator check)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import ValidationError

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="fashionrec embedder")

WeightsOpt = Annotated[
    str | None,
    typer.Option(help="imagenet | random:SEED (tests only) | PATH to a .pt/.pth/.safetensors file"),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto | cpu | cuda")]


def _apply_options(**options: object) -> None:
    # Options override the environment; worker processes read their settings from it after fork.
    for name, value in options.items():
        if value is not None:
            os.environ[f"FASHIONREC_EMBEDDER_{name.upper()}"] = str(value)


def _settings():  # type: ignore[no-untyped-def]
    from fashionrec_embedder.settings import EmbedderSettings

    try:
        return EmbedderSettings()
    except ValidationError as exc:
        typer.echo(f"invalid embedder settings: {exc}", err=True)
        raise typer.Exit(2) from exc


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


@cli.command()
def worker(
    weights: WeightsOpt = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="worker processes")] = None,
    device: DeviceOpt = None,
    loglevel: Annotated[str | None, typer.Option(help="log level (default: settings)")] = None,
) -> None:
    """Run the Celery worker on queue `embed` (prefork; each process loads the model once)."""
    from fashionrec_embedder.weights import WeightsError, ensure_available, parse_weights
    from fashionrec_embedder.worker import create_celery

    _apply_options(weights=weights, concurrency=concurrency, device=device)
    settings = _settings()
    _setup_logging(loglevel or settings.log_level)
    try:
        # Fail fast in the parent: a bad weights setting would crash-loop every child, and
        # children downloading the ImageNet file at once would race.
        ensure_available(parse_weights(settings.weights), settings.cache_dir)
    except WeightsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    app = create_celery(settings)
    app.worker_main(
        [
            "worker",
            "-Q",
            "embed",
            "--pool",
            "prefork",
            "--concurrency",
            str(settings.concurrency),
            "-n",
            "embedder@%h",
            "--loglevel",
            (loglevel or settings.log_level).upper(),
        ]
    )


@cli.command()
def embed(
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True)],
    weights: WeightsOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Embed local image files and print the model version and each vector's norm."""
    from fashionrec_embedder.model import Embedder
    from fashionrec_embedder.preprocess import ImageDecodeError, decode_image
    from fashionrec_embedder.weights import WeightsError

    _apply_options(weights=weights, device=device)
    settings = _settings()
    _setup_logging(settings.log_level)
    try:
        model = Embedder(settings)
        model.load()
    except WeightsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"model_version: {model.model_version}  dim: {model.dim}  device: {model.device}")
    decoded, failed = [], 0
    for path in images:
        try:
            decoded.append(
                (
                    path,
                    decode_image(
                        path.read_bytes(),
                        max_pixels=settings.max_image_pixels,
                        draft_size=settings.image_size,
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
