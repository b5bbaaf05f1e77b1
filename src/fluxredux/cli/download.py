"""``fluxredux download``: fetch the real weights into the Hugging Face cache (and, with
``--gguf``, a GGUF of the transformer); and the names under which ``run`` downloads a
prediction's images and ``predict`` writes its own (one naming for both)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated
from urllib.parse import unquote, urlsplit

import typer

from fluxredux.cli.app import app, err, fail, out, setup_logging
from fluxredux.cli.options import VerboseOption
from fluxredux.errors import FluxReduxError, InvalidInput, WeightsNotFound
from fluxredux.pipeline.weights import (
    LICENSE_NOTE,
    PREVIEWS,
    REDUX,
    SCHNELL,
    SCHNELL_FOR_GGUF,
    TEXT_ENCODERS,
    TEXT_ENCODERS_SIZE,
    download_weights,
)

# city96's GGUFs of FLUX.1 [schnell]'s transformer (ComfyUI-GGUF's converter: BFL's names,
# the input and output layers kept in F32), each level's file size in GB. Fewer bits: less
# GPU memory, a little more noise. F16 is left out: no smaller than the bf16 weights.
GGUF_REPO = "city96/FLUX.1-schnell-gguf"
GGUF_LEVELS = {
    "Q8_0": 12.7, "Q6_K": 9.8, "Q5_1": 9.0, "Q5_K_S": 8.3, "Q5_0": 8.3,
    "Q4_1": 7.5, "Q4_K_S": 6.8, "Q4_0": 6.8, "Q3_K_S": 5.2, "Q2_K": 4.0,
}  # fmt: skip


@app.command()
def download(
    schnell: Annotated[str, typer.Option(help="FLUX.1 [schnell] repo id.")] = SCHNELL.default_repo,
    redux: Annotated[str, typer.Option(help="FLUX.1 Redux repo id (gated).")] = REDUX.default_repo,
    with_text_encoders: Annotated[
        bool,
        typer.Option(
            "--with-text-encoders",
            help=f"Also fetch FLUX.1 [schnell]'s text encoders and tokenizers (T5-XXL + CLIP-L, "
            f"{TEXT_ENCODERS_SIZE} more), which only the optional `prompt` input needs.",
        ),
    ] = False,
    previews: Annotated[
        bool,
        typer.Option("--previews", help="Also fetch TAEF1 (about 10 MB), which the `preview` input needs."),
    ] = False,
    gguf: Annotated[
        str | None,
        typer.Option(
            "--gguf",
            metavar="LEVEL",
            help=f"Also fetch a GGUF of the transformer from {GGUF_REPO} for --quantize gguf (8-16 GB "
            f"GPUs): {', '.join(f'{level} ({size} GB)' for level, size in GGUF_LEVELS.items())}.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="HF_TOKEN", help="Hugging Face token (default: HF_TOKEN or hf login)."),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Download FLUX.1 [schnell] and the Redux prior (diffusers files only, ~24 GB; with
    --gguf, the transformer from the GGUF file instead of its 23 GB of bf16).

    The text encoders are left out unless --with-text-encoders asks for them, the GGUF
    transformer unless --gguf does."""
    setup_logging(verbose)
    try:  # a wrong level is said before anything is fetched
        gguf_target = None if gguf is None else gguf_file(gguf)
    except FluxReduxError as exc:
        raise fail(exc) from None
    err.print(LICENSE_NOTE, highlight=False)
    # The gated one first: fail fast.
    # With --gguf, the transformer's weights come from the GGUF file: its config only.
    wanted = [(REDUX, redux), (SCHNELL if gguf_target is None else SCHNELL_FOR_GGUF, schnell)]
    if with_text_encoders:
        wanted.append((TEXT_ENCODERS, schnell))
    if previews:
        wanted.append((PREVIEWS, PREVIEWS.default_repo))
    try:
        for spec, repo in wanted:
            # markup=False: "[schnell]" is a name, not rich markup.
            err.print(f"downloading {spec.title} from {repo} ...", highlight=False, markup=False)
            path = download_weights(spec, repo, token=token)
            out.print(f"{spec.title}: {path}", highlight=False, markup=False)
        if gguf_target is not None:
            repo_id, filename = gguf_target
            err.print(f"downloading {filename} from {repo_id} ...", highlight=False)
            path = download_gguf(repo_id, filename, token=token)
            # soft_wrap: each on one line, whatever the terminal's width (people copy them).
            out.print(f"GGUF transformer: {path}", highlight=False, soft_wrap=True)
            out.print(
                f"use it with: --quantize gguf --transformer-file {repo_id}/{filename}",
                highlight=False,
                soft_wrap=True,
            )
    except FluxReduxError as exc:
        raise fail(exc) from None


# --- the GGUF transformer (--quantize gguf)


def gguf_file(level: str) -> tuple[str, str]:
    """The repo and the file name of city96's GGUF at ``level`` (any case), or InvalidInput
    naming the levels there are."""
    for known in GGUF_LEVELS:
        if level.upper() == known:
            return GGUF_REPO, f"flux1-schnell-{known}.gguf"
    raise InvalidInput(
        f"--gguf {level}: no such level in {GGUF_REPO}; one of {', '.join(GGUF_LEVELS)} "
        "(Q8_0 is near-lossless; the lower levels take less memory, at some cost in quality)",
        field="gguf",
    )


def download_gguf(repo_id: str, filename: str, token: str | None = None) -> Path:
    """Fetch one GGUF file into the Hugging Face cache, with a progress bar."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, token=token))
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise WeightsNotFound(
            f"{filename} was not found in {repo_id} on the Hugging Face hub: see "
            f"https://huggingface.co/{repo_id} for the files it has, and pass one with --transformer-file",
            model=f"{repo_id}/{filename}",
        ) from exc


# --- the names of the images `run` downloads and `predict` writes

# What a name made from a URL keeps: letters, digits, "-", "_" and "."; anything else (a
# "/" decoded from %2F, a control character) must not reach the file system.
_UNSAFE = re.compile(r"[^\w.-]+")
MAX_STEM_CHARS = 100
# The stem of the images made from a prompt alone: no reference to name them after.
PROMPT_STEM = "prompt"


def output_file_name(stem: str, seed: int | None, index: int, extension: str) -> str:
    """``<stem>-<seed>-<i>.<ext>``: the reference's name, the seed, and the image's place
    in the generated batch (images the safety checker removed leave gaps), so the same
    seed again gives the same names, and other references' or seeds' images do not
    overwrite these. ``seed`` None (a server that does not report it): "unseeded"."""
    return f"{stem}-{'unseeded' if seed is None else seed}-{index}.{extension}"


def reference_stem(reference: str | Path) -> str:
    """The ``<stem>`` of the images made from ``reference``: a local file's name without its
    extension (as ``predict`` has it), a URL's likewise, an upload id as it is, "image"
    for a data: URI (or anything without a name)."""
    if isinstance(reference, Path):
        return reference.stem or "image"
    if reference[:5].lower() == "data:":
        return "image"
    if reference[:8].lower().startswith(("http://", "https://")):
        reference = unquote(PurePosixPath(urlsplit(reference).path).name)
    stem = _UNSAFE.sub("_", PurePosixPath(reference).stem).strip("._")[:MAX_STEM_CHARS]
    return stem or "image"


def output_indices(safety: list[dict[str, object]], count: int) -> list[int]:
    """The place in the generated batch of each of a prediction's ``count`` images: those
    its per-image safety verdicts did not find unsafe (no verdicts: the checker was off)."""
    kept = [i for i, verdict in enumerate(safety) if not verdict.get("unsafe")]
    return kept if len(kept) == count else list(range(count))
