"""``fluxredux download``: fetch the real weights into the Hugging Face cache; and the
names under which ``run`` downloads a prediction's images and ``predict`` writes its own
(one naming for both)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated
from urllib.parse import unquote, urlsplit

import typer

from fluxredux.cli.app import app, err, fail, out, setup_logging
from fluxredux.cli.options import VerboseOption
from fluxredux.errors import FluxReduxError
from fluxredux.pipeline.weights import (
    LICENSE_NOTE,
    REDUX,
    SCHNELL,
    TEXT_ENCODERS,
    TEXT_ENCODERS_SIZE,
    download_weights,
)


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
    token: Annotated[
        str | None,
        typer.Option(envvar="HF_TOKEN", help="Hugging Face token (default: HF_TOKEN or hf login)."),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Download FLUX.1 [schnell] and the Redux prior (diffusers files only, ~24 GB).

    The text encoders are left out unless --with-text-encoders asks for them."""
    setup_logging(verbose)
    err.print(LICENSE_NOTE, highlight=False)
    # The gated one first: fail fast.
    wanted = [(REDUX, redux), (SCHNELL, schnell)]
    if with_text_encoders:
        wanted.append((TEXT_ENCODERS, schnell))
    try:
        for spec, repo in wanted:
            err.print(f"downloading {spec.title} from {repo} ...", highlight=False)
            path = download_weights(spec, repo, token=token)
            out.print(f"{spec.title}: {path}", highlight=False)
    except FluxReduxError as exc:
        raise fail(exc) from None


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
