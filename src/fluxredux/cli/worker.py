"""``fluxredux worker``: one GPU worker of a scale-out deployment, on any machine."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from fluxredux.cli.app import (
    AttentionBackendOption,
    CollapseOption,
    CompileOption,
    ModelOption,
    QuantizeOption,
    VerboseOption,
    app,
    err,
    setup_logging,
)
from fluxredux.cli.serve import DataDirOption, RedisOption, StorageOption, settings_from


@app.command()
def worker(
    redis: RedisOption = None,
    storage: StorageOption = None,
    model: ModelOption = None,
    device: Annotated[
        str | None, typer.Option("--device", help="torch device, e.g. cuda:1 (default: cuda when present).")
    ] = None,
    data_dir: DataDirOption = None,
    collapse_zero_tokens: CollapseOption = None,
    attention_backend: AttentionBackendOption = None,
    compile: CompileOption = None,
    quantize: QuantizeOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run one worker: load the model once, then take jobs from Redis one at a time.

    Start one per GPU, on any machine that reaches Redis and the storage. SIGTERM (or
    Ctrl+C) finishes the running job, then exits; its registry entry goes with it."""
    settings = settings_from(
        redis_url=redis,
        storage=storage,
        model=model,
        device=device,
        data_dir=data_dir,
        collapse_zero_tokens=collapse_zero_tokens,
        attention_backend=attention_backend,
        compile=compile,
        quantize=quantize,
    )
    if settings.redis_url is None:
        err.print(
            "[bold red]error[/]: a worker needs the deployment's Redis: --redis redis://HOST:PORT/DB "
            "(or FLUXREDUX_REDIS_URL). On one machine, `fluxredux serve` runs its own workers.",
            highlight=False,
        )
        raise typer.Exit(2)
    setup_logging(verbose)
    from fluxredux.worker.process import WorkerProcess

    process = WorkerProcess(settings)
    process.drain_on(signal.SIGTERM, signal.SIGINT)
    raise typer.Exit(process.run())
