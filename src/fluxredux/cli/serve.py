"""``fluxredux serve`` and ``fluxredux keys``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    out,
    plain_errors,
    setup_logging,
)
from fluxredux.config import Settings

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Jobs, inputs and outputs (default: FLUXREDUX_DATA_DIR or the user data dir)."
    ),
]


RedisOption = Annotated[
    str | None,
    typer.Option(
        "--redis",
        help="Scale-out mode: redis://HOST:PORT/DB shared by every API node and worker "
        "(default: FLUXREDUX_REDIS_URL, else none: SQLite in the data dir).",
    ),
]
StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Inputs and outputs: file:///shared/dir or s3://bucket/prefix (AWS_* variables for S3). "
        "Default: FLUXREDUX_STORAGE, else the data dir.",
    ),
]


def settings_from(**overrides: Any) -> Settings:
    """Settings from the environment, with the flags that were given on top. A bad value
    (a malformed URL, a flag out of range) is a plain error naming it, not a trace."""
    from pydantic import ValidationError
    from rich.markup import escape

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            err.print(f"[bold red]error[/]: {where}: {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one).")] = None,
    data_dir: DataDirOption = None,
    model: ModelOption = None,
    redis: RedisOption = None,
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
    storage: StorageOption = None,
    collapse_zero_tokens: CollapseOption = None,
    attention_backend: AttentionBackendOption = None,
    compile: CompileOption = None,
    quantize: QuantizeOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the prediction server: HTTP API + worker processes with the model.

    One machine by default (SQLite, files in the data dir, one worker). With --redis it is
    one API node of many: state in Redis, files in --storage, workers anywhere."""
    setup_logging(verbose)
    from fluxredux.api.server import serve as run_server

    settings = settings_from(
        host=host,
        port=port,
        data_dir=data_dir,
        model=model,
        redis_url=redis,
        workers=workers,
        storage=storage,
        collapse_zero_tokens=collapse_zero_tokens,
        attention_backend=attention_backend,
        compile=compile,
        quantize=quantize,
    )
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
