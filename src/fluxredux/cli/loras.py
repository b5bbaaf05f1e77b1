"""``fluxredux loras list|add``: the style adapters (LoRA) this deployment offers callers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fluxredux.cli.app import app, err, out
from fluxredux.cli.options import DataDirOption, LoraFlags, settings_from, with_bundles

loras_app = typer.Typer(help="The LoRA adapters callers may name in `loras`.", no_args_is_help=True)
app.add_typer(loras_app, name="loras")


@loras_app.command("list")
@with_bundles
def list_loras(data_dir: DataDirOption = None, loras: LoraFlags = LoraFlags()) -> None:
    """Every adapter file in the LoRA folder, with its rank and size, and why one that
    cannot be used cannot; then the Hugging Face repos allowed (--lora-sources)."""
    from fluxredux.loras.catalog import LoraCatalog

    settings = settings_from(loras, data_dir=data_dir)
    catalog = LoraCatalog.from_settings(settings)
    entries = catalog.entries()
    if not entries:
        out.print(
            f"no LoRA adapters: put NAME.safetensors files in {catalog.folder} "
            "(or `fluxredux loras add FILE`)",
            highlight=False,
        )
        return
    if not out.is_terminal:  # a pipe: tab-separated fields, whole
        for entry in entries:
            fields = [
                entry.name,
                entry.source,
                str(entry.rank or ""),
                str(entry.size or ""),
                entry.problem or "",
            ]
            typer.echo("\t".join(fields))
        return
    table = Table("name", "source", "rank", "size", "usable", box=None, header_style="bold")
    for entry in entries:
        size = f"{entry.size / 2**20:.1f} MiB" if entry.size is not None else ""
        table.add_row(entry.name, entry.source, str(entry.rank or ""), size, entry.problem or "yes")
    out.print(table)


@loras_app.command("add")
@with_bundles
def add_lora(
    file: Annotated[Path, typer.Argument(help="A LoRA adapter of the FLUX.1 transformer (.safetensors).")],
    name: Annotated[
        str | None, typer.Option("--name", help="Its name for callers (default: the file's).")
    ] = None,
    data_dir: DataDirOption = None,
    loras: LoraFlags = LoraFlags(),
) -> None:
    """Check FILE as a prediction would (safetensors, FLUX transformer tensors, rank, size)
    and copy it into the LoRA folder, where every worker of this deployment finds it."""
    from fluxredux.loras.catalog import LoraCatalog

    settings = settings_from(loras, data_dir=data_dir)
    catalog = LoraCatalog.from_settings(settings)
    try:
        entry = catalog.add(file, name)
    except (ValueError, OSError) as exc:
        err.print(f"[bold red]error[/]: {file}: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(
        f"added {entry.name} (rank {entry.rank}, {(entry.size or 0) / 2**20:.1f} MiB) to {catalog.folder}; "
        f'use it as "loras": [{{"name": "{entry.name}", "scale": 1}}]',
        highlight=False,
        soft_wrap=True,
    )
