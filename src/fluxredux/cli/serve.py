"""``fluxredux serve`` and ``fluxredux keys``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fluxredux.cli.app import app, err, out, plain_errors, setup_logging
from fluxredux.cli.options import (
    DataDirOption,
    LogFormatOption,
    LoraFlags,
    ModelFlags,
    RedisOption,
    StoreFlags,
    VerboseOption,
    require_model_packages,
    settings_from,
    with_bundles,
)


@app.command()
@with_bundles
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one).")] = None,
    store: StoreFlags = StoreFlags(),
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=0,
            max=64,
            help="Worker processes to run here, one per GPU (default 1; with --redis 0: "
            "workers run as `fluxredux worker` on any machine).",
        ),
    ] = None,
    model: ModelFlags = ModelFlags(),
    loras: LoraFlags = LoraFlags(),
    log_format: LogFormatOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the prediction server: HTTP API + worker processes with the model.

    One machine by default (SQLite, files in the data dir, one worker). With --redis it is
    one API node of many: state in Redis, files in --storage, workers anywhere."""
    settings = settings_from(
        store, model, loras, host=host, port=port, workers=workers, log_format=log_format
    )
    if settings.local_workers:
        require_model_packages(settings)
    setup_logging(verbose, settings.log_format, process="server")
    from fluxredux.api.server import serve as run_server

    with plain_errors():  # a port in use, a store that cannot be opened: one line, no trace
        run_server(settings)


keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _key_store(data_dir: Path | None, redis: str | None) -> Any:
    """The keys of the data dir's database, or of the Redis deployment with --redis."""
    from fluxredux.backends import backends_for

    return backends_for(settings_from(data_dir=data_dir, redis_url=redis)).keys


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label, e.g. who uses the key.")],
    data_dir: DataDirOption = None,
    redis: RedisOption = None,
) -> None:
    """Create a key. It is printed once, alone on the last line."""
    with plain_errors():
        key, secret = _key_store(data_dir, redis).create(name)
    err.print(f"created key {key.id} ({key.name}); store it now, it is not shown again:", highlight=False)
    out.print(secret, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(data_dir: DataDirOption = None, redis: RedisOption = None) -> None:
    """List keys (ids and names; the keys themselves are not stored)."""
    from datetime import datetime

    with plain_errors():
        keys = _key_store(data_dir, redis).list()
    for key in keys:
        created = datetime.fromtimestamp(key.created_at).isoformat(timespec="seconds")
        state = "active" if key.active else "revoked"
        out.print(f"{key.id}  {state:8}  {created}  {key.name}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see keys list).")],
    data_dir: DataDirOption = None,
    redis: RedisOption = None,
) -> None:
    """Revoke a key: it stops working at once."""
    with plain_errors():
        revoked = _key_store(data_dir, redis).revoke(key_id)
    if not revoked:
        err.print(f"no active key with id {key_id}")
        raise typer.Exit(1)
    out.print(f"revoked {key_id}")
