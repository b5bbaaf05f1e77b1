"""The options several commands share, each written once, and the Settings they make.

Single options are ``Annotated[..., typer.Option(...)]`` aliases. Options that go
together are a bundle: a frozen dataclass whose fields are such aliases with their
defaults, named as the Settings fields they set. A command takes a bundle as one
parameter annotated with its class; ``with_bundles`` shows typer the bundle's options in
that parameter's place (so ``--help`` lists them there) and hands the command one bundle
value built from them, which ``settings_from`` turns into Settings.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from fluxredux.cli.app import err
from fluxredux.config import (
    CompileMode,
    LogFormat,
    ModelChoice,
    Offload,
    Quantization,
    Settings,
    TextEncoderQuantization,
)

F = TypeVar("F", bound=Callable[..., Any])

VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")]
LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="text: rich's on a terminal, else one line per record (never wrapped). json: one JSON "
        "object per line (time, level, logger, message, process), for log shippers; the workers' "
        "too. Default: FLUXREDUX_LOG_FORMAT or text.",
    ),
]

ModelOption = Annotated[
    ModelChoice | None,
    typer.Option(
        "--model",
        help="auto: the real model on a CUDA GPU, else the demo model. flux: real weights. "
        "demo: tiny random weights (outputs are noise). fake: no model and no weights, flat "
        "colours at once, for trying the API and for tests (no torch, no GPU). "
        "Default: FLUXREDUX_MODEL or auto.",
    ),
]

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
        help="The transformer: fp8 (CUDA 8.9+), int8 (torchao; CUDA or CPU), nf4 (bitsandbytes, CUDA), "
        "gguf (--transformer-file). Default: FLUXREDUX_QUANTIZE, or what --memory-profile picks.",
    ),
]
OffloadOption = Annotated[
    Offload | None,
    typer.Option(
        "--offload",
        help="CUDA: model (idle parts in CPU RAM), group (transformer blocks streamed in groups), "
        "sequential (layer by layer). Default: FLUXREDUX_OFFLOAD, or what --memory-profile picks.",
    ),
]
MemoryProfileOption = Annotated[
    str | None,
    typer.Option(
        "--memory-profile",
        help="auto: on CUDA, the fastest quantize/offload that fits the free GPU memory (an explicit "
        "--quantize or --offload wins); a profile's name (fluxredux doctor lists them); manual. "
        "Default: FLUXREDUX_MEMORY_PROFILE or auto.",
    ),
]
TransformerFileOption = Annotated[
    str | None,
    typer.Option(
        "--transformer-file",
        help="--quantize gguf: a GGUF checkpoint of the transformer (path, or owner/repo/file.gguf).",
    ),
]
TextEncoderQuantizeOption = Annotated[
    TextEncoderQuantization | None,
    typer.Option(
        "--text-encoder-quantize",
        help="T5 for prompts: int8 or nf4 (CUDA). Default: FLUXREDUX_TEXT_ENCODER_QUANTIZE or none.",
    ),
]

# The commands that call a server (run, upscale).
DEFAULT_SERVER = "http://127.0.0.1:8000"
ServerOption = Annotated[str, typer.Option("--server", envvar="FLUXREDUX_SERVER", help="Server URL.")]
KeyOption = Annotated[
    str | None, typer.Option("--key", "--api-key", envvar="FLUXREDUX_API_KEY", help="API key.")
]
OutputDirOption = Annotated[Path, typer.Option("--output-dir", "-o", help="Where to save the images.")]

# Where a deployment keeps its state and files.
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


@dataclass(frozen=True)
class Bundle:
    """Base of the option bundles (frozen dataclasses of options, fields named as Settings')."""

    def overrides(self) -> dict[str, Any]:
        """The Settings fields this bundle sets (None: not given, the environment decides)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ModelFlags(Bundle):
    """The model and its speed settings: for every command that loads the model."""

    model: ModelOption = None
    collapse_zero_tokens: CollapseOption = None
    attention_backend: AttentionBackendOption = None
    compile: CompileOption = None
    quantize: QuantizeOption = None
    offload: OffloadOption = None
    memory_profile: MemoryProfileOption = None
    transformer_file: TransformerFileOption = None
    text_encoder_quantize: TextEncoderQuantizeOption = None


@dataclass(frozen=True)
class StoreFlags(Bundle):
    """Where the state and the files are: for the commands that run a deployment's part."""

    data_dir: DataDirOption = None
    redis_url: RedisOption = None
    storage: StorageOption = None


LoraDirOption = Annotated[
    Path | None,
    typer.Option(
        "--lora-dir",
        help="LoRA adapters callers may name (NAME.safetensors files). Default: FLUXREDUX_LORA_DIR "
        "or DATA_DIR/loras.",
    ),
]
LoraSourcesOption = Annotated[
    str | None,
    typer.Option(
        "--lora-sources",
        help="Hugging Face repos callers may name as adapters too: hf:owner/* or hf:owner/repo, "
        "comma-separated. Default: FLUXREDUX_LORA_SOURCES or none (local adapters only).",
    ),
]


@dataclass(frozen=True)
class LoraFlags(Bundle):
    """Which style adapters (LoRA) a deployment offers: for serve, worker and loras."""

    lora_dir: LoraDirOption = None
    lora_sources: LoraSourcesOption = None


def settings_from(*bundles: Bundle, resolve_memory_profile: bool = True, **overrides: Any) -> Settings:
    """Settings from the environment, with the flags that were given on top. A bad value
    (a malformed URL, a flag out of range) is a plain error naming it, not a trace."""
    from pydantic import ValidationError
    from rich.markup import escape

    given = {k: v for bundle in bundles for k, v in bundle.overrides().items()} | overrides
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            err.print(f"[bold red]error[/]: {where}: {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    # (fluxredux doctor reports a bad profile setting rather than stop at it.)
    return _memory_profile_resolved(settings) if resolve_memory_profile else settings


def _memory_profile_resolved(settings: Settings) -> Settings:
    """A quantize, offload or GGUF file given (a flag or its FLUXREDUX_ variable) wins over
    auto: decided here, where what was given is known (a worker child gets every setting as
    a variable). A profile's name with them is a contradiction, said at once; so is a name
    that is no profile's (checked torch-free, before any worker starts)."""
    from fluxredux.pipeline.memory_profiles import AUTO, MANUAL, check_requested

    given = {"quantize", "offload", "transformer_file"} & settings.model_fields_set
    try:
        check_requested(settings.memory_profile)
    except ValueError as exc:
        _refuse(f"memory_profile: {exc}")
    if settings.memory_profile not in (AUTO, MANUAL) and given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given))
        _refuse(
            f"memory_profile: --memory-profile {settings.memory_profile} sets quantize and offload; "
            f"drop it or {flags}"
        )
    if settings.memory_profile == AUTO and given:
        return settings.model_copy(update={"memory_profile": MANUAL})
    return settings


def _refuse(message: str) -> NoReturn:
    from rich.markup import escape

    err.print(f"[bold red]error[/]: {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def require_model_packages(settings: Settings) -> None:
    """Before anything starts: a model that needs torch and diffusers, on a Python that has
    not got them, is one line saying what to install (exit 2), not a worker's trace."""
    from rich.markup import escape

    from fluxredux.pipeline.requirements import missing_packages_problem

    if (problem := missing_packages_problem(settings.model)) is not None:
        err.print(f"[bold red]error[/]: {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


@dataclass(frozen=True)
class Expansion:
    """One parameter of a command shown to typer as several: ``parameters``, whose values
    ``build`` turns back into the one argument the command takes."""

    parameters: list[inspect.Parameter]
    build: Callable[[dict[str, Any]], Any]


def expand(func: F, expansions: Mapping[str, Expansion]) -> F:
    """``func`` as typer sees it with each parameter named in ``expansions`` replaced, in its
    place, by that expansion's parameters; called, it gets their values built back into one."""
    signature = inspect.signature(func)
    # Resolve the command's own (string, postponed) annotations where they were written,
    # so typer sees real types and Annotated options on the wrapper.
    hints = typing.get_type_hints(func, include_extras=True)
    shown: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        if param.name in expansions:
            shown += [p.replace(kind=param.kind) for p in expansions[param.name].parameters]
        else:
            shown.append(param.replace(annotation=hints.get(param.name, param.annotation)))
    names = [p.name for p in shown]
    if len(set(names)) != len(names):
        raise TypeError(f"{func.__name__}: two options under one name in {names}")

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        for name, expansion in expansions.items():
            kwargs[name] = expansion.build({p.name: kwargs.pop(p.name) for p in expansion.parameters})
        return func(**kwargs)

    # Signature.replace checks the order (no default-less parameter after a defaulted one).
    wrapper.__signature__ = signature.replace(parameters=shown)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in shown}
    return wrapper  # type: ignore[return-value]


def _bundle_expansion(bundle: type[Bundle]) -> Expansion:
    hints = typing.get_type_hints(bundle, include_extras=True)
    parameters = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in fields(bundle)
    ]
    return Expansion(parameters, lambda values: bundle(**values))


def with_bundles(func: F) -> F:
    """Show each parameter of ``func`` annotated with a Bundle class as that bundle's options."""
    hints = typing.get_type_hints(func)
    bundles = {
        name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, Bundle)
    }
    return expand(func, {name: _bundle_expansion(bundle) for name, bundle in bundles.items()})
