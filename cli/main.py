"""Entry point of the ``fleet`` command. Subcommands import their component lazily, so ``fleet hub`` never loads
the worker and the reverse."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from cli import admin
from shared.settings import describe_invalid

if TYPE_CHECKING:
    from hub.settings import HubSettings

app = typer.Typer(help="gpu-fleet: control plane for GPU workers serving real-time AI sessions.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    """gpu-fleet: control plane for GPU workers serving real-time AI sessions."""


def _name_unread_variables(command: str) -> None:
    """One line on stderr for each ``FLEET_`` variable no part of gpu-fleet reads: a misspelt one leaves its setting
    at the default, without a word until now."""
    from shared.settings import unknown_variables
    from shared.variables import READ_BY_SOME_PART

    for name, close in unknown_variables(os.environ, READ_BY_SOME_PART):
        hint = f"; did you mean {close}?" if close else ""
        typer.echo(f"fleet {command}: warning: {name} is set, but no part of gpu-fleet reads it{hint}", err=True)


@app.command()
def hub(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8080, min=0, max=65535, help="Port to bind."),
    workers: int = typer.Option(1, min=1, help="Uvicorn worker processes (their metrics are summed at /metrics)."),
) -> None:
    """Run a hub (uvicorn). Configuration comes from FLEET_* settings."""
    import uvicorn

    from hub.main import websocket_max_bytes
    from hub.settings import HubSettings

    _name_unread_variables("hub")
    try:
        settings = HubSettings()  # fail fast on bad or unsafe configuration, before binding
    except (ValidationError, SettingsError) as exc:
        typer.echo(f"fleet hub: {describe_invalid(exc)}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Never below INFO for uvicorn: at DEBUG it logs every WebSocket handshake's headers, tokens and secrets.
    server_level = max(logging.INFO, logging.getLevelNamesMapping()[settings.log_level])
    with _store_shared_by(workers, settings), _metrics_shared_by(workers):
        uvicorn.run("hub.main:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=logging.getLevelName(server_level).lower(), access_log=False,
                    ws_max_size=websocket_max_bytes(settings),
                    # The peer stays the peer: hub.api.deps.client_address believes X-Forwarded-For only from
                    # FLEET_TRUSTED_PROXIES (uvicorn's default believes it from any loopback caller).
                    proxy_headers=False)


@contextlib.contextmanager
def _store_shared_by(processes: int, settings: HubSettings) -> Iterator[None]:
    """Several hub processes without ``FLEET_REDIS_URL`` (dev) share one embedded redis-server, started here. Each
    process would otherwise start its own, and a listing, a heartbeat or a placement would depend on which process
    the kernel handed the connection to."""
    if processes <= 1 or settings.redis_url:
        yield
        return
    from shared.redis_server import EmbeddedRedis

    with EmbeddedRedis() as store:
        logging.getLogger(__name__).warning(
            "FLEET_REDIS_URL is unset: started an embedded redis-server on %s for these %d hub processes, for a "
            "local hub only", store.url, processes)
        os.environ["FLEET_REDIS_URL"] = store.url  # inherited by uvicorn's worker processes, which import anew
        try:
            yield
        finally:
            del os.environ["FLEET_REDIS_URL"]


@contextlib.contextmanager
def _metrics_shared_by(processes: int) -> Iterator[None]:
    """Several hub processes count into files one scrape sums (``hub.metrics``); the files go when the hub stops.
    A ``PROMETHEUS_MULTIPROC_DIR`` set from outside is used as it is, and left alone."""
    from hub.metrics import MULTIPROCESS_DIR_ENV

    if processes <= 1 or os.environ.get(MULTIPROCESS_DIR_ENV):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="fleet-hub-metrics-") as shared:
        os.environ[MULTIPROCESS_DIR_ENV] = shared  # inherited by uvicorn's worker processes, which import anew
        try:
            yield
        finally:
            del os.environ[MULTIPROCESS_DIR_ENV]


#: Which of ``fleet worker``'s options each of its modes takes: an option given to another is refused, not ignored.
_WORKER_OPTIONS = {
    "host": ("run",), "port": ("run",), "advertise_url": ("run",), "region": ("run",),
    "simulate_gpu": ("run", "calibrate"), "max_streams": ("run", "calibrate"), "engine": ("run", "calibrate"),
    "seconds": ("calibrate",), "hub_url": ("show",), "token": ("show",), "as_json": ("show",),
}
_MODE_NAMES = {"run": "`fleet worker`", "calibrate": "`fleet worker calibrate`", "show": "`fleet worker ID`"}


def _refuse_options_not_for(context: typer.Context, mode: str, takes: dict[str, tuple[str, ...]]) -> None:
    """Exit 2 naming the first option given on the command line that ``mode`` does not take."""
    for param in context.command.params:
        name = param.name or ""
        modes = takes.get(name)
        source = context.get_parameter_source(name)
        if modes is None or mode in modes or source is None or source.name != "COMMANDLINE":
            continue
        applies = " and ".join(_MODE_NAMES[m] for m in modes)
        typer.echo(f"fleet worker: {param.opts[0]} applies to {applies} only", err=True)
        raise typer.Exit(2)


@app.command()
def worker(
    context: typer.Context,
    target: str | None = typer.Argument(
        None, help="Nothing: run the worker agent. `calibrate`: measure capacity. A worker id: show that worker."),
    host: str | None = typer.Option(None, help="Interface to bind (FLEET_HOST)."),
    port: int | None = typer.Option(None, help="Port to bind (FLEET_PORT)."),
    advertise_url: str | None = typer.Option(
        None, help="URL the hub dispatches to (default: the EC2 private IP, else the bound host, or the hostname "
                   "when binding every interface)."),
    region: str | None = typer.Option(None, help="AWS region (default: FLEET_REGION, else IMDS, else us-east-1)."),
    simulate_gpu: str | None = typer.Option(None, help="Present a named GPU, e.g. t4, a10g, l4, h100, a10gx4."),
    max_streams: int | None = typer.Option(
        None, help="Override the VRAM-derived capacity (calibrate: the most streams tried)."),
    engine: str | None = typer.Option(None, help="Inference engine: synthetic (simulator) or voice."),
    seconds: float | None = typer.Option(
        None, help="calibrate: seconds measured per concurrency step (default: the engine's, 2 s synthetic, 6 s voice)."
    ),
    hub_url: str | None = typer.Option(None, "--hub", envvar="FLEET_HUB_URL",
                                       help=f"Hub, for `fleet worker ID` (default: {admin.DEFAULT_HUB})."),
    token: str | None = typer.Option(None, envvar="FLEET_ADMIN_TOKEN", help="Admin token, for `fleet worker ID`."),
    as_json: bool = typer.Option(False, "--json", help="`fleet worker ID`: print JSON."),
) -> None:
    """Run the GPU worker agent, calibrate its capacity, or (with an id) show one worker to an SRE."""
    mode = "run" if target is None else "calibrate" if target == "calibrate" else "show"
    _refuse_options_not_for(context, mode, _WORKER_OPTIONS)
    if target is None:
        from worker.cli import run_worker

        _name_unread_variables("worker")
        if os.environ.get("FLEET_HUB_URL") and not os.environ.get("FLEET_HUB_URLS"):
            typer.echo("fleet worker: warning: FLEET_HUB_URL names the hub of the SRE commands; the worker agent "
                       "registers with the hubs of FLEET_HUB_URLS (default http://127.0.0.1:8080)", err=True)

        raise typer.Exit(run_worker(host=host, port=port, advertise_url=advertise_url, region=region,
                                    simulate_gpu=simulate_gpu, max_streams=max_streams, engine=engine) or 0)
    elif target == "calibrate":
        from worker.cli import calibrate

        raise typer.Exit(calibrate(engine=engine, simulate_gpu=simulate_gpu, seconds=seconds,
                                   max_concurrency=max_streams) or 0)
    else:
        admin.show_worker(target, hub=hub_url or admin.DEFAULT_HUB, json=as_json, token=token)


@app.command()
def demo(
    workers: int = typer.Option(9, min=1, help="Simulated GPU workers."),
    regions: str = typer.Option(",".join(("us-east-1", "us-west-2", "eu-central-1")), help="Comma-separated."),
    hub_port: int = typer.Option(8080, help="First hub's port; the second hub uses the next one."),
    worker_port: int = typer.Option(9100, help="First worker's port; the others follow."),
    users_per_min: float | None = typer.Option(
        None, min=0.1, help="Synthetic users arriving per minute (default: as many as keep ~70% of the fleet's "
                            "streams busy)."),
    mean_session_s: float = typer.Option(40.0, min=1, help="Typical session length."),
    duration: float | None = typer.Option(None, min=1, help="Stop by itself after this many seconds."),
    log_dir: str = typer.Option(".fleet/demo-logs", help="Where hub and worker logs go."),
) -> None:
    """A whole local fleet in one command: embedded Redis, two hubs, workers in three regions, synthetic users."""
    from cli.demo import DemoFailed, DemoMisused, run_demo

    try:
        code = run_demo(workers, [r.strip() for r in regions.split(",") if r.strip()], hub_port, worker_port,
                        users_per_min, mean_session_s, duration, log_dir)
    except DemoFailed as exc:
        typer.echo(f"fleet demo: {exc}", err=True)
        raise typer.Exit(2 if isinstance(exc, DemoMisused) else 1) from None
    raise typer.Exit(code)


admin.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
