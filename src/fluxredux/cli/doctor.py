"""``fluxredux doctor``: what this machine can run, and which memory profile it would get.

The GPUs (total and free memory, compute capability), the driver and torch's CUDA, the
disk where weights go, which weights are present, and every memory profile's computed need
against each GPU, marking the one ``auto`` picks and why. Works anywhere: without torch or
a GPU it says so and still lists the profiles. Always exits 0: it reports, it does not judge.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from fluxredux.cli.app import app, out
from fluxredux.cli.options import settings_from
from fluxredux.config import Settings
from fluxredux.errors import WeightsNotFound
from fluxredux.pipeline.memory_profiles import (
    AUTO,
    GIB,
    MANUAL,
    MAX_REQUEST_MEGAPIXELS,
    PROFILES,
    SIZING_MEGAPIXELS,
    DeviceReport,
    MemoryProfile,
    ProfileChoice,
    check_requested,
    choose_profile,
    fits,
    gguf_profile,
    gguf_type_from_name,
    needed_bytes,
    text_encoder_bytes,
    unmet_requirement,
)
from fluxredux.pipeline.weights import (
    REDUX,
    SCHNELL,
    WeightsSpec,
    resolve_text_encoders,
    resolve_weights,
)

NO_GPU = "no CUDA GPU: the real model needs one; the demo and fake models run here"
PICKED = "<- auto"


@dataclass(frozen=True)
class GgufFile:
    path: Path
    gguf_type: str | None  # from its name; None: a type this table does not know


@app.command()
def doctor() -> None:
    """Check this machine: GPUs, driver, disk, weights, and the memory profile auto picks.

    Every memory figure is computed from the model's architecture (parameters x bytes per
    parameter, plus an activation allowance), not measured. Settings come from the
    FLUXREDUX_ variables, as for the other commands."""
    from fluxredux.pipeline.devices import cuda_devices, driver_facts

    settings = settings_from(resolve_memory_profile=False)
    devices = cuda_devices()
    facts = driver_facts()

    _heading("GPU")
    if not devices:
        _line(NO_GPU)
    for index, device in enumerate(devices):
        major, minor = device.capability
        memory = f"{_gib(device.total_bytes)} GiB total, {_gib(device.free_bytes)} GiB free"
        _line(f"{index}: {device.name}: {memory}, compute capability {major}.{minor}")
    _line(", ".join(f"{key} {value}" for key, value in facts.items()))

    _heading("Disk")
    for what, path in _weight_places(settings):
        _line(f"{what}: {path}: {_disk_free(path)}")

    _heading("Weights")
    ggufs = _gguf_files(settings)
    for title, status in _weights_present(settings):
        _line(f"{title}: {status}")
    if not ggufs:
        _line("GGUF transformer files: none in the Hugging Face cache")
    for gguf in ggufs:
        kind = gguf.gguf_type or "type not known from its name"
        _line(f"GGUF transformer: {gguf.path} ({kind}, {_gib(_file_size(gguf.path))} GiB)")

    _heading(
        f"Memory profiles (GPU memory computed, not measured: for one {SIZING_MEGAPIXELS:g} MP output, "
        f"and the largest request, {MAX_REQUEST_MEGAPIXELS:g} MP in all)"
    )
    choices = [choose_profile(device, requested=AUTO) for device in devices]
    profiles = list(PROFILES) + [gguf_profile(g.gguf_type) for g in ggufs if g.gguf_type is not None]
    _profile_table(profiles, devices, choices)
    if not devices:
        _line("auto applies on CUDA GPUs only: on this machine it picks nothing and changes nothing")
    for index, choice in enumerate(choices):
        _line(f"GPU {index}: auto picks {choice.profile.name}: {choice.reason}")
    _line(_requested_line(settings, devices))
    _line(_prompt_line(settings))


def _prompt_line(settings: Settings) -> str:
    chosen = settings.text_encoder_quantize
    each = "/".join(_gib(text_encoder_bytes(quantize=mode)) for mode in ("none", "int8", "nf4"))
    return (
        f"a prompt adds {_gib(text_encoder_bytes(quantize=chosen))} GiB with offload none (T5 + CLIP, "
        f"text_encoder_quantize {chosen}; none/int8/nf4: {each}), not counted above: requests without a "
        "prompt never load them"
    )


def _requested_line(settings: Settings, devices: Sequence[DeviceReport]) -> str:
    requested = settings.memory_profile
    if requested == AUTO:
        return "memory_profile: auto (FLUXREDUX_MEMORY_PROFILE or --memory-profile NAME picks one by name)"
    if requested == MANUAL:
        return (
            f"memory_profile: manual: quantize {settings.quantize}, offload {settings.offload}, as given "
            "(an explicit --quantize or --offload makes auto manual)"
        )
    try:
        check_requested(requested)  # also where there is no GPU to choose for
        chosen = [choose_profile(device, requested=requested) for device in devices]
    except ValueError as exc:
        return f"memory_profile: {exc}"
    if not chosen:
        return f"memory_profile: {requested} (set; on CUDA only: here it changes nothing)"
    return "; ".join(f"memory_profile {requested} on GPU {i}: {c.reason}" for i, c in enumerate(chosen))


def _profile_table(
    profiles: Sequence[MemoryProfile], devices: Sequence[DeviceReport], choices: Sequence[ProfileChoice]
) -> None:
    columns = [
        "profile",
        "quantize",
        "offload",
        f"GiB at {SIZING_MEGAPIXELS:g} MP",
        f"GiB at {MAX_REQUEST_MEGAPIXELS:g} MP",
        *(f"GPU {i}" for i in range(len(devices))),
        "note",
    ]
    rows: list[list[str]] = []
    for profile in profiles:
        gguf_type = profile.name.removeprefix("gguf-") if profile.quantize == "gguf" else None
        sized = needed_bytes(profile, megapixels=SIZING_MEGAPIXELS, gguf_type=gguf_type)
        largest = needed_bytes(profile, megapixels=MAX_REQUEST_MEGAPIXELS, gguf_type=gguf_type)
        cells = [
            _fit_cell(profile, device, sized, choice) for device, choice in zip(devices, choices, strict=True)
        ]
        rows.append(
            [
                profile.name,
                profile.quantize,
                profile.offload,
                _gib(sized),
                _gib(largest),
                *cells,
                profile.note,
            ]
        )
    if out.is_terminal:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name in columns:
            table.add_column(
                name, no_wrap=name != "note", justify="right" if name.startswith("GiB") else "left"
            )
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # Text: "[schnell]" is no markup
        out.print(table)
    else:  # piped: tab-separated fields, whole, for grep and cut (as `fluxredux workers`)
        for line in [columns, *rows]:
            typer.echo("\t".join(line))


def _fit_cell(profile: MemoryProfile, device: DeviceReport, needed: int, choice: ProfileChoice) -> str:
    if (problem := unmet_requirement(profile, device)) is not None:
        return problem.removeprefix("needs ").split(" (")[0] + " needed"
    cell = "fits" if fits(profile, device, needed) else "too big"
    return f"{cell} {PICKED}" if choice.profile == profile else cell


def _weight_places(settings: Settings) -> list[tuple[str, Path]]:
    from huggingface_hub import constants

    places = [("Hugging Face cache (the real weights; fluxredux download)", Path(constants.HF_HUB_CACHE))]
    for title, ref in (
        ("FLUX.1 [schnell] folder", settings.schnell_model),
        ("Redux folder", settings.redux_model),
    ):
        if Path(ref).expanduser().is_dir():
            places.append((title, Path(ref).expanduser()))
    places.append(("cache_dir (the demo model)", settings.cache_dir))
    return places


def _disk_free(path: Path) -> str:
    # The folder may not exist yet (nothing downloaded): its nearest existing parent is on
    # the disk it will be created on.
    existing = path.expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError as exc:
        return f"unknown ({exc.strerror or exc})"
    note = "" if existing == path.expanduser() else f" (not created yet; on the disk of {existing})"
    return f"{_gib(usage.free)} GiB free of {_gib(usage.total)}{note}"


def _weights_present(settings: Settings) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    specs: list[tuple[WeightsSpec, str]] = [(SCHNELL, settings.schnell_model), (REDUX, settings.redux_model)]
    for spec, ref in specs:
        try:
            found.append((spec.title, f"present ({resolve_weights(ref, spec)})"))
        except WeightsNotFound as exc:
            found.append((spec.title, f"missing: {_why_missing(exc, ref)}; fluxredux download fetches it"))
    try:
        found.append(
            ("text encoders (for prompts)", f"present ({resolve_text_encoders(settings.schnell_model)})")
        )
    except WeightsNotFound as exc:
        why = _why_missing(exc, settings.schnell_model)
        found.append(
            ("text encoders (for prompts)", f"missing: {why}; fluxredux download --with-text-encoders")
        )
    return found


def _why_missing(exc: WeightsNotFound, ref: str) -> str:
    """The short form of weights.py's message (which goes on to say how to get them)."""
    missing = exc.detail.get("missing")
    if isinstance(missing, list) and missing:
        return f"{ref} lacks {', '.join(map(str, missing))}"
    return f"{ref} is not in {exc.detail.get('looked_in', 'the Hugging Face cache')}"


def _gguf_files(settings: Settings) -> list[GgufFile]:
    """The GGUF files in the Hugging Face cache (snapshots of any repo), and transformer_file."""
    from huggingface_hub import constants

    paths = sorted(Path(constants.HF_HUB_CACHE).glob("models--*/snapshots/*/**/*.gguf"))
    if settings.transformer_file and Path(settings.transformer_file).expanduser().is_file():
        paths.append(Path(settings.transformer_file).expanduser())
    unique = list(dict.fromkeys(paths))
    return [GgufFile(path, gguf_type_from_name(path.name)) for path in unique]


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size  # a snapshot's file is a link into blobs/: stat follows it
    except OSError:
        return 0


def _gib(size: float) -> str:
    return f"{size / GIB:.1f}"


def _heading(title: str) -> None:
    if out.is_terminal:
        out.print(Text(title, style="bold"))
    else:
        typer.echo(f"{title}:")


def _line(text: str) -> None:
    if out.is_terminal:
        out.print(Text(f"  {text}"), soft_wrap=True)
    else:
        typer.echo(f"  {text}")
