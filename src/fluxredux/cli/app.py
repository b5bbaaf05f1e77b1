"""The typer app, the consoles and what every command shares."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fluxredux.config import CompileMode, ModelChoice, Quantization, quiet_libraries
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


ModelOption = Annotated[
    ModelChoice | None,
    typer.Option(
        "--model",
        help="auto: the real model on a CUDA GPU, else the demo model. flux: real weights. "
        "demo: random weights (outputs are noise). Default: FLUXREDUX_MODEL or auto.",
    ),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")]

# The model's speed settings (docs/performance.md), for every command that loads it.
CollapseOption = Annotated[
    bool | None,
    typer.Option(
        "--collapse-zero-tokens/--no-collapse-zero-tokens",
        help="Run the 512 zero text tokens as one (exact). Default: FLUXREDUX_COLLAPSE_ZERO_TOKENS or on.",
    ),
]
AttentionBackendOption = Annotated[
    str | None,
    typer.Option(
        "--attention-backend",
        help="auto (torch SDPA) or a diffusers attention backend (native, _native_math, flex, "
        "_native_cudnn, flash, ...), checked at worker start. Default: FLUXREDUX_ATTENTION_BACKEND or auto.",
    ),
]
CompileOption = Annotated[
    CompileMode | None,
    typer.Option(
        "--compile",
        help="torch.compile at worker start: none, transformer or all. Default: FLUXREDUX_COMPILE or none.",
    ),
]
QuantizeOption = Annotated[
    Quantization | None,
    typer.Option(
        "--quantize",
        help="fp8: the transformer in float8 (CUDA, compute capability 8.9+). "
        "Default: FLUXREDUX_QUANTIZE or none.",
    ),
]
