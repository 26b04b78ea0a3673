"""`fashionrec-gateway serve`: the public API under uvicorn (factory app, settings from env)."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn
from fashionrec_shared.logging_setup import configure_logging, uvicorn_log_config

from fashionrec_gateway.settings import GatewaySettings

cli = typer.Typer(help="fashionrec gateway (public REST API)", no_args_is_help=True)


@cli.callback()
def _root() -> None:
    """Keeps `serve` a named subcommand."""


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address [FASHIONREC_GATEWAY_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [FASHIONREC_GATEWAY_PORT]")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="processes [FASHIONREC_GATEWAY_WORKERS]")
    ] = None,
) -> None:
    """Serve the API (uvicorn, factory fashionrec_gateway.app:create_app)."""
    settings = GatewaySettings()  # fail fast on bad configuration, before forking workers
    configure_logging("gateway", settings.log_level)
    uvicorn.run(
        "fashionrec_gateway.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.workers,
        log_level=settings.log_level.lower(),
        log_config=uvicorn_log_config("gateway", settings.log_level),
        proxy_headers=True,
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
