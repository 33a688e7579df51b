"""Entry point of the ``fleet`` command. Subcommands import their component lazily, so ``fleet hub`` never loads
the worker and the reverse."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(help="gpu-fleet: control plane for GPU workers serving real-time AI sessions.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    """gpu-fleet: control plane for GPU workers serving real-time AI sessions."""


@app.command()
def hub(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8080, help="Port to bind."),
    workers: int = typer.Option(1, help="Uvicorn worker processes."),
) -> None:
    """Run a hub (uvicorn). Configuration comes from FLEET_* settings."""
    import uvicorn

    from hub.settings import HubSettings

    settings = HubSettings()  # fail fast on bad or unsafe configuration, before binding
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("hub.main:create_app", factory=True, host=host, port=port, workers=workers,
                log_level=settings.log_level.lower(), access_log=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
