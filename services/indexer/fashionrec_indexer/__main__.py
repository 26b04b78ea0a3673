"""`fashionrec-indexer`: migrate, serve, worker, rebuild, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from fashionrec_shared.logging_setup import configure_logging, uvicorn_log_config
from fashionrec_shared.tasks import Queue

from fashionrec_indexer.settings import IndexerSettings

cli = typer.Typer(help="fashionrec indexer: inventory database, index builds and search API.")


def _settings() -> IndexerSettings:
    settings = IndexerSettings()  # type: ignore[call-arg]
    configure_logging("indexer", settings.log_level)
    return settings


@cli.command()
def migrate(
    timeout: Annotated[float, typer.Option(help="seconds to wait for the database")] = 60.0,
) -> None:
    """Wait for the database, then apply the schema migrations (alembic upgrade head)."""
    from fashionrec_indexer.db import migrate as run_migrations

    run_migrations(_settings().database_url, timeout)
    typer.echo("database schema is up to date")


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="port")] = None,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    from fashionrec_indexer.api import create_app

    settings = _settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level.lower(),
        log_config=uvicorn_log_config("indexer", settings.log_level),
    )


@cli.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 1,
    beat: Annotated[bool, typer.Option("--beat/--no-beat", help="embed the beat scheduler")] = True,
) -> None:
    """Run the Celery worker of queue `index` (STORE_EMBEDDINGS, BUILD_INDEX, MODEL_ONLINE); its
    beat sends the timed rebuilds and the pending sweep (run one worker with --beat)."""
    from fashionrec_indexer.worker import create_worker_app

    settings = _settings()
    settings.index_dir.mkdir(parents=True, exist_ok=True)
    app = create_worker_app(settings)
    argv = [
        "worker",
        "--queues",
        str(Queue.INDEX),
        "--concurrency",
        str(concurrency),
        "--loglevel",
        settings.log_level.upper(),
        "--hostname",
        "indexer@%h",
    ]
    if beat:
        argv.append("--beat")
    app.worker_main(argv)


@cli.command()
def rebuild(
    force: Annotated[
        bool, typer.Option("--force/--if-changed", help="build even when nothing changed")
    ] = True,
) -> None:
    """Build an index now, in this process, and print its manifest."""
    from fashionrec_shared.storage import make_blob_store
    from rich.console import Console

    from fashionrec_indexer.builder import build_index
    from fashionrec_indexer.db import make_engine

    settings = _settings()
    engine = make_engine(settings.database_url, pool_size=2)
    try:
        result = build_index(
            engine,
            make_blob_store(settings.storage),
            n_trees=settings.n_trees,
            ann_dim=settings.ann_dim,
            ann_projection=settings.ann_projection,
            vector_dtype=settings.vector_dtype,
            target_recall=settings.target_recall,
            calibration_queries=settings.calibration_queries,
            ann_candidates=settings.ann_candidates,
            force=force,
            reason="cli",
            progress=True,
            settle_s=settings.settle_s,
        )
    finally:
        engine.dispose()
    console = Console()
    if result.manifest is None:
        console.print(f"[yellow]skipped:[/] {result.detail}")
        return
    console.print_json(json.dumps(result.manifest))


@cli.command()
def evaluate(
    samples: Annotated[int, typer.Option(min=1, help="stored vectors used as queries")] = 200,
    k: Annotated[int, typer.Option(min=1, help="neighbours per query")] = 5,
    search_k: Annotated[
        int | None, typer.Option(help="Annoy search_k (default: the configured one)")
    ] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="also write the result here")
    ] = None,
) -> None:
    """Measure the live index: Annoy recall@k against exact search, and query latency."""
    from fashionrec_shared.files import write_json
    from fashionrec_shared.storage import make_blob_store
    from rich.console import Console

    from fashionrec_indexer.db import make_engine
    from fashionrec_indexer.index_eval import NoIndexBuild, evaluate_index, render_table

    settings = _settings()
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        result = evaluate_index(
            engine,
            make_blob_store(settings.storage),
            settings.index_dir,
            samples=samples,
            k=k,
            search_k=settings.search_k if search_k is None else search_k,
            candidates=settings.ann_candidates,
            seed=seed,
        )
    except NoIndexBuild as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    render_table(result, Console())
    if json_out is not None:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
