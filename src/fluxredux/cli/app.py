"""The typer app, the consoles and what every command shares (its options: options.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fluxredux.config import quiet_libraries
from fluxredux.errors import ClientError, FluxReduxError

app = typer.Typer(
    help="fluxredux: self-hosted FLUX.1 Redux [schnell] image variations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[schnell]" is a name, not markup
)
out = Console()
err = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
        force=True,
    )
    quiet_libraries(verbose)


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
