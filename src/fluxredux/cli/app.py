"""The typer app, the consoles and what every command shares (its options: options.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fluxredux import __version__
from fluxredux.config import LogFormat
from fluxredux.errors import ClientError, FluxReduxError
from fluxredux.worker.logs import ProcessName, configure_logging

app = typer.Typer(
    help="fluxredux: self-hosted FLUX.1 Redux [schnell] image variations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[schnell]" is a name, not markup
)
out = Console()
err = Console(stderr=True)


def _print_version(asked: bool) -> None:
    if asked:
        out.print(f"fluxredux {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _common(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


def setup_logging(verbose: bool, log_format: LogFormat = "text", process: ProcessName = "cli") -> None:
    """This command's log (worker/logs.py): rich's on a terminal, on the console its
    progress bars use; one line (or JSON object) per record anywhere else."""
    configure_logging(process, log_format, verbose=verbose, console=err)


def fail(exc: FluxReduxError) -> typer.Exit:
    """Print a domain error plainly (no stack trace); exit 2 for a caller mistake."""
    # soft_wrap: one line per error, never broken mid-word by the console (people grep
    # and copy these).
    err.print(
        f"[bold red]error[/] [dim]({exc.code})[/]: {escape(exc.message)}", highlight=False, soft_wrap=True
    )
    return typer.Exit(code=2 if isinstance(exc, ClientError) else 1)


@contextmanager
def plain_errors() -> Iterator[None]:
    """Domain errors (a store that is down, a bad value) printed plainly, as ``fail`` does."""
    try:
        yield
    except FluxReduxError as exc:
        raise fail(exc) from None
