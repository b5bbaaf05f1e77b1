"""``fluxredux serve`` and ``fluxredux keys``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fluxredux.cli.app import ModelOption, VerboseOption, app, err, out, setup_logging
from fluxredux.config import Settings

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Jobs, inputs and outputs (default: FLUXREDUX_DATA_DIR or the user data dir)."
    ),
]


def settings_from(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one).")] = None,
    data_dir: DataDirOption = None,
    model: ModelOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the prediction server: HTTP API + a worker process with the model."""
    setup_logging(verbose)
    from fluxredux.api.server import serve as run_server

    run_server(settings_from(host=host, port=port, data_dir=data_dir, model=model))


keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _key_store(data_dir: Path | None) -> Any:
    from fluxredux.keys import KeyStore

    settings = settings_from(data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return KeyStore(settings.database_path)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label, e.g. who uses the key.")],
    data_dir: DataDirOption = None,
) -> None:
    """Create a key. It is printed once, alone on the last line."""
    key, secret = _key_store(data_dir).create(name)
    err.print(f"created key {key.id} ({key.name}); store it now, it is not shown again:", highlight=False)
    out.print(secret, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(data_dir: DataDirOption = None) -> None:
    """List keys (ids and names; the keys themselves are not stored)."""
    from datetime import datetime

    for key in _key_store(data_dir).list():
        created = datetime.fromtimestamp(key.created_at).isoformat(timespec="seconds")
        state = "active" if key.active else "revoked"
        out.print(f"{key.id}  {state:8}  {created}  {key.name}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see keys list).")],
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a key: it stops working at once."""
    if not _key_store(data_dir).revoke(key_id):
        err.print(f"no active key with id {key_id}")
        raise typer.Exit(1)
    out.print(f"revoked {key_id}")
