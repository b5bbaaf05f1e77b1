"""``fluxredux worker``: one GPU worker of a scale-out deployment, on any machine."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from fluxredux.cli.app import app, err, setup_logging
from fluxredux.cli.options import (
    LogFormatOption,
    LoraFlags,
    ModelFlags,
    StoreFlags,
    VerboseOption,
    require_model_packages,
    settings_from,
    with_bundles,
)


@app.command()
@with_bundles
def worker(
    store: StoreFlags = StoreFlags(),
    model: ModelFlags = ModelFlags(),
    loras: LoraFlags = LoraFlags(),
    device: Annotated[
        str | None, typer.Option("--device", help="torch device, e.g. cuda:1 (default: cuda when present).")
    ] = None,
    log_format: LogFormatOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run one worker: load the model once, then take jobs from Redis one at a time.

    Start one per GPU, on any machine that reaches Redis and the storage. SIGTERM (or
    Ctrl+C) finishes the running job, then exits; its registry entry goes with it."""
    settings = settings_from(store, model, loras, device=device, log_format=log_format)
    if settings.redis_url is None:
        err.print(
            "[bold red]error[/]: a worker needs the deployment's Redis: --redis redis://HOST:PORT/DB "
            "(or FLUXREDUX_REDIS_URL). On one machine, `fluxredux serve` runs its own workers.",
            highlight=False,
        )
        raise typer.Exit(2)
    require_model_packages(settings)
    setup_logging(verbose, settings.log_format, process="worker")
    from fluxredux.worker.process import WorkerProcess

    process = WorkerProcess(settings, freeze_gc=True)
    process.drain_on(signal.SIGTERM, signal.SIGINT)
    raise typer.Exit(process.run())
